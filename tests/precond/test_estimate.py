"""``compute_curvature``: per-module representations with state_dict, for EWC/OBD-style use."""

import pytest
import torch
from torch import nn

from quicktrain import precond


def _model():
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_diag_and_layer_blocks_equal_blocks_of_the_dense_ggn_averaged_over_batches(ref):
    model = _model()
    data = [(torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))) for _ in range(2)]
    fn = nn.CrossEntropyLoss()
    ggn = sum(ref.ggn(model, fn, x, y) for x, y in data) / 2
    est = precond.compute_curvature(model, fn, data, representation="diag")
    diag = torch.cat([est[m].D[p].reshape(-1) for m in ("0", "1", "3") for p in ("weight", "bias")])
    torch.testing.assert_close(diag, torch.diagonal(ggn))
    # the quadratic form of the diagonal representation is Σ_i F_ii d_i^2
    deltas = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    d = torch.cat([deltas[n].reshape(-1) for n, _ in model.named_parameters()])
    torch.testing.assert_close(est.quadratic(deltas), (torch.diagonal(ggn) * d * d).sum())
    layer = precond.compute_curvature(model, fn, data, representation="layer")
    torch.testing.assert_close(layer["3"].F, ggn[-18:, -18:])


def test_kron_matches_the_maker_and_state_dict_round_trips():
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    est = precond.compute_curvature(model, nn.CrossEntropyLoss(), [(x, y)], representation="kron")
    maker = precond.make("kfac", model, nn.CrossEntropyLoss(), fisher_type="exact")
    maker.forward_backward(x, y)
    torch.testing.assert_close(est["0"].A, maker.reps["0"].A)
    torch.testing.assert_close(est["3"].G, maker.reps["3"].G)
    torch.testing.assert_close(est["1"].F, maker.reps["1"].F)
    other = precond.compute_curvature(model, nn.CrossEntropyLoss(), [(x[:2], y[:2])], representation="kron")
    other.load_state_dict(est.state_dict())
    torch.testing.assert_close(other["0"].G, est["0"].G)
    vec = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    mv = est.mvp(vec)
    w = torch.cat([vec["0.weight"], vec["0.bias"][:, None]], 1)
    torch.testing.assert_close(torch.cat([mv["0.weight"], mv["0.bias"][:, None]], 1), est["0"].G[0] @ w @ est["0"].A[0])
    with pytest.raises(ValueError, match="Unknown representation"):
        precond.compute_curvature(model, nn.CrossEntropyLoss(), [(x, y)], representation="full")


def test_parameter_gradients_and_buffers_are_untouched():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    before = model[1].running_mean.clone()
    precond.compute_curvature(model, nn.CrossEntropyLoss(), [(torch.randn(6, 4), torch.randint(0, 3, (6,)))],
                              fisher_type="mc")
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model[1].running_mean, before)
