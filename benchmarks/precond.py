"""Benchmark: quicktrain.precond methods — step cost vs SGD, and side by side with ASDL.

1. Per-step time and peak memory of every method relative to plain SGD on the same model and batch
   (resnet20 and mobilenetv2_tiny on 3×32×32, an MLP on 1×28×28; batch 128), at update interval 1 and 10
   (``curvature_interval = inverse_interval``). Methods whose representation cannot hold a model (dense
   Fisher/Hessian of 10⁵+ parameters) are listed as n/a with the reason.
2. Side by side with ASDL (``asdfghjkl`` 0.1a5, imported from ``benchmarks/.venv-asdl``) on identical
   configurations: K-FAC, Shampoo, K-BFGS, natural gradient (full, layer-wise, unit-wise, diagonal) and
   CurveBall. Same model copy, same batch, same damping; reports the max relative difference of the
   preconditioned gradients at the first step and the per-step time of both (ASDL's failures are table rows).
4. K-FAC against ASDL at batch 128 on ``resnet20`` and ``cnn`` (fashion-mnist shape, its ``Linear(3136, 128)``
   included), empirical and Monte-Carlo Fisher: step time at intervals 1 and 10, in turns, and the peak
   resident memory of a first update step, each maker in a fresh process. In the same turns, quicktrain's
   K-FAC with factors from a sub-batch (``statistics_fraction``, ``--statistics-fraction``), reported apart.
3. Time to accuracy on ``digits`` and ``fashion-mnist`` (``cnn``): SGD, AdamW, K-FAC, Shampoo and PSGD, each
   with a two-point learning-rate grid, through the training loop (``quicktrain report`` plots in the results).

Install ASDL into the benchmark's own environment (not the project venv), once::

    .venv/bin/pip install --target benchmarks/.venv-asdl --no-deps asdfghjkl==0.1a5

Usage::

    .venv/bin/python benchmarks/precond.py --part 1 2 --device cuda                  # batch 128 everywhere
    .venv/bin/python benchmarks/precond.py --part 1 --device cpu --steps 3            # CPU, batch 128, ~30 min
    .venv/bin/python benchmarks/precond.py --part 2 --device cpu --cnn-batch 32 --steps 7   # CPU, ~2 min
    .venv/bin/python benchmarks/precond.py --part 1 --quick                           # CPU smoke run
    .venv/bin/python benchmarks/precond.py --part 3 --device cpu                      # time to accuracy
    .venv/bin/python benchmarks/precond.py --part 4 --device cpu --steps 4            # K-FAC vs ASDL, ~6 min

Timing: contenders on the same model and batch (a method and plain SGD in part 1, quicktrain and ASDL in part
2) run their steps in turns, A B A B ..., so that other load on a shared machine hits them alike; each time is
the median of individually timed steps after one burn-in step, on one CPU thread unless ``--threads`` says
otherwise. Update steps (curvature and inverse refreshed) are timed with interval 1 and plain steps with
interval 10; interval ``k`` costs ``(t_update + (k-1) t_plain) / k`` per step (see :func:`schedule_ms`). Peak
memory counts everything alive during an update step: on CUDA the peak allocated with only the measured maker
alive, on CPU the peak resident size of a first update step in a fresh process (model, batch, state,
activations and temporaries, above the process after import; Linux only). ``state_mb`` is the size of the
maker's state (statistics and inverses).

Prints Markdown tables; writes ``benchmarks/results/precond_step{tag}.csv`` and
``benchmarks/results/precond_asdl{tag}.csv``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from quicktrain import precond, report
from quicktrain.compose import build_hooks
from quicktrain.models import get_model
from quicktrain.report import records_markdown, write_records_csv
from quicktrain.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parent
MODELS = {"resnet20": (3, 32, 32), "mobilenetv2_tiny": (3, 32, 32), "mlp": (1, 28, 28), "cnn": (1, 28, 28)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _data(shape, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def time_steps(steps: list, device: torch.device, burn_in: int, n: int) -> list[tuple[float, float]]:
    """Median ms of ``n`` individually timed calls of each step function, called in turns (A B A B ...) after
    ``burn_in`` calls each, so that other load on a shared machine hits all of them alike; and each one's peak
    MB allocated while it ran (CUDA; all live tensors count, nan on CPU)."""
    for step in steps:
        for _ in range(burn_in):
            step()
    _sync(device)
    times = [[] for _ in steps]
    peaks = [0.0 for _ in steps]
    for _ in range(n):
        for i, step in enumerate(steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[i].append((time.perf_counter() - t0) * 1e3)
            if device.type == "cuda":
                peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device) / 2**20)
    return [
        (statistics.median(t), pk if device.type == "cuda" else float("nan"))
        for t, pk in zip(times, peaks, strict=True)
    ]


def schedule_ms(make_steps, device: torch.device, intervals: list[int], steps: int) -> list[tuple[dict, float]]:
    """ms/step at each update interval from separately timed update and plain steps, for several step
    functions timed in turns.

    ``make_steps(k)`` builds fresh step functions (one per contender) whose makers refresh curvature and
    inverse every ``k`` steps. Update steps are timed at ``k = 1`` (after one burn-in step), plain steps at
    ``k = max(intervals)`` (steps 1…, which refresh nothing); the mean over a schedule of interval ``k`` is
    ``(t_update + (k-1) t_plain) / k``. This needs a handful of steps per method, so the slow CPU runs stay
    affordable, and is exact for a fixed schedule. A contender whose ``make_steps(k)`` raises ``ValueError``
    for ``k > 1`` (matrix-free methods that refresh every step) gets only ``k = 1``.

    Returns:
        per contender ``({k: ms_per_step}, peak_mb of its update steps)``.
    """
    update = time_steps(make_steps(1), device, 1, steps)
    out = [({1: t}, peak) for t, peak in update]
    longest = max(intervals)
    if longest > 1:
        try:
            plain = time_steps(make_steps(longest), device, 1, min(steps, longest - 1))
        except ValueError:  # the method refreshes at every step (newton_cg, curveball): other intervals are n/a
            return out
        for (times, _), (t_plain, _) in zip(out, plain, strict=True):
            t_update = times[1]
            times.update({k: (t_update + (k - 1) * t_plain) / k for k in intervals if k > 1})
    return out


def peak_mb(step, device: torch.device) -> float:
    """Peak MB allocated during one step after a burn-in step, counting everything alive (CUDA)."""
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _proc_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":"))) / 1024


def _cpu_peak_main(mname: str, method: str, batch: int) -> float:
    """Body of :func:`cpu_peak_mb` (runs in a fresh process)."""
    torch.set_num_threads(1)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size (VmHWM) to the current one
    base = _proc_mb("VmRSS")
    shape = MODELS[mname]
    x, y = _data(shape, batch, torch.device("cpu"))
    model = get_model(mname, num_classes=10, in_shape=shape)
    maker = precond.make(method, model, nn.CrossEntropyLoss(), damping=1e-3)
    _maker_step(maker, model, x, y)()
    return _proc_mb("VmHWM") - base


KFAC_VS_ASDL_MODELS = {"resnet20": (3, 32, 32), "cnn": (1, 28, 28)}


def _kfac_ours(fisher: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, fraction: float = 1.0):
    """quicktrain's K-FAC step function in ASDL's configuration, on a copy of ``model`` (``fraction < 1``: the
    factors from a sub-batch, ``statistics_fraction``, which ASDL does not have)."""
    m1 = copy.deepcopy(model)
    ours = precond.make("kfac", m1, nn.CrossEntropyLoss(), damping=1e-3, fisher_type=fisher, ema_decay=0.0,
                        bias="separate", curvature_interval=k, inverse_interval=k, statistics_fraction=fraction)
    return _maker_step(ours, m1, x, y)


def _kfac_pair(asdl, fisher: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int):
    """(quicktrain, ASDL) K-FAC step functions of one configuration, on copies of ``model``."""
    m2 = copy.deepcopy(model)
    types = {"emp": asdl.FISHER_EMP, "mc": asdl.FISHER_MC}
    cfg = {"damping": 1e-3, "data_size": x.shape[0], "preconditioner_upd_interval": k, "curvature_upd_interval": k}
    return _kfac_ours(fisher, model, x, y, k), _asdl_step(asdl, asdl.KfacGradientMaker, m2, x, y, cfg,
                                                          {"fisher_type": types[fisher]})[1]


def _kfac_peak_main(who: str, mname: str, fisher: str, batch: int) -> float:
    """Body of :func:`kfac_peak_mb` (runs in a fresh process)."""
    torch.set_num_threads(1)
    asdl = _asdl()
    Path("/proc/self/clear_refs").write_text("5")
    base = _proc_mb("VmRSS")
    shape = KFAC_VS_ASDL_MODELS[mname]
    x, y = _data(shape, batch, torch.device("cpu"))
    model = get_model(mname, num_classes=10, in_shape=shape)
    ours, theirs = _kfac_pair(asdl, fisher, model, x, y, 1)
    del model
    (ours if who == "quicktrain" else theirs)()
    return _proc_mb("VmHWM") - base


def _fresh(fn: str, *args: object) -> float:
    """``fn(*args)`` of this file, run in a fresh Python process; its float result."""
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('bench_precond', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        f"print('@@', m.{fn}(*[int(a) if a.isdigit() else a for a in sys.argv[2:]]))"
    )
    done = subprocess.run([sys.executable, "-c", code, __file__, *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{fn}{args} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split("@@")[-1])


def kfac_peaks_mb(mname: str, fisher: str, batch: int, repeats: int) -> dict[str, list[float]]:
    """Peak resident MB of a first K-FAC update step, quicktrain's and ASDL's, each in ``repeats`` fresh processes
    run in alternation: one resident-size reading moves by ±10% between identical runs (the allocator's
    arenas), so the ratio is taken between medians."""
    peaks: dict[str, list[float]] = {"quicktrain": [], "asdl": []}
    for _ in range(repeats):
        for who in peaks:
            peaks[who].append(_fresh("_kfac_peak_main", who, mname, fisher, batch))
    return peaks


def part4(batch: int, steps: int, intervals: list[int], fraction: float, mem_repeats: int) -> list[dict]:
    """K-FAC against ASDL: ms/step at each interval (in turns) and peak resident MB (median of ``mem_repeats``
    fresh processes each), CPU. A third contender in the same turns, quicktrain with
    ``statistics_fraction=fraction``, is reported in columns of its own (``sub_*``): a different estimator, not
    ASDL's configuration."""
    asdl = _asdl()
    rows = []
    for mname, shape in KFAC_VS_ASDL_MODELS.items():
        model = get_model(mname, num_classes=10, in_shape=shape)
        x, y = _data(shape, batch, torch.device("cpu"), seed=1)
        for fisher in ("emp", "mc"):
            (t_ours, _), (t_asdl, _), (t_sub, _) = schedule_ms(
                lambda k, fisher=fisher, model=model, x=x, y=y: [*_kfac_pair(asdl, fisher, model, x, y, k),
                                                                 _kfac_ours(fisher, model, x, y, k, fraction)],
                torch.device("cpu"), intervals, steps)
            peaks = kfac_peaks_mb(mname, fisher, batch, mem_repeats)
            peak = {who: statistics.median(v) for who, v in peaks.items()}
            for k in intervals:
                rows.append({"model": mname, "fisher": fisher, "batch": batch, "interval": k,
                             "quicktrain_ms": round(t_ours[k], 1), "asdl_ms": round(t_asdl[k], 1),
                             "x_asdl_time": round(t_ours[k] / t_asdl[k], 3),
                             "quicktrain_peak_mb": round(peak["quicktrain"], 1), "asdl_peak_mb": round(peak["asdl"], 1),
                             "x_asdl_mem": round(peak["quicktrain"] / peak["asdl"], 3),
                             "quicktrain_peaks_mb": " ".join(f"{v:.0f}" for v in peaks["quicktrain"]),
                             "asdl_peaks_mb": " ".join(f"{v:.0f}" for v in peaks["asdl"]),
                             "sub_fraction": fraction, "sub_ms": round(t_sub[k], 1),
                             "sub_x_asdl_time": round(t_sub[k] / t_asdl[k], 3)})
                print(f"  {rows[-1]}", flush=True)
    return rows


def cpu_peak_mb(mname: str, method: str, batch: int) -> float:
    """Peak resident MB of a first update step (model, batch, the maker's state, activations, temporaries) above
    the process right after import, in a fresh process (Linux: ``VmHWM`` reset through ``clear_refs``)."""
    return _fresh("_cpu_peak_main", mname, method, batch)


def state_mb(maker) -> float:
    """Megabytes of tensors in the maker's state (statistics, inverses, ...)."""

    def walk(o):
        if isinstance(o, torch.Tensor):
            return o.numel() * o.element_size()
        if isinstance(o, dict):
            return sum(walk(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(walk(v) for v in o)
        return 0

    return walk(maker.state_dict()) / 2**20


def _maker_step(maker, model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        maker.forward_backward(x, y)
        opt.step()

    return step


# ---------------------------------------------------------------------------------------------- part 1
def part1(
    device: torch.device,
    batch: int,
    intervals: list[int],
    steps: int,
    models: list[str],
    methods: list[str],
    cnn_batch: int | None = None,
) -> list[dict]:
    rows = []
    for mname in models:
        shape = MODELS[mname]
        b = batch if mname == "mlp" or cnn_batch is None else cnn_batch
        x, y = _data(shape, b, device)
        base = get_model(mname, num_classes=10, in_shape=shape).to(device)
        nparams = sum(p.numel() for p in base.parameters())
        sgd_peak = float("nan")
        for name in methods:
            made = {}

            def make_steps(k, name=name, base=base, x=x, y=y, made=made):
                """The method's step and, in turns with it, plain SGD on its own copy (the ratio's baseline)."""
                steps = []
                for method in dict.fromkeys(["sgd", name]):
                    model = copy.deepcopy(base)
                    maker = precond.make(
                        method, model, nn.CrossEntropyLoss(), damping=1e-3, curvature_interval=k, inverse_interval=k
                    )
                    made[method] = (maker, model)
                    steps.append(_maker_step(maker, model, x, y))
                return steps

            try:
                timed = schedule_ms(make_steps, device, intervals, steps)
                (sgd_times, _), (times, _) = timed[0], timed[-1]
                maker, model = made[name]
                smb, note = state_mb(maker), ""
                made.clear()  # peak memory is read with only this method's model and state alive
                if device.type == "cuda":
                    peak = peak_mb(_maker_step(maker, model, x, y), device)
                else:
                    peak = cpu_peak_mb(mname, name, b)
                if name == "sgd":
                    sgd_peak = peak
            except Exception as e:  # noqa: BLE001 - e.g. a representation that cannot hold this model
                times, sgd_times, peak, smb = {}, {}, float("nan"), float("nan")
                note = str(e).split(";")[0][:90]
            del made
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for interval in intervals:
                ms = times.get(interval, float("nan"))
                if interval not in times and not note:
                    note = f"interval {interval} not supported (matrix-free, refreshed every step)"
                ms0 = sgd_times.get(1, float("nan"))  # plain SGD costs the same at every interval
                row = {
                    "model": mname,
                    "params": nparams,
                    "batch": b,
                    "interval": interval,
                    "method": name,
                    "ms": round(ms, 2),
                    "sgd_ms": round(ms0, 2),
                    "x_sgd_time": round(ms / ms0, 2),
                    "peak_mb": round(peak, 1),
                    "x_sgd_mem": round(peak / sgd_peak, 2),
                    "state_mb": round(smb, 1),
                    "note": note,
                }
                rows.append(row)
                print(
                    f"  {mname:17s} k={interval:<3d} {name:13s} {row['ms']:10.2f} ms  x{row['x_sgd_time']:<7} "
                    f"state {row['state_mb']} MB {row['note']}",
                    flush=True,
                )
    return rows


# ---------------------------------------------------------------------------------------------- part 2
def _asdl():
    path = ROOT / ".venv-asdl"
    if not (path / "asdl").is_dir():
        raise SystemExit(
            f"ASDL not found in {path}; install it with\n  .venv/bin/pip install --target "
            "benchmarks/.venv-asdl --no-deps asdfghjkl==0.1a5"
        )
    sys.path.insert(0, str(path))
    warnings.filterwarnings("ignore")
    import asdl

    return asdl


def _asdl_step(asdl, maker_cls, model, x, y, cfg_kw, maker_kw):
    cfg = asdl.PreconditioningConfig(**cfg_kw)
    gm = maker_cls(model, cfg, **maker_kw)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        dummy = gm.setup_model_call(model, x)
        gm.setup_loss_call(nn.functional.cross_entropy, dummy, y)
        gm.forward_and_backward()
        opt.step()

    return gm, step


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel_diff(a: dict, b: dict, keys=None) -> float:
    keys = keys or sorted(set(a) & set(b))
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in keys)


def part2(device: torch.device, batch: int, steps: int, intervals: list[int]) -> list[dict]:
    asdl = _asdl()
    small = {"mlp_small": (nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), (1, 8, 8))}
    # emp Fisher is left out of the agreement checks: ASDL scales it by 1/N² with a mean loss (its grads of the
    # mean loss are divided by data_size again); exact and MC Fisher use per-example likelihood terms in both.
    # ASDL's K-FAC keeps the bias out of A (bias preconditioned by B only): quicktrain's bias="separate".
    cases = [
        # (label, model, ours (name, config), ASDL (class, maker kwargs, extra config), compare: None=all
        #  parameters, "weights"=ndim>1 only (ASDL's Shampoo skips vectors), "time"=different algorithm/sampling)
        (
            "K-FAC (exact)",
            "resnet20",
            ("kfac", {"fisher_type": "exact", "ema_decay": 0.0, "bias": "separate"}),
            (asdl.KfacGradientMaker, {"fisher_type": asdl.FISHER_EXACT}, {}),
            None,
        ),
        (
            "K-FAC (mc, 1 sample)",
            "resnet20",
            ("kfac", {"fisher_type": "mc", "ema_decay": 0.0, "bias": "separate"}),
            (asdl.KfacGradientMaker, {"fisher_type": asdl.FISHER_MC}, {}),
            "time",
        ),
        (
            "K-FAC (exact)",
            "mlp",
            ("kfac", {"fisher_type": "exact", "ema_decay": 0.0, "bias": "separate"}),
            (asdl.KfacGradientMaker, {"fisher_type": asdl.FISHER_EXACT}, {}),
            None,
        ),
        ("Shampoo", "mlp", ("shampoo", {"relative_eps": True}), (asdl.ShampooGradientMaker, {}, {}), "weights"),
        ("Shampoo", "resnet20", ("shampoo", {"relative_eps": True}), (asdl.ShampooGradientMaker, {}, {}), "weights"),
        # ASDL tracks (A + √λI)^{-1} by BFGS updates (a_inverse="bfgs"); its first step applies no preconditioner
        (
            "K-BFGS",
            "mlp",
            ("kbfgs", {"ema_decay": 0.0, "a_inverse": "bfgs", "bias": "separate"}),
            (asdl.KronBfgsGradientMaker, {}, {"ema_decay": 1.0}),
            "time",
        ),
        (
            "NG full (exact)",
            "mlp_small",
            ("full_ng", {"fisher_type": "exact", "ema_decay": 0.0}),
            (asdl.FullNaturalGradientMaker, {"fisher_type": asdl.FISHER_EXACT}, {}),
            None,
        ),
        (
            "NG layer-wise (exact)",
            "mlp_small",
            ("layerwise_ng", {"fisher_type": "exact", "ema_decay": 0.0}),
            (asdl.LayerWiseNaturalGradientMaker, {"fisher_type": asdl.FISHER_EXACT}, {}),
            None,
        ),
        (
            "NG unit-wise (exact)",
            "resnet20",
            ("unitwise_ng", {"fisher_type": "exact", "ema_decay": 0.0}),
            (asdl.UnitWiseNaturalGradientMaker, {"fisher_type": asdl.FISHER_EXACT}, {}),
            None,
        ),
        (
            "NG diagonal (exact)",
            "mlp",
            ("diag_ng", {"fisher_type": "exact", "ema_decay": 0.0}),
            (asdl.DiagNaturalGradientMaker, {"fisher_type": asdl.FISHER_EXACT}, {}),
            None,
        ),
        # ASDL's conv diagonal switches to Σ_l (g a)² (not the Fisher diagonal) when that is cheaper
        (
            "NG diagonal (exact)",
            "resnet20",
            ("diag_ng", {"fisher_type": "exact", "ema_decay": 0.0}),
            (asdl.DiagNaturalGradientMaker, {"fisher_type": asdl.FISHER_EXACT}, {}),
            None,
        ),
        # ASDL's CurveBall uses the Hessian and a fixed momentum, quicktrain's the GGN and the tuned ρ, β
        ("CurveBall", "mlp", ("curveball", {}), (asdl.CurveBallGradientMaker, {}, {}), "time"),
    ]
    rows = []
    for label, mname, (ours, ours_kw), (acls, akw, acfg), compare in cases:
        if mname in small:
            base, shape = small[mname]
            base = copy.deepcopy(base).to(device)
        else:
            shape = MODELS[mname]
            base = get_model(mname, num_classes=10, in_shape=shape).to(device)
        x, y = _data(shape, batch, device, seed=1)
        damping = 1e-3
        base_row = {"config": label, "model": mname, "batch": batch}
        cfg = {
            "damping": damping,
            "data_size": batch,
            "preconditioner_upd_interval": 1,
            "curvature_upd_interval": 1,
            **acfg,
        }
        # first-step agreement (same weights, same batch; the first step refreshes everything at any interval)
        try:
            m_ours, m_asdl = copy.deepcopy(base), copy.deepcopy(base)
            maker = precond.make(ours, m_ours, nn.CrossEntropyLoss(), damping=damping, **ours_kw)
            gm, _ = _asdl_step(asdl, acls, m_asdl, x, y, cfg, akw)
            maker.forward_backward(x, y)
            dummy = gm.setup_model_call(m_asdl, x)
            gm.setup_loss_call(nn.functional.cross_entropy, dummy, y)
            gm.forward_and_backward()
            ga, gb = _grads(m_ours), _grads(m_asdl)
            if compare == "time":
                diff = "n/c"
            else:
                keys = [k for k in gb if gb[k].dim() > 1] if compare == "weights" else None
                diff = f"{_rel_diff(ga, gb, keys):.2e}"

            # timing on fresh copies: update steps at k=1, plain steps at k=max(intervals) (see schedule_ms)
            def make_steps(
                k, ours=ours, ours_kw=ours_kw, acls=acls, akw=akw, cfg=cfg, base=base, x=x, y=y, damping=damping
            ):
                m1 = copy.deepcopy(base)
                mk = precond.make(
                    ours,
                    m1,
                    nn.CrossEntropyLoss(),
                    damping=damping,
                    curvature_interval=k,
                    inverse_interval=k,
                    **ours_kw,
                )
                cfg_k = {**cfg, "preconditioner_upd_interval": k, "curvature_upd_interval": k}
                return [_maker_step(mk, m1, x, y), _asdl_step(asdl, acls, copy.deepcopy(base), x, y, cfg_k, akw)[1]]

            (t_ours, _), (t_asdl, _) = schedule_ms(make_steps, device, intervals, steps)
            for k in intervals:
                if k not in t_ours:
                    continue
                rows.append(
                    {
                        **base_row,
                        "interval": k,
                        "max_rel_diff": diff,
                        "quicktrain_ms": round(t_ours[k], 2),
                        "asdl_ms": round(t_asdl[k], 2),
                        "speedup": round(t_asdl[k] / t_ours[k], 2),
                        "note": "",
                    }
                )
        except Exception as e:  # noqa: BLE001 - ASDL failures are reported in the table
            rows += [
                {
                    **base_row,
                    "interval": k,
                    "max_rel_diff": "",
                    "quicktrain_ms": "",
                    "asdl_ms": "",
                    "speedup": "",
                    "note": f"{type(e).__name__}: {str(e)[:80]}",
                }
                for k in intervals
            ]
        for r in rows[-len(intervals) :]:
            print(f"  {r}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ I/O
# ---------------------------------------------------------------------------------------------- part 3
# (extra TrainConfig settings, learning-rate grid) per method. The preconditioners use SGD with momentum, which
# applies their step as given; AdamW would rescale it per coordinate.
TTA_METHODS = {
    "sgd": ({"optimizer": "sgd"}, (0.03, 0.1)),
    "adamw": ({"optimizer": "adamw"}, (1e-3, 3e-3)),
    "kfac": ({"optimizer": "sgd", "precond": "kfac", "damping": 0.1}, (0.003, 0.01)),
    "shampoo": ({"optimizer": "sgd", "precond": "shampoo", "damping": 1e-3}, (0.003, 0.01)),
    "psgd": ({"optimizer": "sgd", "precond": "psgd"}, (0.01, 0.03)),
}
TTA_TASKS = {  # dataset -> (epochs, steps per epoch cap, batch, target test accuracy)
    "digits": (10, None, 64, 0.97),
    "fashion-mnist": (3, 150, 128, 0.85),
}


def part3(datasets: list[str], out_dir: Path, tag: str, methods: list[str] | None = None) -> list[dict]:
    """Time to a target test accuracy: each method with a small learning-rate grid, ``cnn``, seed 0.

    The best learning rate of each method is the one with the highest final validation accuracy; epochs and
    wall seconds to the target are read off its ``metrics.jsonl``.
    """
    rows = []
    for dataset in datasets:
        epochs, cap, batch, target = TTA_TASKS[dataset]
        best_runs = []
        for method, (settings, grid) in TTA_METHODS.items():
            if methods and method not in methods:
                continue
            runs, diverged = [], []
            for lr in grid:
                run_dir = out_dir / f"precond_tta{tag}" / dataset / f"{method}-lr{lr:g}"
                config = TrainConfig(
                    dataset=dataset,
                    model="cnn",
                    epochs=epochs,
                    max_steps_per_epoch=cap,
                    batch_size=batch,
                    lr=lr,
                    progress=False,
                    out=str(run_dir),
                    overwrite=True,
                    curvature_interval=5,
                    inverse_interval=20,
                    **settings,
                )
                try:
                    fit(config, build_hooks(config))
                except FloatingPointError as error:  # a diverged grid point is a result: report it, go on
                    print(f"{dataset} {method} lr {lr:g} diverged: {error}", flush=True)
                    diverged.append(f"{lr:g}")
                    continue
                runs.append((lr, report.load_run(run_dir)))
            if not runs:
                rows.append(
                    {
                        "dataset": dataset,
                        "method": method,
                        "best_lr": "all diverged",
                        "diverged_lrs": " ".join(diverged),
                    }
                )
                continue
            lr, best = max(runs, key=lambda item: item[1].final["val_acc"])
            reached = next((e for e in best.epochs if e["test_acc"] >= target), None)
            best_runs.append(best)
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "best_lr": lr,
                    "target": target,
                    "epochs_to_target": reached["epoch"] if reached else "never",
                    "seconds_to_target": round(reached["wall"], 1) if reached else "never",
                    "final_test_acc": round(best.final["test_acc"], 4),
                    "wall_s": round(best.final["wall"], 1),
                    "diverged_lrs": " ".join(diverged) or "-",
                }
            )
            print(records_markdown(rows[-1:], list(rows[-1])), flush=True)
        report.plot_runs(best_runs, out_dir / f"precond_tta{tag}_{dataset}.png", title=f"cnn on {dataset}")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed update steps and timed plain steps per method")
    ap.add_argument("--cnn-batch", type=int, default=None, help="batch of the CNNs and of part 2 (default --batch)")
    ap.add_argument("--intervals", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--quick", action="store_true", help="batch 32, 10 steps, MLP only")
    ap.add_argument("--datasets", nargs="+", default=list(TTA_TASKS), help="part 3 datasets")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 was fastest on a shared 2-core box)")
    ap.add_argument("--statistics-fraction", type=float, default=0.25,
                    help="part 4: the sub-batch fraction of the extra K-FAC contender (statistics_fraction)")
    ap.add_argument("--mem-repeats", type=int, default=3, help="part 4: fresh processes per peak-memory median")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.models = 32, 2, ["mlp"]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tag = args.tag or ("_cuda" if device.type == "cuda" else "_cpu")
    env = (
        f"torch {torch.__version__}, {platform.python_version()}, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}, "
        f"threads {torch.get_num_threads()}"
    )
    print(env)
    if 1 in args.part:
        print("\n## Part 1: step time and peak memory relative to SGD")
        methods = args.methods or precond.list_methods()
        methods = ["sgd"] + [m for m in methods if m != "sgd"]  # the baseline first: ratios need it
        rows = part1(device, args.batch, args.intervals, args.steps, args.models, methods, args.cnn_batch)
        write_records_csv(rows, args.out_dir / f"precond_step{tag}.csv")
        print(
            records_markdown(
                rows,
                [
                    "model",
                    "batch",
                    "interval",
                    "method",
                    "ms",
                    "x_sgd_time",
                    "peak_mb",
                    "x_sgd_mem",
                    "state_mb",
                    "note",
                ],
            )
        )
    if 2 in args.part:
        print("\n## Part 2: quicktrain vs ASDL (asdfghjkl 0.1a5)")
        rows = part2(device, args.cnn_batch or args.batch, args.steps, args.intervals)
        write_records_csv(rows, args.out_dir / f"precond_asdl{tag}.csv")
        print(
            records_markdown(
                rows, ["config", "model", "interval", "max_rel_diff", "quicktrain_ms", "asdl_ms", "speedup", "note"]
            )
        )
    if 3 in args.part:
        print("\n## Part 3: time to accuracy (cnn; best learning rate of a small grid per method)")
        rows = part3(args.datasets, args.out_dir, tag, args.methods)
        write_records_csv(rows, args.out_dir / f"precond_tta{tag}.csv")
        print(records_markdown(rows, list(rows[0])))
    if 4 in args.part:
        print("\n## Part 4: K-FAC vs ASDL (asdfghjkl 0.1a5), time and peak memory, CPU")
        rows = part4(args.batch, args.steps, args.intervals, args.statistics_fraction, args.mem_repeats)
        write_records_csv(rows, args.out_dir / f"precond_kfac_asdl{tag}.csv")
        print(records_markdown(rows, list(rows[0])))
    print(env)


if __name__ == "__main__":
    main()
