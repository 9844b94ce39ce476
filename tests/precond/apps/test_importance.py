"""OBD saliencies against brute-force values from dense float64 Fisher/GGN matrices (torch.func)."""

import pytest
import torch
from torch import nn

from quicktrain import precond
from quicktrain.curvature_apps.importance import (
    channel_magnitude,
    channel_saliency,
    curvature_diagonal,
    magnitude_scores,
    obd_saliency,
)
from quicktrain.models.small import MLP, SmallCNN

CE = nn.CrossEntropyLoss()


def _flat(model: nn.Module, ts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([ts[n].reshape(-1) for n, _ in model.named_parameters()])


def _theta(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _module_labels(model: nn.Module) -> torch.Tensor:
    labels = [torch.full((p.numel(),), i) for i, (_, m) in enumerate(model.named_modules())
              for p in m.parameters(recurse=False)]
    return torch.cat(labels)


def _rep_dense(model: nn.Module, est) -> torch.Tensor:
    """The dense matrix of a representation, from its own ``mvp`` applied to the identity."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    eye = torch.eye(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    cols = []
    for col in eye:
        parts = dict(zip(names, [c.view(s) for c, s in zip(col.split([s.numel() for s in shapes]), shapes,
                                                           strict=True)], strict=True))
        cols.append(_flat(model, est.mvp(parts)))
    return torch.stack(cols, 1)


def _cnn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 4, 2, stride=2, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model.eval()


def test_diag_saliency_is_half_theta_squared_times_the_ggn_diagonal(ref):
    model = _cnn()
    data = [(torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))) for _ in range(2)]
    ggn = sum(ref.ggn(model, CE, x, y) for x, y in data) / len(data)
    est = precond.compute_curvature(model, CE, data, representation="diag")
    theta = _theta(model)
    torch.testing.assert_close(_flat(model, obd_saliency(model, est)), 0.5 * torch.diagonal(ggn) * theta**2)


@pytest.mark.parametrize("representation", ["kron", "layer", "unitwise"])
def test_block_saliencies_equal_the_dense_ggn_diagonal_on_one_example(ref, representation):
    # one example, one position per layer: K-FAC, layer and unit blocks all hold the exact GGN diagonal
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.randint(0, 3, (1,))
    ggn = ref.ggn(model, CE, x, y)
    est = precond.compute_curvature(model, CE, [(x, y)], representation=representation)
    torch.testing.assert_close(_flat(model, obd_saliency(model, est)), 0.5 * torch.diagonal(ggn) * _theta(model)**2)


@pytest.mark.parametrize("representation", ["kron", "unitwise"])
def test_diagonal_maps_conv_and_norm_layouts_like_the_representations_own_matrix(representation):
    model = _cnn()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    est = precond.compute_curvature(model, CE, [(x, y)], representation=representation)
    torch.testing.assert_close(_flat(model, curvature_diagonal(est)), torch.diagonal(_rep_dense(model, est)))


def test_embedding_diagonal_matches_its_kron_matrix():
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    x, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 3, (6,))
    est = precond.compute_curvature(model, CE, [(x, y)], representation="kron")
    torch.testing.assert_close(_flat(model, curvature_diagonal(est)), torch.diagonal(_rep_dense(model, est)))


def _channel_deltas(model: nn.Module, layer: str, norm: str | None, c: int) -> torch.Tensor:
    deltas = []
    for name, p in model.named_parameters():
        d = torch.zeros_like(p.detach())
        if name.rpartition(".")[0] in (layer, norm):
            d[c] = p.detach()[c]
        deltas.append(d.reshape(-1))
    return torch.cat(deltas)


def test_channel_saliency_is_the_quadratic_form_of_the_dense_layer_blocks(ref):
    model = MLP(6, 3, hidden=(5, 4)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    labels = _module_labels(model)
    dense = ref.ggn(model, CE, x, y) * (labels[:, None] == labels[None, :])
    est = precond.compute_curvature(model, CE, [(x, y)], representation="layer")
    scores = channel_saliency(model, est)
    assert sorted(scores) == ["1", "3"]
    for layer, width in (("1", 5), ("3", 4)):
        want = torch.stack([0.5 * d @ dense @ d for d in (_channel_deltas(model, layer, None, c)
                                                          for c in range(width))])
        torch.testing.assert_close(scores[layer], want)


def test_cnn_channel_saliency_includes_batchnorm_and_reduces_to_sums_for_diag():
    model = SmallCNN(1, 3, widths=(3, 4)).double()
    for bn in (model.features[0][1], model.features[2][1]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    data = [(torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,)))]
    diag = precond.compute_curvature(model, CE, data, representation="diag")
    sal = obd_saliency(model, diag)
    scores = channel_saliency(model, diag)
    want = sal["features.0.0.weight"].flatten(1).sum(1) + sal["features.0.1.weight"] + sal["features.0.1.bias"]
    torch.testing.assert_close(scores["features.0.0"], want)
    want = sal["classifier.1.weight"].sum(1) + sal["classifier.1.bias"]
    torch.testing.assert_close(scores["classifier.1"], want)
    # K-FAC: ½ G_cc θ_c^T A θ_c for the conv (no bias) plus ½ [γ_c, β_c] F_c [γ_c, β_c]^T for its BatchNorm
    kron = precond.compute_curvature(model, CE, data, representation="kron")
    conv, bn = model.features[2][0], model.features[2][1]
    a, g, f = kron["features.2.0"].A[0], kron["features.2.0"].G[0], kron["features.2.1"].F
    w = conv.weight.detach().flatten(1)
    gb = torch.stack([bn.weight.detach(), bn.bias.detach()], 1)
    want = 0.5 * torch.diagonal(g) * torch.einsum("ci,ij,cj->c", w, a, w) + 0.5 * torch.einsum("ci,cij,cj->c",
                                                                                                 gb, f, gb)
    torch.testing.assert_close(channel_saliency(model, kron)["features.2.0"], want)


def test_magnitude_scores_and_refusal_of_other_models():
    model = MLP(6, 3, hidden=(5, 4))
    mags = magnitude_scores(model)
    torch.testing.assert_close(mags["1.weight"], model[1].weight.detach().abs())
    torch.testing.assert_close(channel_magnitude(model)["3"], model[3].weight.detach().abs().sum(1))
    with pytest.raises(ValueError, match="drop --structured"):
        channel_magnitude(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
