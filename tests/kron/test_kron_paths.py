"""Every activated-neuron path is exact on random data: against DenseSGD, against a hand-written
torch.kron SGD, and against each other (bit-identical); the automatic choice is deterministic."""

import math

import pytest
import torch

from quicktrain.kron import model as model_mod
from quicktrain.kron import search as search_mod
from quicktrain.kron.dense import DenseSGD
from quicktrain.kron.model import ConditionalInit, ExplicitInit, KronMLP, SeededInit
from quicktrain.kron.search import PATHS, BlockSearch, choose_path
from quicktrain.kron.sgd import KronSGD, initial_preactivations

F64 = torch.float64


def _random_problem(n, dims, m, seed, *, scale=1.0):
    """Random Gaussian factors of mixed norms, weights, ±1 signs and targets (no project generator)."""
    g = torch.Generator().manual_seed(seed)
    factors = tuple(torch.randn(n, k, generator=g, dtype=F64) * scale for k in dims)
    w0 = torch.randn(m, math.prod(dims), generator=g, dtype=F64)
    a = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(F64)
    y = torch.randn(n, generator=g, dtype=F64)
    return factors, y, w0, a, g


def _kron_sgd_step(w, a, factors, y, idx, b, lr):
    """Independent reference: explicit torch.kron inputs and the closed-form gradient, row by row."""
    x = torch.stack([_kron(*[f[i] for f in factors]) for i in idx.tolist()])
    z = x @ w.T  # [B, m]
    pred = torch.clamp(z - b, min=0) @ a / math.sqrt(w.shape[0])
    grad = ((pred - y[idx])[:, None] * (z > b) * a[None, :] / math.sqrt(w.shape[0])).T @ x
    return w - lr * grad, pred


def _close(got, ref, rtol=1e-12):
    """Max error ≤ rtol × the reference's scale (float64; weights may grow large under big steps)."""
    scale = max(ref.abs().max().item(), 1.0)
    err = (got - ref).abs().max().item()
    assert err <= rtol * scale, f"error {err:.3e} > {rtol * scale:.3e}"


def _kron(*vs):
    out = vs[0]
    for v in vs[1:]:
        out = torch.kron(out, v)
    return out


CASES = [
    # dims, n, m, batch, b, lr: K = 2 and K = 3, b = 0, large steps, batches bigger than n (duplicates)
    ((5, 7), 24, 160, 6, 0.8, 0.7),
    ((3, 4, 5), 18, 96, 5, 0.5, 1.5),
    ((6, 6), 12, 75, 20, 0.0, 0.4),
    ((4, 2, 3), 10, 301, 9, 1.7, 3.0),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"dims{c[0]}-b{c[4]}")
def test_every_path_equals_dense_and_torch_kron_sgd(path, case):
    dims, n, m, batch, b, lr = case
    factors, y, w0, a, g = _random_problem(n, dims, m, seed=len(dims) * 100 + m, scale=1.3)
    fast = KronSGD.from_weights(factors, y, w0, a, b=b, lr=lr, path=path)
    assert fast.path == path
    dense = DenseSGD(KronMLP(w0.clone(), a.clone(), b), factors, y, lr=lr)
    w_ref = w0.clone()
    for _ in range(8):
        idx = torch.randint(0, n, (batch,), generator=g)  # with replacement: duplicates
        w_ref, pred_ref = _kron_sgd_step(w_ref, a, factors, y, idx, b, lr)
        out, out_d = fast.step(idx), dense.step(idx)
        _close(out.pred, pred_ref)
        _close(out.pred, out_d.pred)
        _close(out.loss, out_d.loss)
    w = fast.weight(factors)
    _close(w, w_ref)
    _close(w, dense.model.weight.detach())
    assert not torch.equal(w, w0)  # training moved the weights
    torch.testing.assert_close(w0, _random_problem(n, dims, m, seed=len(dims) * 100 + m, scale=1.3)[2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_paths_give_bit_identical_trajectories(dtype):
    factors, y, w0, a, g = _random_problem(30, (6, 5), 700, seed=3)
    factors, y, w0, a = (tuple(f.to(dtype) for f in factors), y.to(dtype), w0.to(dtype), a.to(dtype))
    runs = {p: KronSGD.from_weights(factors, y, w0, a, b=1.2, lr=2.0, path=p) for p in PATHS}
    for _ in range(15):
        idx = torch.randint(0, 30, (7,), generator=g)
        outs = {p: t.step(idx) for p, t in runs.items()}
        for p in PATHS:
            assert torch.equal(outs[p].pred, outs["scan"].pred), p
            assert outs[p].n_active == outs["scan"].n_active and outs[p].n_touched == outs["scan"].n_touched
    for p in PATHS:
        assert torch.equal(runs[p].Z, runs["scan"].Z) and torch.equal(runs[p].coef, runs["scan"].coef), p


def test_block_bounds_stay_valid_and_queries_tighten_them():
    """M ≥ the true block maximum after every update, also under steps that move Z by O(1)."""
    factors, y, w0, a, g = _random_problem(40, (5, 5), 203, seed=4)  # 203: last block is partial
    fast = KronSGD.from_weights(factors, y, w0, a, b=0.9, lr=4.0, path="blocks")
    s = fast.search
    assert isinstance(s, BlockSearch)
    for _ in range(12):
        idx = torch.randint(0, 40, (6,), generator=g)
        fast.step(idx)
        exact = s.Z.view(s.nb, s.s, s.n).amax(dim=1).T
        assert bool((s.M >= exact).all())
        looked = s.M[idx] > s.b
        s.find(idx)
        assert torch.equal(s.M[idx][looked], exact[idx][looked])  # blocks a query gathers become exact
    assert float((s.M - s.Z.view(s.nb, s.s, s.n).amax(dim=1).T).max()) > 0  # some bounds are loose


def test_path_choice_is_deterministic_from_the_sizes():
    assert choose_path(65536, 256, 0.0176) == choose_path(65536, 256, 0.0176)
    assert choose_path(1024, 256, 0.0228)[0] == "scan"
    assert choose_path(16384, 256, 0.0228)[0] == "scan"
    assert choose_path(65536, 256, 0.0176)[0] == "scan"  # b = sqrt(0.4 ln m): q = 0.13
    assert choose_path(65536, 256, 0.0013)[0] == "blocks"  # b = 3
    assert choose_path(search_mod.BLOCKS_MIN_M - 1, 256, 1e-5)[0] == "scan"
    # the trainer applies the same rule to the measured fraction of Z(0) above b, and says so
    factors, y, w0, a, _ = _random_problem(16, (4, 4), 4096, seed=5)
    for b, want in [(0.5, "scan"), (12.0, "blocks")]:
        paths = {KronSGD.from_weights(factors, y, w0, a, b=b, lr=0.1).path for _ in range(2)}
        fast = KronSGD.from_weights(factors, y, w0, a, b=b, lr=0.1)
        assert paths == {want} and fast.path == choose_path(4096, 16, fast.active_fraction)[0]
        assert f"'{want}'" in repr(fast) and "q =" in fast.path_reason
    assert KronSGD.from_weights(factors, y, w0, a, b=0.5, lr=0.1, path="tree").path == "tree"
    with pytest.raises(ValueError, match="unknown path"):
        KronSGD.from_weights(factors, y, w0, a, b=0.5, lr=0.1, path="heap")


def test_from_weights_equals_the_seeded_trainer_on_its_weights():
    factors, y, _, _, g = _random_problem(20, (4, 5), 90, seed=6)
    seeded = KronSGD(factors, y, m=90, b=0.6, lr=0.9, seed=3)
    init = SeededInit(90, 20, 3)
    given = KronSGD.from_weights(factors, y, init.weight(), init.signs(), b=0.6, lr=0.9)
    torch.testing.assert_close(given.Z, seeded.Z, rtol=1e-14, atol=1e-14)
    for _ in range(5):
        idx = torch.randint(0, 20, (4,), generator=g)
        torch.testing.assert_close(given.step(idx).pred, seeded.step(idx).pred, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(given.weight(factors), seeded.weight(factors), rtol=1e-13, atol=1e-13)


def test_from_weights_rejects_bad_weights():
    factors, y, w0, a, _ = _random_problem(8, (3, 3), 10, seed=7)
    with pytest.raises(ValueError, match="W0 has 8 columns"):
        KronSGD.from_weights(factors, y, w0[:, :8], a, b=0.5, lr=0.1)
    with pytest.raises(ValueError, match="a must be a"):
        KronSGD.from_weights(factors, y, w0, a[:-1], b=0.5, lr=0.1)
    with pytest.raises(ValueError, match="non-finite data: W0"):
        KronSGD.from_weights(factors, y, w0.index_fill(1, torch.tensor([0]), float("nan")), a, b=0.5, lr=0.1)
    with pytest.raises(ValueError, match="W0 must be"):
        ExplicitInit(w0[0], a)


@pytest.mark.parametrize("chunk_elems", [1, 3000, 1 << 23])
def test_initial_preactivations_any_chunk_equal_explicit_contraction(chunk_elems):
    """Block-streamed, batched contraction == W(0) @ kron(x)^T in float64 (K = 3, m not a block multiple)."""
    factors, _, _, _, _ = _random_problem(11, (3, 4, 2), 150, seed=8)
    init = SeededInit(150, 24, seed=9)
    x = torch.stack([_kron(*[f[i] for f in factors]) for i in range(11)])
    z = initial_preactivations(init, factors, chunk_elems=chunk_elems)
    torch.testing.assert_close(z, init.weight() @ x.T, rtol=1e-13, atol=1e-13)
    # the seeded rows are the same whichever range they are drawn in, also drawn in place
    torch.testing.assert_close(init.rows(37, 130), init.weight()[37:130], rtol=0, atol=0)
    buf = torch.empty(150 - 144, 24, dtype=F64)
    torch.testing.assert_close(init.fill_(buf, 144), init.weight()[144:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="whole blocks of 16 rows"):
        init.fill_(torch.empty(16, 24, dtype=F64), 8)


def test_use_path_switches_without_changing_the_trajectory():
    factors, y, w0, a, g = _random_problem(20, (4, 4), 130, seed=10)
    straight = KronSGD.from_weights(factors, y, w0, a, b=0.7, lr=1.0, path="scan")
    switched = KronSGD.from_weights(factors, y, w0, a, b=0.7, lr=1.0, path="tree")
    for k in range(9):
        idx = torch.randint(0, 20, (5,), generator=g)
        switched.use_path(PATHS[k % len(PATHS)])
        assert torch.equal(switched.step(idx).pred, straight.step(idx).pred)
    assert switched.path == PATHS[8 % len(PATHS)] and "use_path" in switched.path_reason
    resumed = KronSGD.from_weights(factors, y, w0, a, b=0.7, lr=1.0)
    resumed.load_state_dict(switched.state_dict())
    assert resumed.path == switched.path and torch.equal(resumed.Z, straight.Z)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"dims{c[0]}-b{c[4]}")
def test_conditional_draw_equals_dense_and_torch_kron_sgd(case):
    """Seeded trainer with Z(0) ~ N(0, G): exact against both references from its materialised W(0)."""
    dims, n, m, batch, b, lr = case
    factors, y, _, _, g = _random_problem(n // 2, dims, m, seed=len(dims) * 10 + m)  # n/2 < d: G well-conditioned
    fast = KronSGD(factors, y, m=m, b=b, lr=lr, seed=7, draw="conditional")
    w0 = fast.init.weight()
    x = torch.stack([_kron(*[f[i] for f in factors]) for i in range(n // 2)])
    _close(w0 @ x.T, fast.Z)  # the materialised W(0) reproduces the drawn Z(0)
    dense = DenseSGD(KronMLP.from_init(fast.init, b=b), factors, y, lr=lr)
    w_ref, a = w0.clone(), fast.a
    for _ in range(8):
        idx = torch.randint(0, n // 2, (batch,), generator=g)  # with replacement: duplicates
        w_ref, pred_ref = _kron_sgd_step(w_ref, a, factors, y, idx, b, lr)
        out, out_d = fast.step(idx), dense.step(idx)
        _close(out.pred, pred_ref)
        _close(out.pred, out_d.pred)
        _close(out.loss, out_d.loss)
    _close(fast.weight(factors), w_ref)
    _close(fast.weight(factors), dense.model.weight.detach())


def test_conditional_rows_are_standard_gaussian():
    """Rows of the conditional W(0) have covariance I_d, also along the data (a missing −Ξ Xᵀ would give I + P)."""
    factors, y, _, _, _ = _random_problem(5, (3, 4), 1, seed=11)
    m = 6000
    init = ConditionalInit.draw(SeededInit(m, 12, seed=2), factors)
    w = init.weight()
    cov = w.T @ w / m
    # entries of a sample covariance of m standard rows have sd ≤ sqrt(2/m) ≈ 0.018; 6 sd
    assert (cov - torch.eye(12, dtype=F64)).abs().max() < 6 * math.sqrt(2 / m)
    assert w.mean(dim=0).abs().max() < 6 / math.sqrt(m)
    # and it is a different sample from the full draw of the same seed (same law)
    assert not torch.allclose(w, SeededInit(m, 12, seed=2).weight())


def test_seeded_draws_are_deterministic_and_range_independent(monkeypatch):
    factors, y, _, _, _ = _random_problem(10, (4, 6), 1, seed=12)
    runs = [KronSGD(factors, y, m=70, b=0.3, lr=0.5, seed=s, draw="conditional") for s in (4, 4, 5)]
    assert torch.equal(runs[0].Z, runs[1].Z) and not torch.equal(runs[0].Z, runs[2].Z)
    init = runs[0].init
    monkeypatch.setattr(model_mod, "_GROUP_ELEMS", 24 * 32)  # groups of 32 rows: the range spans two
    assert init.group_rows == 32
    torch.testing.assert_close(init.rows(19, 53), init.weight()[19:53], rtol=0, atol=0)
    x = torch.stack([_kron(*[f[i] for f in factors]) for i in range(10)])
    _close(init.weight() @ x.T, runs[0].Z)
    for draw in ("full", "conditional"):
        a, b = (KronSGD(factors, y, m=70, b=0.3, lr=0.5, seed=4, draw=draw) for _ in range(2))
        for k in range(4):
            idx = torch.tensor([k, k + 3, k])
            assert torch.equal(a.step(idx).pred, b.step(idx).pred)
        assert torch.equal(a.weight(factors), b.weight(factors))


def test_draw_choice_and_its_errors():
    factors, y, _, _, _ = _random_problem(10, (4, 6), 1, seed=13)
    # few points, large d: conditional; more points than d: full (G singular, and not cheaper)
    assert KronSGD(factors, y, m=500, b=0.3, lr=0.5).draw == "conditional"
    many, y_many, _, _, _ = _random_problem(40, (4, 6), 1, seed=13)
    full = KronSGD(many, y_many, m=500, b=0.3, lr=0.5)
    assert full.draw == "full" and "not 4x below" in full.draw_reason
    with pytest.raises(ValueError, match=r"condition number \S+ > 1000 .* use draw=.full."):
        KronSGD(many, y_many, m=500, b=0.3, lr=0.5, draw="conditional")
    with pytest.raises(ValueError, match="unknown draw 'exact'"):
        KronSGD(factors, y, m=5, b=0.3, lr=0.5, draw="exact")
    # cheap but ill-conditioned (two nearly equal points): auto falls back to the full draw
    close = tuple(torch.cat([f, f[:1] + 1e-6]) for f in factors)
    fallback = KronSGD(close, torch.cat([y, y[:1]]), m=500, b=0.3, lr=0.5)
    assert fallback.draw == "full" and "cond(G)" in fallback.draw_reason
    assert KronSGD.from_weights(factors, y, torch.zeros(3, 24, dtype=F64), torch.ones(3, dtype=F64),
                                b=0.3, lr=0.5).draw == "given"
