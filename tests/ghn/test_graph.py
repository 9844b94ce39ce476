"""Graphs of small hand-made models equal hand-written expected graphs; shortest paths match brute force."""

import pytest
import torch
from torch import nn

from quicktrain.ghn.graph import PrimType, model_to_graph, shortest_paths


class ConvResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c(x)))
        h = h + self.c2(h)
        return self.fc(h.mean((2, 3)))


class Branches(nn.Module):
    """Concat of a depthwise and a dilated conv, max pooling, a gating product and attention softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False)
        self.dil = nn.Conv2d(2, 2, 3, padding=2, dilation=2, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.q = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 5, bias=False)

    def forward(self, x):
        h = self.pool(torch.cat([self.dw(x), self.dil(x)], dim=1))  # [B, 4, 2, 2]
        t = h.flatten(2).transpose(1, 2)  # [B, 4 tokens, 4]
        q = self.q(t)
        att = (q @ t.transpose(1, 2)).softmax(-1)
        out = (att @ t) * torch.sigmoid(t)
        return self.head(out.mean(1))


EXPECTED_RESIDUAL = {
    "input": ("input", (), ["c.weight"]),
    "c.weight": ("conv", (4, 1, 3, 3), ["c.bias"]),
    "c.bias": ("bias", (4,), ["bn.weight"]),
    "bn.weight": ("bn", (4,), ["bn.bias"]),
    "bn.bias": ("bias", (4,), ["c2.weight", "sum:0"]),
    "c2.weight": ("conv", (4, 4, 3, 3), ["sum:0"]),
    "sum:0": ("sum", (), ["global_pool:1"]),
    "global_pool:1": ("global_pool", (), ["fc.weight"]),
    "fc.weight": ("linear", (3, 4), ["fc.bias"]),
    "fc.bias": ("bias", (3,), []),
}

EXPECTED_BRANCHES = {
    "input": ("input", (), ["dil.weight", "dw.weight"]),
    "dw.weight": ("conv_dw", (2, 1, 3, 3), ["concat:0"]),
    "dil.weight": ("conv_dil", (2, 2, 3, 3), ["concat:0"]),
    "concat:0": ("concat", (), ["max_pool:1"]),
    "max_pool:1": ("max_pool", (), ["mul:3", "q.weight", "softmax:2"]),
    "q.weight": ("linear", (4, 4), ["softmax:2"]),
    "softmax:2": ("softmax", (), ["mul:3"]),
    "mul:3": ("mul", (), ["global_pool:4"]),
    "global_pool:4": ("global_pool", (), ["head.weight"]),
    "head.weight": ("linear", (5, 4), []),
}


@pytest.mark.parametrize(
    ("model_cls", "in_shape", "expected"),
    [(ConvResidual, (1, 6, 6), EXPECTED_RESIDUAL), (Branches, (2, 4, 4), EXPECTED_BRANCHES)],
    ids=["residual", "branches"],
)
def test_hand_made_graphs(model_cls, in_shape, expected):
    graph = model_to_graph(model_cls(), torch.randn(3, *in_shape))
    got = graph.to_dict()
    assert got == {k: (t, s, sorted(succ)) for k, (t, s, succ) in expected.items()}
    assert graph.unsupported == []
    assert graph.output_shape[-1] == (3 if model_cls is ConvResidual else 5)


def test_input_distances_and_degrees():
    graph = model_to_graph(ConvResidual(), torch.randn(2, 1, 6, 6))
    dist = dict(zip(graph.node_names, graph.input_dist.tolist(), strict=True))
    assert dist["input"] == 0 and dist["c2.weight"] == 5 and dist["sum:0"] == 5 and dist["fc.bias"] == 8
    deg_in, deg_out = graph.degrees()
    i = graph.node_names.index("sum:0")
    assert deg_in[i] == 2 and deg_out[i] == 1
    assert deg_out[graph.node_names.index("bn.bias")] == 2


def test_unused_and_5d_parameters_are_reported():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv3d(1, 2, 1)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x).flatten(1)

    graph = model_to_graph(M(), torch.randn(2, 1, 2, 2, 2))
    assert set(graph.unsupported) == {"used.weight", "unused.weight", "unused.bias"}
    assert "used.bias" in graph.param_names


def test_tracing_restores_mode_and_flags_and_buffers():
    m = ConvResidual().train()
    m.c.weight.requires_grad_(False)
    before = m.bn.running_mean.clone()
    model_to_graph(m, torch.randn(2, 1, 6, 6))
    assert m.training and not m.c.weight.requires_grad
    assert torch.equal(m.bn.running_mean, before)


def test_bad_example_inputs_raise():
    with pytest.raises(ValueError, match="example_inputs must be a batch tensor"):
        model_to_graph(ConvResidual(), torch.randn(6))


def _floyd(n, edges):
    inf = 10**9
    d = [[0 if i == j else inf for j in range(n)] for i in range(n)]
    for s, t in edges:
        d[s][t] = 1
    for k in range(n):
        for i in range(n):
            for j in range(n):
                d[i][j] = min(d[i][j], d[i][k] + d[k][j])
    return d


@pytest.mark.parametrize("cutoff", [1, 3, 50])
def test_shortest_paths_match_floyd_warshall(cutoff):
    g = torch.Generator().manual_seed(cutoff)
    n = 25
    edges = sorted({(i, j) for i in range(n) for j in range(i + 1, n) if torch.rand(1, generator=g) < 0.12})
    e = torch.tensor(edges).t()
    index, dist = shortest_paths(n, e, cutoff=cutoff)
    ref = _floyd(n, edges)
    got = {(int(i), int(j)): int(d) for (i, j), d in zip(index.t().tolist(), dist.tolist(), strict=True)}
    want = {(i, j): ref[i][j] for i in range(n) for j in range(n) if i != j and ref[i][j] <= cutoff}
    assert got == want


def test_deep_chain_traces_without_recursion_and_sparse_paths():
    depth = 1500
    model = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(depth)])
    graph = model_to_graph(model, torch.randn(2, 4), sp_cutoff=4)
    assert graph.num_nodes == depth + 1
    assert graph.sp_dist.numel() == sum(min(4, depth - i) for i in range(depth + 1))  # O(N * cutoff), not N^2
    assert all(PrimType.LINEAR.id == t for t in graph.node_types[1:].tolist())
