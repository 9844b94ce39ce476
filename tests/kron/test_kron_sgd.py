"""Kronecker SGD equals the dense torch.kron reference step by step (predictions, losses, W)."""

import math

import pytest
import torch

from quicktrain.kron._math import kron_rows
from quicktrain.kron.data import batch_schedule, make_teacher
from quicktrain.kron.dense import DenseSGD
from quicktrain.kron.model import KronMLP
from quicktrain.kron.sgd import KronSGD

CASES = [
    {"m": 64, "dims": (4, 6), "n": 20, "batch": 4, "b": 0.5, "lr": 0.5, "steps": 12, "seed": 0},
    {"m": 200, "dims": (8, 12), "n": 48, "batch": 8, "b": 1.0, "lr": 1.0, "steps": 15, "seed": 1},
    {"m": 33, "dims": (16, 16), "n": 30, "batch": 30, "b": 0.0, "lr": 0.3, "steps": 8, "seed": 2},
    {"m": 512, "dims": (10, 10), "n": 40, "batch": 5, "b": 2.0, "lr": 2.0, "steps": 15, "seed": 3},
    {"m": 96, "dims": (3, 4, 5), "n": 25, "batch": 6, "b": 0.8, "lr": 0.7, "steps": 10, "seed": 4},
    {"m": 128, "dims": (32,), "n": 16, "batch": 1, "b": 0.3, "lr": 0.5, "steps": 10, "seed": 5},
]
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-4}}


def _pair(case, dtype, device="cpu", draw="auto"):
    ds = make_teacher(case["n"], case["dims"], seed=case["seed"], dtype=dtype).to(device=device)
    fast = KronSGD(ds.factors, ds.y, m=case["m"], b=case["b"], lr=case["lr"], seed=case["seed"] + 10, draw=draw)
    assert draw == "auto" or fast.draw == draw
    model = KronMLP.from_init(fast.init, b=case["b"], dtype=dtype, device=device)
    dense = DenseSGD(model, ds.factors, ds.y, lr=case["lr"])
    return ds, fast, dense


def _assert_rel(got, ref, rtol, atol):
    """Max error relative to the reference scale (float32 criterion: ≤1e-4 relative)."""
    scale = max(ref.abs().max().item(), 1.0)
    err = (got - ref).abs().max().item()
    assert err <= atol + rtol * scale, f"error {err:.3e} > {atol + rtol * scale:.3e}"


def _run_and_compare(case, dtype, device="cpu", draw="auto"):
    ds, fast, dense = _pair(case, dtype, device, draw)
    tol = TOL[dtype]
    x = ds.x()
    _assert_rel(fast.Z, dense.model.weight.detach() @ x.T, **tol)
    for idx in batch_schedule(case["n"], case["batch"], case["steps"], seed=case["seed"]):
        idx = idx.to(device)
        out_f, out_d = fast.step(idx), dense.step(idx)
        assert out_f.pred.dtype == dtype and out_f.pred.device == out_d.pred.device
        _assert_rel(out_f.pred, out_d.pred, **tol)
        _assert_rel(out_f.loss, out_d.loss, **tol)
        _assert_rel(fast.weight(ds.factors), dense.model.weight.detach(), **tol)
        # the search still reports exactly the entries of Z above b
        everyone = torch.arange(case["n"], device=device)
        act = fast.search.find(everyone)
        pos, neuron = torch.nonzero(fast.Z[:, everyone].T > case["b"], as_tuple=True)
        assert torch.equal(act.pos, pos) and torch.equal(act.neuron, neuron)
    # the maintained pre-activations are the dense ones after training
    _assert_rel(fast.Z, dense.model.weight.detach() @ x.T, **tol)
    return ds, fast, dense


@pytest.mark.parametrize("draw", ["full", "conditional"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"m{c['m']}-d{math.prod(c['dims'])}-B{c['batch']}-b{c['b']}"
)
def test_fast_equals_dense_every_step(case, dtype, draw):
    """Both seeded draws: the dense reference starts from the materialised W(0) of the trainer's init."""
    _run_and_compare(case, dtype, draw=draw)


def test_training_moves_and_reduces_loss():
    case = {"m": 256, "dims": (8, 8), "n": 32, "batch": 32, "b": 0.5, "lr": 1.0, "steps": 1, "seed": 7}
    ds, fast, _ = _pair(case, torch.float64)
    all_idx = torch.arange(ds.n)
    first = fast.step(all_idx).loss.item()
    for _ in range(30):
        last = fast.step(all_idx).loss.item()
    assert last < 0.5 * first
    assert fast.steps == 31


def test_duplicate_indices_in_batch():
    case = {"m": 80, "dims": (5, 5), "n": 10, "batch": 4, "b": 0.3, "lr": 0.5, "steps": 1, "seed": 8}
    ds, fast, dense = _pair(case, torch.float64)
    for idx in [torch.tensor([1, 1, 2, 9]), torch.tensor([3, 3, 3, 0])]:
        _assert_rel(fast.step(idx).pred, dense.step(idx).pred, **TOL[torch.float64])
    _assert_rel(fast.weight(ds.factors), dense.model.weight.detach(), **TOL[torch.float64])


@pytest.mark.parametrize("draw", ["full", "conditional"])
def test_module_predict_new_and_predict(draw):
    case = {"m": 150, "dims": (6, 7), "n": 30, "batch": 6, "b": 0.7, "lr": 0.8, "steps": 10, "seed": 9}
    ds, fast, dense = _run_and_compare(case, torch.float64, draw=draw)
    new = make_teacher(11, case["dims"], seed=99)
    model = fast.model(ds.factors)
    assert isinstance(model, torch.nn.Module)
    _assert_rel(model(new.x()), dense.model(new.x()).detach(), **TOL[torch.float64])
    _assert_rel(
        fast.predict_new(new.factors, ds.factors), dense.model(new.x()).detach(), **TOL[torch.float64]
    )
    idx = torch.arange(ds.n)
    _assert_rel(fast.predict(idx), dense.predict(idx), **TOL[torch.float64])


@pytest.mark.parametrize("draw", ["full", "conditional"])
def test_resume_equals_straight_run(draw):
    case = {"m": 120, "dims": (6, 6), "n": 24, "batch": 6, "b": 0.6, "lr": 0.8, "steps": 1, "seed": 11}
    ds = make_teacher(case["n"], case["dims"], seed=1)
    sched = batch_schedule(case["n"], case["batch"], 10, seed=0)
    straight = KronSGD(ds.factors, ds.y, m=120, b=0.6, lr=0.8, seed=5, draw=draw)
    for idx in sched:
        straight.step(idx)
    first = KronSGD(ds.factors, ds.y, m=120, b=0.6, lr=0.8, seed=5, draw=draw)
    for idx in sched[:5]:
        first.step(idx)
    resumed = KronSGD(ds.factors, ds.y, m=120, b=0.6, lr=0.8, seed=123)
    resumed.load_state_dict(first.state_dict())
    assert resumed.draw == draw
    for idx in sched[5:]:
        resumed.step(idx)
    torch.testing.assert_close(resumed.Z, straight.Z, rtol=0, atol=0)
    torch.testing.assert_close(resumed.weight(ds.factors), straight.weight(ds.factors), rtol=0, atol=0)
    assert resumed.steps == 10


def test_state_has_no_d_dependence():
    """Nothing the step touches has d in its shape: d=16 and d=4096 trainers hold same-size state."""
    sizes = []
    for dims in [(4, 4), (64, 64)]:
        ds = make_teacher(20, dims, seed=0)
        fast = KronSGD(ds.factors, ds.y, m=50, b=0.5, lr=0.1)
        fast.step(torch.arange(5))
        tensors = {k: v for k, v in vars(fast).items() if isinstance(v, torch.Tensor)}
        tensors["Z"] = fast.Z
        assert not any(math.prod(dims) in t.shape for t in tensors.values())
        sizes.append({k: tuple(v.shape) for k, v in tensors.items()})
    assert sizes[0] == sizes[1]


def _z_test(count, trials, p):
    return abs(count - trials * p) / math.sqrt(trials * p * (1 - p))


@pytest.mark.parametrize("draw", ["full", "conditional"])
@pytest.mark.parametrize("b", [0.0, 0.5, 1.0, 2.0])
def test_active_counts_at_init_match_gaussian_tail(b, draw):
    """|S_i| ~ Binomial(m, P(N(0,1) > b)) exactly for unit-norm x_i (since ⟨w_r, x_i⟩ ~ N(0,1))."""
    m, n = 4000, 40
    p = 0.5 * math.erfc(b / math.sqrt(2))
    ds = make_teacher(n, (10, 10), seed=3)
    fast = KronSGD(ds.factors, ds.y, m=m, b=b, lr=0.1, seed=4, draw=draw)
    counts = (fast.Z > b).sum(dim=0)
    # each point: exact binomial marginal; Bonferroni over n points at family-wise alpha ~ 1e-6 -> |z| < 6.1
    assert max(_z_test(c, m, p) for c in counts.tolist()) < 6.1
    # orthonormal inputs (x_i = e_a ⊗ e_c) make the points independent: pooled count ~ Binomial(n m, p)
    eye = torch.eye(8, dtype=torch.float64)
    a_idx, c_idx = torch.arange(64) // 8, torch.arange(64) % 8
    ortho = KronSGD(
        (eye[a_idx], eye[c_idx]), torch.zeros(64, dtype=torch.float64), m=m, b=b, lr=0.1, seed=5, draw=draw
    )
    pooled = int((ortho.Z > b).sum())
    assert _z_test(pooled, 64 * m, p) < 5.0
    # the search reports the same sets as the count
    pos = ortho.search.find(torch.arange(64)).pos
    assert pos.numel() == pooled


ERRORS = [
    ("factor shape mismatch", lambda U, V, y: KronSGD((U, V[:-1]), y, m=8, b=0.5, lr=0.1)),
    (
        "non-finite data",
        lambda U, V, y: KronSGD((U.index_fill(0, torch.tensor([2]), float("nan")), V), y, m=8, b=0.5, lr=0.1),
    ),
    (
        "non-finite data",
        lambda U, V, y: KronSGD((U, V), y.index_fill(0, torch.tensor([0]), float("inf")), m=8, b=0.5, lr=0.1),
    ),
    ("b must be a finite number >= 0", lambda U, V, y: KronSGD((U, V), y, m=8, b=-0.1, lr=0.1)),
    ("b must be a finite number >= 0", lambda U, V, y: KronSGD((U, V), y, m=8, b=float("nan"), lr=0.1)),
    ("lr must be", lambda U, V, y: KronSGD((U, V), y, m=8, b=0.5, lr=0.0)),
    ("m must be a positive int", lambda U, V, y: KronSGD((U, V), y, m=0, b=0.5, lr=0.1)),
    ("2-D", lambda U, V, y: KronSGD((U, V[:, 0]), y, m=8, b=0.5, lr=0.1)),
    ("dtype mismatch", lambda U, V, y: KronSGD((U, V.float()), y, m=8, b=0.5, lr=0.1)),
    ("targets y", lambda U, V, y: KronSGD((U, V), y[:-1], m=8, b=0.5, lr=0.1)),
    ("non-empty sequence", lambda U, V, y: KronSGD(U, y, m=8, b=0.5, lr=0.1)),
]


@pytest.mark.parametrize(("match", "make"), ERRORS, ids=[e[0] + str(i) for i, e in enumerate(ERRORS)])
def test_bad_inputs_raise_clear_errors(match, make):
    ds = make_teacher(10, (3, 4), seed=0)
    with pytest.raises(ValueError, match=match):
        make(*ds.factors, ds.y)


def test_bad_step_and_materialise_inputs():
    ds = make_teacher(10, (3, 4), seed=0)
    fast = KronSGD(ds.factors, ds.y, m=8, b=0.5, lr=0.1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        fast.step(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        fast.step(torch.tensor([0.5]))
    other = make_teacher(10, (3, 4), seed=1)
    with pytest.raises(ValueError, match="Gram matrix"):
        fast.weight(other.factors)
    with pytest.raises(ValueError, match="dims"):
        fast.weight((ds.factors[0], ds.factors[1][:, :2]))
    with pytest.raises(ValueError, match="does not match"):
        DenseSGD(
            KronMLP(torch.zeros(4, 5, dtype=torch.float64), torch.ones(4), 0.1), ds.factors, ds.y, lr=0.1
        )


def test_dense_uses_explicit_kron():
    ds = make_teacher(5, (2, 3), seed=0)
    x = ds.x()
    for i in range(5):
        torch.testing.assert_close(x[i], torch.kron(ds.factors[0][i], ds.factors[1][i]), rtol=0, atol=0)
    torch.testing.assert_close(kron_rows(ds.factors), x)


DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fast_equals_dense_on_the_default_device(dtype):
    """On a CUDA machine this checks the GPU path; elsewhere it repeats the CPU check."""
    for case in CASES[:4]:
        ds, fast, _ = _run_and_compare(case, dtype, device=DEFAULT_DEVICE)
        assert {t.device.type for t in (fast.Z, fast.coef, fast.gram)} == {DEFAULT_DEVICE}
