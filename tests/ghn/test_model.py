"""The GHN: decoded shapes, distinct filters, the classifier route, normalisation, the regulariser."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from quicktrain import models
from quicktrain.ghn import GHN, ghn_config, model_to_graph, predicted_param_regularizer
from quicktrain.ghn.graph import PrimType
from quicktrain.ghn.model import SHAPE_BUCKETS, DatasetInfo, normalize_param, shape_bucket
from quicktrain.ghn.postprocess import distinct_filters

INFO = DatasetInfo("digits", (1, 8, 8), 10)


class _Shapes(nn.Module):
    """One parameter of each given shape, used by a forward pass so the graph sees it."""

    def __init__(self, convs: list[tuple[int, ...]], vec: int) -> None:
        super().__init__()
        self.convs = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in convs])
        self.vec = nn.Parameter(torch.zeros(vec))

    def forward(self, x):
        out = 0.0
        for w in self.convs:
            w4 = w if w.dim() == 4 else w[:, :, None, None]
            out = out + F.conv2d(x.expand(-1, w4.shape[1], -1, -1), w4, padding="same").mean()
        return (out + self.vec.sum()) * torch.ones(x.shape[0], 10)


@pytest.mark.parametrize(
    "shape",
    [(2, 2, 3, 3), (64, 64, 7, 7), (100, 70, 1, 1), (130, 129, 3, 3), (5, 3, 11, 11), (300, 260), (6, 5, 1, 7)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_decoded_tensors_have_their_shapes(shape):
    ghn = GHN(ghn_config("T"), INFO)
    model = _Shapes([shape], 130)
    graph = model_to_graph(model, torch.randn(2, 1, 8, 8))
    params = ghn(graph)[0]
    assert params["convs.0"].shape == shape and params["vec"].shape == (130,)
    assert torch.isfinite(params["convs.0"]).all()
    if len(shape) == 4 and shape[2] > 7:  # kernels beyond the 7x7 tile: the tile in the centre, zeros around
        assert params["convs.0"][:, :, 0].abs().sum() == 0 and params["convs.0"][:, :, 2:-2, 2:-2].abs().sum() > 0


@pytest.mark.parametrize("width", [16, 32, 64, 96, 128])
def test_output_filters_are_distinct_up_to_width_128(width):
    """The 16x16 chunk used to be tiled (26-50% distinct filters); tiles are now decoded with their position."""
    torch.manual_seed(0)
    ghn = GHN(ghn_config("T"), INFO)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )
    params = ghn(model_to_graph(model, torch.randn(2, 1, 8, 8)))[0]
    for name in ("0.weight", "2.weight"):
        distinct = distinct_filters(params[name], threshold=0.99)
        assert distinct >= 0.9, (name, distinct)
        # and across the in-channel tiles: the first and second 64 input channels of a filter differ
        if width > 64 and name == "2.weight":
            full = params[name].detach()
            rest = width - 64
            assert not torch.allclose(full[:, :rest], full[:, 64:], atol=1e-3)


def test_classifier_has_its_own_predictor():
    ghn = GHN(ghn_config("T"), INFO)
    model = models.get_model("mlp", num_classes=10, in_shape=(1, 8, 8))
    graph = model_to_graph(model, torch.randn(2, 1, 8, 8))
    routes = {j.name: j.route for j in ghn.prepare(graph).jobs}
    last_w, last_b = [n for n, _ in model.named_parameters()][-2:]
    assert routes[last_w] == "cls" and routes[last_b] == "cls_b"
    assert all(r in ("nd", "1d") for n, r in routes.items() if n not in (last_w, last_b))
    params = ghn(graph)[0]
    params[last_w].sum().backward()
    assert ghn.decoder.classifier.weight.grad.abs().sum() > 0
    # without dataset info there is no class count: the classifier is an ordinary tensor
    plain = GHN(ghn_config("T"))
    assert all(j.route in ("nd", "1d") for j in plain.prepare(graph).jobs)


def test_fan_in_normalisation():
    w = torch.ones(8, 4, 3, 3)
    assert torch.allclose(normalize_param(w, PrimType.CONV), torch.full_like(w, math.sqrt(2 / 36)))
    assert torch.allclose(normalize_param(w, PrimType.CONV, is_last=True), torch.full_like(w, math.sqrt(1 / 36)))
    assert torch.allclose(normalize_param(torch.ones(5, 7), PrimType.LINEAR), torch.full((5, 7), math.sqrt(2 / 7)))
    assert torch.allclose(normalize_param(torch.zeros(3), PrimType.BN), torch.ones(3))
    b = normalize_param(torch.tensor([-100.0, 0.0, 100.0]), PrimType.BIAS)
    assert torch.allclose(b, torch.tensor([-1.0, 0.0, 1.0]))


def test_regulariser_matches_definition():
    p1 = {"a": torch.tensor([3.0, 4.0]), "b": torch.ones(2, 2)}
    p2 = {"c": torch.tensor([[0.0, 5.0]])}
    assert predicted_param_regularizer([p1, p2]).item() == pytest.approx(((5 + 2) + 5) / 2)


def test_shape_buckets_tell_close_sizes_apart():
    b = shape_bucket(torch.tensor([0, 1, 3, 5, 7, 16, 20, 24, 64, 72, 128, 10**9])).tolist()
    assert b[0] == 0 and len(set(b)) == len(b)  # 16 vs 24 channels, 5x5 vs 7x7 kernels: different buckets
    near = shape_bucket(torch.tensor([2000, 2010])).tolist()
    assert near[0] == near[1]  # large sizes share coarse bins
    assert shape_bucket(torch.tensor([10**9])).item() == SHAPE_BUCKETS - 1


@pytest.mark.parametrize("name", models.list_models())
def test_predicts_every_registry_model(name):
    ghn = GHN(ghn_config("T"))
    in_shape = models.input_shape(name, (1, 8, 8))
    model = models.get_model(name, num_classes=10, in_shape=in_shape)
    x = torch.randn(4, *in_shape)
    graph = model_to_graph(model, x)
    params = ghn(graph)[0]
    named = dict(model.named_parameters())
    assert graph.unsupported == [] and set(params) == set(named)
    for k, v in params.items():
        assert v.shape == named[k].shape and torch.isfinite(v).all(), k
    out = functional_call(model, params, (x,))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    # gradients reach the GHN through every route
    out.square().mean().backward()
    assert ghn.decoder.out.weight.grad.abs().sum() > 0 and ghn.decoder_1d[-1].weight.grad.abs().sum() > 0


def test_graph_ablation_ignores_types_and_distances():
    """The "no graph" GHN sees only shapes: node types, distances and degrees do not reach its input.

    (Types still choose the decoder route and the normalisation of the output, as they name the tensor.)
    """
    model = models.get_model("cnn", num_classes=10, in_shape=(1, 8, 8))
    graph = model_to_graph(model, torch.randn(2, 1, 8, 8))
    other = model_to_graph(model, torch.randn(2, 1, 8, 8))
    other.sp_dist = torch.ones_like(other.sp_dist)
    other.input_dist = torch.zeros_like(other.input_dist)
    full, masked = GHN(ghn_config("T")), GHN(ghn_config("T", graph_info=False))
    masked.load_state_dict(full.state_dict())
    a, b = masked(graph)[0], masked(other)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = full(graph)[0], full(other)[0]
    assert not all(torch.allclose(c[k], d[k]) for k in c)
    other.node_types = torch.roll(other.node_types, 1)
    other.edges = other.edges.flip(0)
    assert torch.equal(masked.node_features(graph)[0], masked.node_features(other)[0])
    assert not torch.equal(full.node_features(graph)[0], full.node_features(other)[0])


def test_batched_prediction_equals_one_by_one():
    ghn = GHN(ghn_config("T")).eval()
    ms = [models.get_model(n, num_classes=10, in_shape=(1, 8, 8)) for n in ("cnn", "mlp", "resnet20")]
    graphs = [model_to_graph(m, torch.randn(2, 1, 8, 8)) for m in ms]
    together = ghn(graphs)
    for g, t in zip(graphs, together, strict=True):
        alone = ghn(g)[0]
        assert all(torch.allclose(alone[k], t[k], atol=1e-5) for k in alone)
