"""The architecture space covers what users train; the pool is built once, reused, and excludes the registry."""

import collections

import pytest
import torch
from torch import nn

from quicktrain import models
from quicktrain.ghn import GHN, DatasetInfo, build_arch, ghn_config, model_to_graph
from quicktrain.ghn.archs import FAMILIES, sample_arch
from quicktrain.ghn.graph import PrimType
from quicktrain.ghn.meta import ArchPool, graph_signature, registry_signatures

SHAPE = (1, 28, 28)


def test_space_covers_families_stems_heads_norms_widths_and_depths():
    specs = [sample_arch("train", i, SHAPE) for i in range(600)]
    assert set(s.family for s in specs) == set(FAMILIES)
    assert {"flatten_mlp", "pool", "pool_mlp"} <= {s.head for s in specs}
    assert len({s.stem for s in specs if s.family != "vit"}) >= 5
    assert any(not s.norm for s in specs) and any(s.norm for s in specs)
    assert min(s.width for s in specs) == 8 and max(s.width for s in specs) == 64
    assert min(s.cells for s in specs) == 1 and max(s.cells for s in specs) == 8
    deep = [sample_arch("deep", i, SHAPE).cells for i in range(100)]
    wide = [sample_arch("wide", i, SHAPE).width for i in range(100)]
    assert max(deep) == 16 and min(deep) >= 10 and max(wide) == 128
    assert sample_arch("test", 3, SHAPE) == sample_arch("test", 3, SHAPE)  # deterministic


def _first(family: str, pred=lambda s: True) -> nn.Module:
    i = next(i for i in range(2000) if (s := sample_arch("train", i, SHAPE)).family == family and pred(s))
    return build_arch("train", i, in_shape=SHAPE, num_classes=10)


def test_families_are_what_they_claim_and_graphs_label_their_ops():
    vit = _first("vit")
    assert any(isinstance(m, nn.MultiheadAttention) for m in vit.modules())
    mobile = _first("mobile", lambda s: s.expand > 1 and s.cells > 2)
    assert any(isinstance(m, nn.ReLU6) for m in mobile.modules())
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in mobile.modules())
    cnn = _first("cnn", lambda s: s.heads > 1 and s.cells >= 2)
    assert any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in cnn.modules())
    bn_free = _first("resnet", lambda s: not s.norm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bn_free.modules())
    x = torch.randn(2, *SHAPE)
    types = {m: set(model_to_graph(net, x).node_types.tolist()) for m, net in [("mobile", mobile), ("cnn", cnn)]}
    assert PrimType.CONV_DW.id in types["mobile"] and PrimType.CONV_GROUP.id not in types["mobile"]
    assert PrimType.CONV_GROUP.id in types["cnn"]
    g = model_to_graph(vit, x)
    assert not g.unsupported and PrimType.LN.id in g.node_types.tolist()


@pytest.mark.parametrize("split", ["train", "deep", "wide"])
def test_every_sampled_network_runs_and_is_fully_predicted(split):
    ghn = GHN(ghn_config("T"), DatasetInfo("x", SHAPE, 10))
    for i in range(6):
        net = build_arch(split, i, in_shape=SHAPE, num_classes=10)
        x = torch.randn(2, *SHAPE)
        g = model_to_graph(net, x)
        assert not g.unsupported
        params = ghn(g)[0]
        out = torch.func.functional_call(net, params, (x,))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_pool_builds_once_holds_no_weights_and_excludes_the_registry():
    ghn = GHN(ghn_config("T"), DatasetInfo("x", SHAPE, 10))
    excluded = registry_signatures(SHAPE, 10)
    # the signature is computed right: a freshly built registry model is in the excluded set
    fresh = models.get_model("resnet20", num_classes=10, in_shape=SHAPE)
    assert graph_signature(model_to_graph(fresh, torch.zeros(2, *SHAPE))) in excluded
    assert len(excluded) == sum(tuple(models.input_shape(n, SHAPE)) == SHAPE for n in models.list_models())
    pool = ArchPool(ghn, 12, seed=0, in_shape=SHAPE, num_classes=10, exclude=excluded)
    entries = [pool[j] for j in range(len(pool))]
    assert all(pool[j][0] is entries[j][0] and pool[j][1] is entries[j][1] for j in range(len(pool)))  # cached
    for net, prepared in entries:
        assert all(p.is_meta for p in net.parameters())  # predicted parameters are supplied at each step
        assert graph_signature(prepared.graph) not in excluded
    # a pool told to exclude its own first network replaces it, deterministically
    sig = graph_signature(entries[0][1].graph)
    again = ArchPool(ghn, 12, seed=0, in_shape=SHAPE, num_classes=10, exclude=excluded | {sig})
    twice = ArchPool(ghn, 12, seed=0, in_shape=SHAPE, num_classes=10, exclude=excluded | {sig})
    assert graph_signature(again[0][1].graph) != sig and again.skipped == [pool.indices[0]]
    assert again.indices[0] == (twice[0], twice.indices[0])[1]
    counts = collections.Counter(net.spec.family for net, _ in entries)
    assert len(counts) >= 3
