"""``quicktrain kron train|bench``: Kronecker SGD from the command line.

Wire-up (by the lead, in ``quicktrain/cli.py``)::

    kron.cli.add_subparser(subparsers)   # then dispatch with args.func(args)

Stand-alone: ``python -m quicktrain.kron.cli train --task digits --steps 200``.
"""

from __future__ import annotations

import argparse
import math
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from .bench import DTYPES, fit_slope, markdown_table, plot_step_time, sweep, write_csv
from .data import KronDataset, batch_schedule, make_digit_pairs, make_fashion_pairs, make_teacher
from .dense import DenseSGD
from .model import KronMLP
from .sgd import KronSGD

__all__ = ["Task", "add_subparser", "bench_command", "build_dataset", "main", "train_command"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class Task(StrEnum):
    """Datasets the CLI can train on."""

    TEACHER = "teacher"
    DIGITS = "digits"
    FASHION = "fashion"


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 16,16, got {text!r}") from err
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return vals


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def build_dataset(
    task: str, *, n: int, dims: tuple[int, ...], size: int, seed: int, dtype: torch.dtype
) -> KronDataset:
    """Dataset for ``--task`` (teacher: ``dims``; digits: side ``size``; fashion: local IDX files)."""
    try:
        task = Task(task)
    except ValueError:
        raise ValueError(f"Unknown task {task!r}; choose from {[t.value for t in Task]}") from None
    if task is Task.TEACHER:
        return make_teacher(n, dims, seed=seed, dtype=dtype)
    if task is Task.DIGITS:
        return make_digit_pairs(n, size=size, seed=seed, dtype=dtype)
    return make_fashion_pairs(n, seed=seed, dtype=dtype)


def train_command(args: argparse.Namespace) -> dict[str, Any]:
    """Train Kronecker SGD with a tqdm bar; optionally check every step against the dense reference.

    Returns:
        Summary dict (losses, timings, held-out metric, max deviation from dense if checked).
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], _device(args.device)
    full = build_dataset(
        args.task, n=args.n + args.n_test, dims=args.dims, size=args.size, seed=args.seed, dtype=dtype
    ).to(device=device)
    train, test = full.split(args.n_test, seed=args.seed) if args.n_test else (full, None)
    b = args.b if args.b is not None else math.sqrt(0.4 * math.log(args.m))
    t0 = time.perf_counter()
    fast = KronSGD(train.factors, train.y, m=args.m, b=b, lr=args.lr, seed=args.seed)
    print(
        f"kron: task={args.task} n={train.n} d={train.d:,} dims={train.dims} m={args.m} b={b:.3f} "
        f"lr={args.lr} dtype={args.dtype} device={device} init {time.perf_counter() - t0:.2f}s\n"
        f"kron: path={fast.path} ({fast.path_reason})\n"
        f"kron: W(0) draw={fast.draw} ({fast.draw_reason})"
    )
    dense = None
    if args.check_dense:
        dense = DenseSGD(
            KronMLP.from_init(fast.init, b=b, dtype=dtype, device=device), train.factors, train.y, lr=args.lr
        )
    max_dev, losses, t_steps = 0.0, [], 0.0
    bar = tqdm(
        batch_schedule(train.n, args.batch, args.steps, seed=args.seed),
        desc="kron train",
        disable=args.no_progress,
    )
    for step, idx in enumerate(bar, 1):
        idx = idx.to(device)
        t1 = time.perf_counter()
        out = fast.step(idx)
        t_steps += time.perf_counter() - t1
        losses.append(float(out.loss) / idx.numel())
        if dense is not None:
            max_dev = max(max_dev, float((dense.step(idx).pred - out.pred).abs().max()))
        if step % args.log_every == 0 or step == args.steps:
            bar.set_postfix(
                loss=f"{_mean(losses[-args.log_every :]):.4f}", active=out.n_active, touched=out.n_touched
            )
    summary: dict[str, Any] = {
        "first_loss": losses[0],
        "last_loss": _mean(losses[-args.log_every :]),
        "ms_per_step": 1e3 * t_steps / len(losses),
        "init_s": fast.init_seconds,
        "path": fast.path,
        "d": train.d,
    }
    if dense is not None:
        summary["max_pred_dev_vs_dense"] = max_dev
    if test is not None:
        pred = fast.predict_new(test.factors, train.factors)
        summary["test_mse"] = float(((pred - test.y) ** 2).mean())
        if args.task != Task.TEACHER.value:
            summary["test_acc"] = float(
                (torch.where(pred > 0, 1.0, -1.0).to(test.y) == test.y).double().mean()
            )
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(fast.state_dict(), args.save)
        summary["saved"] = args.save
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


def bench_command(args: argparse.Namespace) -> list[dict[str, float]]:
    """Sweep d, print a Markdown table with fitted log-log slopes, write CSV and a PNG plot."""
    torch.set_num_threads(args.threads)
    sides = (8, 16, 32) if args.quick else args.sides
    rows = sweep(
        [{"dims": (s, s)} for s in sides],
        progress=not args.no_progress,
        m=args.m,
        n=args.n,
        batch=args.batch,
        b=args.b,
        dtype=DTYPES[args.dtype],
        device=_device(args.device),
        seed=args.seed,
        dense=not args.no_dense,
        kron_steps=args.kron_steps,
        dense_steps=args.dense_steps,
    )
    cols = ["d", "dense_ms", "kron_ms", "speedup", "kron_init_s", "active_per_point", "touched_per_step"]
    print(markdown_table(rows, [c for c in cols if c in rows[0]]))
    d = [r["d"] for r in rows]
    print(
        f"slope log(time) vs log(d): kron {fit_slope(d, [r['kron_ms'] for r in rows]):.3f}"
        + ("" if args.no_dense else f", dense {fit_slope(d, [r['dense_ms'] for r in rows]):.3f}")
    )
    out = Path(args.out_dir)
    print(
        f"wrote {write_csv(rows, out / 'kron_cli_bench.csv')} and "
        f"{plot_step_time(rows, out / 'kron_cli_bench.png', title=f'm={args.m}, n={args.n}, B={args.batch}')}"
    )
    return rows


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--m", type=int, default=1024, help="width")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide tqdm bars")


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``kron`` with actions ``train`` and ``bench``; each sets ``func`` for dispatch."""
    kron = subparsers.add_parser(
        "kron", help="Kronecker SGD (Song & Yue 2023): per-step cost independent of d"
    )
    actions = kron.add_subparsers(dest="kron_action", required=True)

    train = actions.add_parser("train", help="train the two-layer shifted-ReLU net by Kronecker SGD")
    _add_common(train)
    train.add_argument("--task", choices=[t.value for t in Task], default=Task.DIGITS.value)
    train.add_argument("--n", type=int, default=512, help="training points")
    train.add_argument("--n-test", type=int, default=128, help="held-out points (0: none)")
    train.add_argument(
        "--dims", type=_ints, default=(16, 16), help="teacher factor dims, e.g. 16,16 or 4,4,4"
    )
    train.add_argument("--size", type=int, default=8, help="digit side (8 native, 28 gives d=784²)")
    train.add_argument("--b", type=float, default=None, help="threshold (default sqrt(0.4 log m))")
    train.add_argument("--lr", type=float, default=0.5)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--steps", type=int, default=500)
    train.add_argument("--log-every", type=int, default=20)
    train.add_argument("--check-dense", action="store_true", help="run the dense reference in lockstep")
    train.add_argument("--save", default="", help="path for the trainer state_dict (.pt)")
    train.set_defaults(func=train_command)

    bench = actions.add_parser("bench", help="per-step time of dense vs Kronecker SGD against d (CSV + PNG)")
    _add_common(bench)
    bench.add_argument("--sides", type=_ints, default=(16, 32, 64, 128), help="factor sides; d = side²")
    bench.add_argument("--n", type=int, default=256)
    bench.add_argument("--batch", type=int, default=16)
    bench.add_argument("--b", type=float, default=2.0)
    bench.add_argument("--kron-steps", type=int, default=30)
    bench.add_argument("--dense-steps", type=int, default=5)
    bench.add_argument("--no-dense", action="store_true", help="time Kronecker SGD only")
    bench.add_argument("--quick", action="store_true", help="small sweep (sides 8,16,32)")
    bench.add_argument("--out-dir", default="benchmarks/results")
    bench.set_defaults(func=bench_command)
    return kron


def main(argv: list[str] | None = None) -> Any:
    """Entry point for ``python -m quicktrain.kron.cli``."""
    parser = argparse.ArgumentParser(prog="quicktrain")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kron", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    main()
