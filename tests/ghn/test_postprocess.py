"""Diversity measures and post-processing of predicted weights, against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F

from quicktrain.ghn.postprocess import (
    distinct_filters,
    effective_rank,
    flatten_spectrum,
    orthogonalize,
    relu_chains,
    revive_dead_units,
)


def test_effective_rank_matches_the_entropy_of_known_singular_values():
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, rel=1e-5)
    assert effective_rank(torch.outer(torch.arange(1.0, 5), torch.ones(7))) == pytest.approx(1.0, rel=1e-4)
    # singular values 3, 1 (orthogonal rows): p = (3/4, 1/4)
    w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(w) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)
    # a conv weight counts its filters as rows of [out, in * kh * kw]
    assert effective_rank(torch.eye(4).reshape(4, 1, 2, 2)) == pytest.approx(4.0, rel=1e-5)


def test_distinct_filters_counts_near_copies_after_centring():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    assert distinct_filters(w) == 1.0
    w[3] = 2 * w[5] + 0.7  # a scaled copy with an offset: still a copy after centring
    assert distinct_filters(w) == pytest.approx(1 - 2 / 8)


def _gram_schmidt(m: torch.Tensor) -> torch.Tensor:
    """Classical Gram-Schmidt on the columns, float64: the Q of the QR with a positive diagonal of R."""
    q = torch.zeros_like(m)
    for j in range(m.shape[1]):
        v = m[:, j] - q[:, :j] @ (q[:, :j].t() @ m[:, j])
        q[:, j] = v / v.norm()
    return q


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (8, 3, 3, 3)])
def test_orthogonalize_is_the_qr_factor_at_the_input_norm(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    out = orthogonalize(w)
    assert out.shape == w.shape and out.dtype == w.dtype
    m = w.reshape(shape[0], -1)
    wide = m.shape[0] < m.shape[1]
    ref = _gram_schmidt(m.t() if wide else m)
    ref = (ref.t() if wide else ref) * m.norm() / math.sqrt(min(m.shape))
    torch.testing.assert_close(out.reshape(m.shape), ref, rtol=1e-6, atol=1e-8)
    assert float(out.norm()) == pytest.approx(float(w.norm()), rel=1e-9)
    assert effective_rank(out) == pytest.approx(min(m.shape), rel=1e-6)


def test_flatten_spectrum_interpolates_toward_the_polar_factor():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64) * torch.tensor([4.0, 2, 1, 0.5, 0.1]).double()[:, None]
    torch.testing.assert_close(flatten_spectrum(w, 0.0), w)
    # alpha = 1: the polar factor (W W^T)^(-1/2) W, scaled to ||W||_F
    e, v = torch.linalg.eigh(w @ w.t())
    polar = (v * e.rsqrt()) @ v.t() @ w
    torch.testing.assert_close(flatten_spectrum(w, 1.0), polar * w.norm() / polar.norm())
    # in between: singular values (1 - a) s + a ||s|| / sqrt(k), rescaled to ||s||; vectors kept (W'W^T symmetric)
    s = torch.linalg.svdvals(w)
    s_ref = 0.5 * s + 0.5 * s.norm() / math.sqrt(5)
    s_ref = s_ref * s.norm() / s_ref.norm()
    out = flatten_spectrum(w, 0.5)
    torch.testing.assert_close(torch.linalg.svdvals(out), s_ref)
    torch.testing.assert_close(out @ w.t(), (out @ w.t()).t())
    assert effective_rank(w) < effective_rank(out) < effective_rank(flatten_spectrum(w, 1.0))
    with pytest.raises(ValueError, match="alpha must be in"):
        flatten_spectrum(w, 1.5)


def _dead_mlp() -> tuple[torch.nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias[:6] = -100.0  # units 0-5 are negative on every input below
    return model, torch.randn(64, 4)


def test_revive_dead_units_keeps_the_function_and_gives_dead_units_a_gradient():
    model, x = _dead_mlp()
    ref = model(x).detach()
    # dead units get no gradient: autograd says so
    F.cross_entropy(model(x), torch.arange(64) % 3).backward()
    assert model[0].weight.grad[:6].abs().max() == 0 and model[0].weight.grad[6:].abs().max() > 0
    model.zero_grad()
    revived = revive_dead_units(model, [x[:32], x[32:]])
    assert revived == [f"0[{j}]" for j in range(6)]
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)
    pre = model[0](x)
    assert ((pre[:, :6] > 0).float().mean(0) - 0.5).abs().max() <= 1 / 64 + 1e-6  # median shift: half are on
    assert model[2].weight[:, :6].abs().max() == 0
    F.cross_entropy(model(x), torch.arange(64) % 3).backward()
    assert model[2].weight.grad[:, :6].abs().min() > 0  # the zeroed outgoing weights now learn


def test_revive_dead_units_maps_channels_to_flattened_blocks():
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    ).eval()
    with torch.no_grad():
        model[1].bias[1] = -50.0
    x = torch.randn(8, 1, 6, 6)
    ref = model(x).detach()
    assert revive_dead_units(model, [x]) == ["1[1]"]
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)
    assert model[5].weight[:, 4:8].abs().max() == 0 and model[5].weight[:, :4].abs().min() > 0


def test_revive_dead_units_restores_a_chain_that_is_not_the_data_flow():
    class Crossed(torch.nn.Module):
        """Registered a -> relu -> c, but c reads relu(d(x)): zeroing c's columns would change the output."""

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 8)
            self.relu = torch.nn.ReLU()
            self.c = torch.nn.Linear(8, 3)
            self.d = torch.nn.Linear(4, 8)

        def forward(self, x):
            return self.c(self.relu(self.d(x))) + 0 * self.a(x).sum(1, keepdim=True)

    torch.manual_seed(2)
    model = Crossed()
    with torch.no_grad():
        model.a.bias[:3] = -100.0
        model.d.bias.fill_(5.0)  # every unit of d is live, so the columns of c matter
    x = torch.randn(16, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert relu_chains(model) == [("a", "c")]
    assert revive_dead_units(model, [x]) == []
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
