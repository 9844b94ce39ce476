"""The asynchronous tree's query must equal a brute-force scan after every update."""

import pytest
import torch

from quicktrain.kron.tree import AsynchronousTree

CASES = [
    {"m": 1, "n": 3, "b": 0.0, "seed": 0},
    {"m": 2, "n": 1, "b": 0.5, "seed": 1},
    {"m": 5, "n": 4, "b": 0.3, "seed": 2},
    {"m": 64, "n": 9, "b": 1.0, "seed": 3},
    {"m": 100, "n": 7, "b": 2.0, "seed": 4},
    {"m": 257, "n": 5, "b": 1.5, "seed": 5},
]


def _assert_query_equals_brute(tree, points):
    got = tree.query(points)
    ref = tree.query_brute(points)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c['m']}-n{c['n']}-b{c['b']}")
def test_query_equals_brute_force_after_every_update(case, dtype):
    g = torch.Generator().manual_seed(case["seed"])
    m, n, b = case["m"], case["n"], case["b"]
    tree = AsynchronousTree(torch.randn(m, n, generator=g, dtype=dtype), b)
    all_points = torch.arange(n)
    _assert_query_equals_brute(tree, all_points)
    for it in range(40):
        k = int(torch.randint(1, m + 1, (1,), generator=g))
        neurons = torch.randperm(m, generator=g)[:k]
        if it % 3 == 0:  # set, with some leaves exactly at the threshold (must not be reported)
            vals = torch.randn(k, n, generator=g, dtype=dtype) * 2
            vals[vals.abs() < 0.3] = b
            tree.set_(neurons, vals)
        else:
            tree.add_(neurons, torch.randn(k, n, generator=g, dtype=dtype))
        _assert_query_equals_brute(tree, all_points)
        points = torch.randint(0, n, (3,), generator=g)  # duplicates allowed
        _assert_query_equals_brute(tree, points)
        torch.testing.assert_close(tree.T[1], tree.leaves.max(dim=0).values, rtol=0, atol=0)


def test_doc_example_and_counts():
    z = torch.tensor([[0.0, 3.0], [2.0, 0.0], [5.0, 1.0]])
    tree = AsynchronousTree(z, b=1.5)
    pos, neuron = tree.query(torch.tensor([0, 1]))
    assert pos.tolist() == [0, 0, 1] and neuron.tolist() == [1, 2, 0]
    assert tree.active_counts().tolist() == [2, 1]


def test_state_roundtrip():
    tree = AsynchronousTree(torch.randn(9, 3, dtype=torch.float64), 0.2)
    tree.add_(torch.tensor([3, 1]), torch.ones(2, 3, dtype=torch.float64))
    copy = AsynchronousTree.from_state_dict(tree.state_dict())
    torch.testing.assert_close(copy.T, tree.T, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: t.add_(torch.tensor([1, 1]), torch.zeros(2, 3)), "unique"),
        (lambda t: t.add_(torch.tensor([9]), torch.zeros(1, 3)), r"\[0, 5\)"),
        (lambda t: t.set_(torch.tensor([1]), torch.zeros(2, 3)), "shape"),
    ],
)
def test_update_errors(call, match):
    tree = AsynchronousTree(torch.zeros(5, 3), 0.0)
    with pytest.raises(ValueError, match=match):
        call(tree)


def test_bad_construction():
    with pytest.raises(ValueError, match="b must be a finite number >= 0"):
        AsynchronousTree(torch.zeros(3, 2), -0.1)
    with pytest.raises(ValueError, match=r"\[m, n\]"):
        AsynchronousTree(torch.zeros(3), 0.0)
