"""Timing helpers shared by ``quicktrain kron bench`` and ``benchmarks/kron.py``.

Dense SGD and Kronecker SGD run side by side in one process on the same data, initial
weights and batch sequence, so every ratio is measured in the same run. Step times are
medians of individually timed steps after a burn-in (``cuda.synchronize`` around each on
GPU). Memory is probed in a fresh subprocess so that peak RSS belongs to one run only.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import report
from .data import batch_schedule, make_digit_pairs, make_teacher
from .dense import DenseSGD
from .model import KronMLP, SeededInit
from .search import PATHS
from .sgd import KronSGD

__all__ = [
    "compare_at",
    "compare_paths",
    "time_in_turns",
    "fit_slope",
    "markdown_table",
    "memory_probe",
    "plot_step_time",
    "sweep",
    "write_csv",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(
    step: Callable[[torch.Tensor], Any], batches: Sequence[torch.Tensor], warmup: int, device: torch.device
) -> tuple[float, list[Any]]:
    """Median seconds per step over ``batches[warmup:]`` (first ``warmup`` are burn-in)."""
    times, outs = [], []
    for i, idx in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        out = step(idx)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            outs.append(out)
    return statistics.median(times), outs


def time_in_turns(
    steps: dict[str, Callable[[torch.Tensor], Any]],
    batches: Sequence[torch.Tensor],
    *,
    warmup: int,
    device: torch.device,
    limit: dict[str, int] | None = None,
) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """Median seconds per step of each contender, stepping them in turns (A B A B …) on the same batches.

    The order rotates every step so no contender always runs first (after the others' cache traffic).

    Args:
        steps: Name → step function.
        batches: Batch indices; every contender sees them in the same order.
        warmup: Burn-in steps per contender (not timed).
        device: For synchronisation.
        limit: Optional name → number of timed steps (e.g. few for a slow dense trainer).

    Returns:
        ``(median seconds, outputs of the timed steps)`` per contender.
    """
    limit = limit or {}
    times: dict[str, list[float]] = {k: [] for k in steps}
    outs: dict[str, list[Any]] = {k: [] for k in steps}
    names = list(steps)
    for i, idx in enumerate(batches):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            step = steps[name]
            if i >= warmup + limit.get(name, len(batches)):
                continue
            _sync(device)
            t0 = time.perf_counter()
            out = step(idx)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                outs[name].append(out)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def compare_at(
    dims: Sequence[int],
    *,
    m: int,
    n: int,
    batch: int,
    b: float,
    lr: float = 0.1,
    kron_steps: int = 30,
    dense_steps: int = 5,
    warmup: int = 2,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dense: bool = True,
) -> dict[str, Any]:
    """Per-step time of dense and Kronecker SGD (default path) on one teacher task, stepped in turns.

    Args:
        dims: Factor dimensions; ``d = Π dims``.
        m: Width.
        n: Number of data points.
        batch: Batch size.
        b: Threshold.
        lr: Step size.
        kron_steps: Timed Kronecker steps.
        dense_steps: Timed dense steps.
        warmup: Burn-in steps for each trainer.
        dtype: Data/weight dtype.
        device: Device.
        seed: Seed of data, weights and batches.
        dense: Also time the dense trainer.

    Returns:
        A row: d, m, n, batch, b, the path used, kron/dense ms per step, speed-up, init seconds,
        mean active pairs per point, mean touched neurons per step and steps to break even.
    """
    device = torch.device(device)
    ds = make_teacher(n, dims, seed=seed, dtype=dtype).to(device=device)
    sched = [i.to(device) for i in batch_schedule(n, batch, warmup + max(kron_steps, dense_steps), seed=seed)]
    _sync(device)
    t0 = time.perf_counter()
    fast = KronSGD(ds.factors, ds.y, m=m, b=b, lr=lr, seed=seed)
    _sync(device)
    kron_init = time.perf_counter() - t0
    steps: dict[str, Callable[[torch.Tensor], Any]] = {"kron": fast.step}
    if dense:
        t0 = time.perf_counter()
        # timing only: the dense step costs the same from any W(0); the full draw of the same seed is one
        # (not the trainer's own sample where it drew Z(0) conditionally, which would cost a contraction more)
        model = KronMLP.from_init(SeededInit(m, ds.d, seed), b=b, dtype=dtype, device=device)
        _sync(device)
        dense_init = time.perf_counter() - t0
        steps["dense"] = DenseSGD(model, ds.factors, ds.y, lr=lr).step
    med, outs = time_in_turns(
        steps, sched, warmup=warmup, device=device, limit={"kron": kron_steps, "dense": dense_steps}
    )
    kron_s = med["kron"]
    row: dict[str, Any] = {
        "d": ds.d,
        "m": m,
        "n": n,
        "batch": batch,
        "b": b,
        "path": fast.path,
        "kron_ms": 1e3 * kron_s,
        "kron_init_s": kron_init,
        "active_per_point": statistics.mean(o.n_active for o in outs["kron"]) / batch,
        "touched_per_step": statistics.mean(o.n_touched for o in outs["kron"]),
    }
    if dense:
        dense_s = med["dense"]
        row.update(
            dense_ms=1e3 * dense_s,
            dense_steps=dense_steps,
            dense_init_s=dense_init,
            speedup=dense_s / kron_s,
            break_even_steps=kron_init / (dense_s - kron_s) if dense_s > kron_s else math.inf,
        )
    return row


PHASES = ("search", "forward_backward", "update_Z", "refresh", "update_C")


def compare_paths(
    dims: Sequence[int],
    *,
    m: int,
    n: int,
    batch: int,
    b: float,
    lr: float = 0.1,
    steps: int = 30,
    warmup: int = 3,
    profile_steps: int = 10,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Step time of every activated-neuron path and of the default, in turns, with a phase breakdown.

    All contenders are copies of one trainer (same ``Z(0)``, same batches), so they stay
    bit-identical. The default is not timed twice: it *is* the trainer of the path its rule
    picks, and its row repeats that path's measurement (two copies of the same code would
    only measure the run's noise).

    Returns:
        One row per path plus a ``default`` row: path, ms per step, ratio to the scan, median
        ms per phase of the step (:data:`PHASES`, from ``profile_steps`` extra
        device-synchronised steps).
    """
    device = torch.device(device)
    ds = make_teacher(n, dims, seed=seed, dtype=dtype).to(device=device)
    default = KronSGD(ds.factors, ds.y, m=m, b=b, lr=lr, seed=seed)
    trainers = {}
    for p in PATHS:
        if p == default.path:
            trainers[p] = default
        else:
            trainers[p] = copy.deepcopy(default)
            trainers[p].use_path(p)
    sched = [i.to(device) for i in batch_schedule(n, batch, warmup + steps + profile_steps, seed=seed)]
    med, outs = time_in_turns(
        {k: t.step for k, t in trainers.items()}, sched[: warmup + steps], warmup=warmup, device=device
    )
    profs: dict[str, list[dict[str, float]]] = {k: [] for k in trainers}
    for idx in sched[warmup + steps :]:
        for name, t in trainers.items():
            profs[name].append({})
            t.step(idx, profile=profs[name][-1])
    rows = []
    for name, t in trainers.items():
        rows.append(
            {
                "contender": name,
                "path": t.path,
                "m": m,
                "d": ds.d,
                "n": n,
                "batch": batch,
                "b": b,
                "active_fraction": default.active_fraction,
                "ms": 1e3 * med[name],
                "vs_scan": med[name] / med["scan"],
                "active_per_point": statistics.mean(o.n_active for o in outs[name]) / batch,
                "touched_per_step": statistics.mean(o.n_touched for o in outs[name]),
                **{f"{ph}_ms": 1e3 * statistics.median(p.get(ph, 0.0) for p in profs[name]) for ph in PHASES},
            }
        )
    rows.insert(0, {**next(r for r in rows if r["contender"] == default.path), "contender": "default"})
    if not all(torch.equal(t.Z, default.Z) for t in trainers.values()):
        raise RuntimeError("paths diverged: the activated-neuron paths must give identical trajectories")
    return rows


def sweep(
    points: Iterable[dict[str, Any]], *, progress: bool = True, desc: str = "kron bench", **common: Any
) -> list[dict[str, Any]]:
    """Run :func:`compare_at` for each ``points`` entry (merged over ``common``), with a tqdm bar."""
    from tqdm.auto import tqdm

    points = list(points)
    rows = []
    for p in tqdm(points, desc=desc, disable=not progress):
        rows.append(compare_at(**{**common, **p}))
    return rows


def fit_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx = [math.log(v) for v in x]
    ly = [math.log(v) for v in y]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (c - my) for a, c in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def markdown_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    """Markdown table of dict ``rows`` restricted to ``cols``."""
    return report.records_markdown(rows, cols)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write dict ``rows`` (union of keys as header) to ``path``; creates parent folders."""
    return report.write_records_csv(rows, path)


def plot_step_time(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Log-log PNG of per-step time against ``d`` for dense and Kronecker SGD, with fitted slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = [r["d"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label, style in (("dense_ms", "dense SGD", "o-"), ("kron_ms", "Kronecker SGD", "s-")):
        if all(key in r for r in rows):
            t = [r[key] for r in rows]
            ax.plot(d, t, style, label=f"{label} (slope {fit_slope(d, t):.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("input dimension d")
    ax.set_ylabel("time per SGD step [ms]")
    ax.set_title(title or "per-step time vs d")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _peak_rss_mb() -> float:
    """Peak resident set size of this process image (``VmHWM``; reset by exec, unlike ``ru_maxrss``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM; peak-memory probing needs Linux")


def _memory_probe_main(cfg: dict[str, Any]) -> dict[str, Any]:
    """Body of :func:`memory_probe` (runs inside the subprocess)."""
    torch.set_num_threads(1)
    dtype, device = DTYPES[cfg["dtype"]], torch.device(cfg["device"])
    base_mb = _peak_rss_mb()
    ds = make_digit_pairs(cfg["n"], size=cfg["size"], dtype=dtype, seed=cfg["seed"]).to(device=device)
    t0 = time.perf_counter()
    fast = KronSGD(ds.factors, ds.y, m=cfg["m"], b=cfg["b"], lr=cfg["lr"], seed=cfg["seed"])
    _sync(device)
    init_s = time.perf_counter() - t0
    sched = [i.to(device) for i in batch_schedule(ds.n, cfg["batch"], cfg["steps"], seed=cfg["seed"])]
    step_s, outs = _time_steps(fast.step, sched, 0, device)
    head = [float(o.loss) / cfg["batch"] for o in outs[:5]]
    tail = [float(o.loss) / cfg["batch"] for o in outs[-5:]]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    out = {
        "task": f"digits {cfg['size']}x{cfg['size']} pairs",
        "d": ds.d,
        "m": cfg["m"],
        "n": ds.n,
        "batch": cfg["batch"],
        "dtype": cfg["dtype"],
        "device": str(device),
        "steps": cfg["steps"],
        "kron_init_s": init_s,
        "kron_ms": 1e3 * step_s,
        "loss_first5": sum(head) / len(head),
        "loss_last5": sum(tail) / len(tail),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_import_mb": base_mb,
        "dense_W_gb": cfg["m"] * ds.d * itemsize / 1e9,
        "dense_W_plus_grad_gb": 2 * cfg["m"] * ds.d * itemsize / 1e9,
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def memory_probe(
    *,
    size: int = 28,
    m: int = 1024,
    n: int = 128,
    batch: int = 16,
    b: float = 2.0,
    lr: float = 0.5,
    steps: int = 20,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Train Kronecker SGD on digit pairs of side ``size`` (d = size⁴) in a fresh process; report peak memory.

    Returns:
        A dict with ``peak_rss_mb`` (whole process, includes the Python/torch baseline in
        ``rss_after_import_mb``), timings, mean per-point loss over the first and last five
        steps and the size a dense ``W`` (and ``W`` plus its gradient) would need.
    """
    cfg = {
        "size": size,
        "m": m,
        "n": n,
        "batch": batch,
        "b": b,
        "lr": lr,
        "steps": steps,
        "dtype": dtype,
        "device": device,
        "seed": seed,
    }
    code = (
        "import json, sys; from quicktrain.kron.bench import _memory_probe_main; "
        f"print('@@' + json.dumps(_memory_probe_main(json.loads({json.dumps(json.dumps(cfg))}))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])
