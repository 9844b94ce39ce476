"""``quicktrain bench all``: a budgeted ablation of the parts on one dataset, as one HTML report plus CSV.

Each configuration trains the same model on the same data with the same budget (epochs x steps per epoch)
for several seeds: the AdamW baseline, each part added alone, and all parts together. The report has the
mean +- std test accuracy, wall time and time to a target accuracy per configuration, the accuracy-vs-time
curves of every run, the machine and device, and a Kronecker-SGD sweep section.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report
from .compose import build_hooks
from .kron import bench as kron_bench
from .train import TrainConfig, fit

# Settings each configuration adds to the baseline; the preconditioned runs use SGD with momentum, the
# optimizer K-FAC is designed for (Martens & Grosse, 2015), at the learning rate found by benchmarks/precond.py.
PRECOND = {
    "precond": "kfac",
    "optimizer": "sgd",
    "lr": 0.01,
    "damping": 0.1,
    "curvature_interval": 5,
    "inverse_interval": 20,
}
ABLATION: dict[str, dict[str, Any]] = {
    "adamw": {},
    "+ghn": {"init": "ghn"},
    "+kfac": PRECOND,
    "+boost": {"boost": True},
    "all": {"init": "ghn", "boost": True, **PRECOND},
}
SUMMARY_COLUMNS = (
    "config",
    "runs",
    "test acc (mean ± std)",
    "wall s (mean)",
    "s to target (mean)",
    "vs adamw acc, paired by seed (range)",
    "vs adamw time",
)


def run_ablation(
    base: TrainConfig, out: Path, seeds: Sequence[int], configs: dict[str, dict[str, Any]] = ABLATION
) -> dict[str, list[report.RunRecord]]:
    """Train every configuration for every seed into ``out/NAME-sSEED`` (replacing a previous run there), one
    progress line per run; return their records by name."""
    records: dict[str, list[report.RunRecord]] = {}
    for name, overrides in configs.items():
        for seed in seeds:
            config = dataclasses.replace(
                base, seed=seed, out=str(out / f"{name}-s{seed}"), overwrite=True, **overrides
            )
            fit(config, build_hooks(config), one_line=f"{name} seed {seed}")
            records.setdefault(name, []).append(report.load_run(config.out))
    return records


def summary_rows(records: dict[str, list[report.RunRecord]], target: float) -> list[list[str]]:
    """One row of :data:`SUMMARY_COLUMNS` per configuration; comparisons are to the first configuration.

    The accuracy comparison pairs runs by seed (each configuration's run minus the first configuration's run of
    the same seed) and gives the mean and the range of those differences, so the seed-to-seed spread that the
    configurations share does not hide or inflate the effect; a seed the first configuration lacks is an error.
    """
    rows: list[list[str]] = []
    baseline_acc: dict[int, float] = {}
    baseline_wall = 0.0
    for name, runs in records.items():
        accs = {r.config["seed"]: r.final["test_acc"] for r in runs}
        wall = statistics.mean(r.final["wall"] for r in runs)
        reached = [t for r in runs if (t := r.time_to("test_acc", target)) is not None]
        if not rows:
            baseline_acc, baseline_wall = accs, wall
        missing = sorted(set(accs) - set(baseline_acc))
        if missing:
            raise ValueError(
                f"{name!r} has seeds {missing} that the baseline lacks: run every configuration on the same seeds"
            )
        diffs = [acc - baseline_acc[seed] for seed, acc in accs.items()]
        paired = f"{statistics.mean(diffs):+.4f}"
        if len(diffs) > 1:
            paired += f" [{min(diffs):+.4f}, {max(diffs):+.4f}]"
        std = statistics.stdev(accs.values()) if len(accs) > 1 else 0.0
        rows.append(
            [
                name,
                str(len(runs)),
                f"{statistics.mean(accs.values()):.4f} ± {std:.4f}",
                f"{wall:.1f}",
                f"{statistics.mean(reached):.1f} ({len(reached)}/{len(runs)})" if reached else "never",
                paired,
                f"{wall / baseline_wall:.2f}x",
            ]
        )
    return rows


def kron_section(out: Path, *, quick: bool) -> report.Section:
    """Dense vs Kronecker SGD step time against the input dimension d (a small sweep)."""
    sides = (16, 32, 64) if quick else (16, 32, 64, 128)
    rows = kron_bench.sweep(
        [{"dims": (s, s)} for s in sides],
        m=1024,
        n=256,
        batch=16,
        b=2.0,
        kron_steps=15,
        dense_steps=3,
        desc="kron sweep",
    )
    columns = ["d", "dense_ms", "kron_ms", "speedup", "kron_init_s", "break_even_steps"]
    table = [[f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    png = kron_bench.plot_step_time(rows, out / "kron_step_time.png", title="m=1024, n=256, B=16, b=2")
    slope = kron_bench.fit_slope([r["d"] for r in rows], [r["kron_ms"] for r in rows])
    text = (
        f"Per-step time of dense SGD and Kronecker SGD at fixed width, data and batch. Fitted slope of "
        f"log(Kronecker step time) against log(d): {slope:.3f} (dense grows about linearly)."
    )
    return report.Section("Kronecker SGD sweep", text, tables=[(columns, table)], images=[png])


def bench_all(
    out: Path,
    *,
    dataset: str,
    model: str,
    epochs: int,
    max_steps_per_epoch: int | None,
    seeds: Sequence[int],
    target: float,
    quick: bool,
) -> Path:
    """Run the ablation and the kron sweep; write ``out/report.html`` and ``out/summary.csv``."""
    start = time.perf_counter()
    base = TrainConfig(
        dataset=dataset,
        model=model,
        epochs=epochs,
        max_steps_per_epoch=max_steps_per_epoch,
        batch_size=128,
        lr=2e-3,
    )
    records = run_ablation(base, out, seeds)
    rows = summary_rows(records, target)
    report.print_table(SUMMARY_COLUMNS, rows, title=f"ablation on {dataset} ({model})")
    csv_path = report.write_csv(SUMMARY_COLUMNS, rows, out / "summary.csv")
    budget = f"{epochs} epochs" + (f" of {max_steps_per_epoch} steps" if max_steps_per_epoch else "")
    ablation = report.Section(
        f"Ablation on {dataset}: {model}, {budget}, batch 128, seeds {list(seeds)}",
        f"Each part added to the AdamW baseline alone, then all together. Target accuracy {target}.",
        tables=[(list(SUMMARY_COLUMNS), rows)],
        downloads=[csv_path],
    )
    all_runs = [run for runs in records.values() for run in runs]
    curves = report.runs_section(all_runs, out / "curves.png", title="every run", target=target)
    sections = [ablation, curves, kron_section(out, quick=quick)]
    path = report.render_html(sections, out / "report.html", title="quicktrain bench all")
    print(f"bench all finished in {time.perf_counter() - start:.0f}s: {path} and {csv_path}")
    return path


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``quicktrain bench all``."""
    bench = subparsers.add_parser("bench", help="benchmarks that write one HTML report")
    actions = bench.add_subparsers(dest="bench_action", required=True)
    every = actions.add_parser("all", help="ablation of every part on one dataset plus the kron sweep")
    every.add_argument("--out", default="runs/bench-all", help="folder of the runs, report.html and summary.csv")
    every.add_argument("--dataset", default="fashion-mnist", help="dataset of the ablation")
    every.add_argument("--model", default="cnn", help="model of the ablation")
    every.add_argument("--epochs", type=int, default=3, help="epochs of every run")
    every.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on the steps of each epoch")
    every.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per configuration")
    every.add_argument("--target", type=float, default=0.85, help="test accuracy for the time-to-target column")
    every.add_argument("--quick", action="store_true", help="a smaller kron sweep")
    every.set_defaults(
        func=lambda a: bench_all(
            Path(a.out),
            dataset=a.dataset,
            model=a.model,
            epochs=a.epochs,
            max_steps_per_epoch=a.max_steps_per_epoch,
            seeds=range(a.seeds),
            target=a.target,
            quick=a.quick,
        )
    )
