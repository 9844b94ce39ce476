"""The GHN: decoder tiling, normalisation, the regulariser, and predictions for registry models."""

import math

import pytest
import torch
from torch.func import functional_call

from quicktrain import models
from quicktrain.ghn import GHN, ghn_config, model_to_graph, predicted_param_regularizer
from quicktrain.ghn.graph import PrimType
from quicktrain.ghn.model import normalize_param, shape_bucket, tile_to_shape

CHUNK = (4, 3, 5, 5)


def _raw():
    return torch.arange(math.prod(CHUNK), dtype=torch.float64)


@pytest.mark.parametrize(
    "shape",
    [(2, 2, 3, 3), (4, 3, 5, 5), (9, 7, 1, 1), (10, 8, 7, 7), (1, 1, 3, 3), (6, 5, 1, 7), (5, 4, 3)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_conv_tiling_covers_smaller_and_larger_shapes(shape):
    chunk = _raw().view(CHUNK)
    w = tile_to_shape(_raw(), shape, CHUNK, PrimType.CONV)
    assert w.shape == shape
    w4 = w if len(shape) == 4 else w.unsqueeze(2)
    o, i, kh, kw = w4.shape
    for a in range(o):
        for b in range(i):
            for y in range(kh):
                for x in range(kw):
                    cy, cx = (
                        y - kh // 2 + 2,
                        x - kw // 2 + 2,
                    )  # centre-aligned index into the 5x5 chunk kernel
                    want = chunk[a % 4, b % 3, cy, cx] if 0 <= cy < 5 and 0 <= cx < 5 else 0.0
                    assert w4[a, b, y, x] == want


@pytest.mark.parametrize("shape", [(3, 10), (9, 200), (2, 17, 6), (1, 1, 8)])
def test_matrix_tiling(shape):
    mat = _raw().view(4, 75)
    w = tile_to_shape(_raw(), shape, CHUNK, PrimType.LINEAR)
    assert w.shape == shape
    flat = w.reshape(-1, shape[-1])
    for r in range(flat.shape[0]):
        for c in range(flat.shape[1]):
            assert flat[r, c] == mat[r % 4, c % 75]


@pytest.mark.parametrize("n", [1, 5, 64, 130])
def test_vector_tiling(n):
    raw = torch.arange(64.0)
    w = tile_to_shape(raw, (n,), CHUNK, PrimType.BIAS)
    assert torch.equal(w, torch.arange(n, dtype=torch.float32) % 64)
    assert tile_to_shape(raw, (), CHUNK, PrimType.PARAM).shape == ()


def test_fan_in_normalisation():
    w = torch.ones(8, 4, 3, 3)
    assert torch.allclose(normalize_param(w, PrimType.CONV), torch.full_like(w, math.sqrt(2 / 36)))
    assert torch.allclose(
        normalize_param(w, PrimType.CONV, is_last=True), torch.full_like(w, math.sqrt(1 / 36))
    )
    assert torch.allclose(
        normalize_param(torch.ones(5, 7), PrimType.LINEAR), torch.full((5, 7), math.sqrt(2 / 7))
    )
    assert torch.allclose(normalize_param(torch.zeros(3), PrimType.BN), torch.ones(3))
    b = normalize_param(torch.tensor([-100.0, 0.0, 100.0]), PrimType.BIAS)
    assert torch.allclose(b, torch.tensor([-1.0, 0.0, 1.0]))


def test_regulariser_matches_definition():
    p1 = {"a": torch.tensor([3.0, 4.0]), "b": torch.ones(2, 2)}
    p2 = {"c": torch.tensor([[0.0, 5.0]])}
    assert predicted_param_regularizer([p1, p2]).item() == pytest.approx(((5 + 2) + 5) / 2)


def test_shape_buckets():
    assert shape_bucket(torch.tensor([0, 1, 2, 3, 4, 64, 10**9])).tolist() == [0, 1, 2, 2, 3, 7, 23]


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
    assert ghn.decoder[-1].weight.grad.abs().sum() > 0 and ghn.decoder_1d[-1].weight.grad.abs().sum() > 0


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
