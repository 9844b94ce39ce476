"""Benchmark: dense SGD vs Kronecker SGD (Song & Yue, arXiv 2305.08001), side by side in one run.

1. d sweep (256 … 65,536 at fixed m, n, batch): per-step time of both, fitted slope of
   log(time) vs log(d) (targets: dense ≥ 0.8, Kronecker ≤ 0.2), speed-up at d = 16,384
   (target ≥ 20×), Kronecker initialisation time and steps to break even.
2. m sweep at fixed d: active neurons per point, touched neurons per step and time.
3. Memory: Kronecker SGD trains on digit pairs upsampled to 28×28 (d = 784² = 614,656) in a
   fresh process; peak RSS must stay under 2 GB while a dense W of the same width would not fit.

Usage::

    .venv/bin/python benchmarks/kron.py            # full sweep, ~2-4 min on one CPU thread
    .venv/bin/python benchmarks/kron.py --quick    # smaller sweep
    .venv/bin/python benchmarks/kron.py --device cuda --tag cuda

Prints Markdown tables and PASS/FAIL per criterion; writes CSV and a PNG into --out-dir
(default benchmarks/results/kron_*.csv).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from quicktrain.kron.bench import (
    DTYPES,
    fit_slope,
    markdown_table,
    memory_probe,
    plot_step_time,
    sweep,
    write_csv,
)

D_COLS = [
    "d",
    "dense_ms",
    "kron_ms",
    "speedup",
    "dense_init_s",
    "kron_init_s",
    "break_even_steps",
    "active_per_point",
    "touched_per_step",
]
M_COLS = ["m", "d", "dense_ms", "kron_ms", "speedup", "active_per_point", "touched_per_step", "kron_init_s"]
MEM_COLS = [
    "task",
    "d",
    "m",
    "n",
    "dtype",
    "kron_init_s",
    "kron_ms",
    "loss_first5",
    "loss_last5",
    "peak_rss_mb",
    "rss_after_import_mb",
    "dense_W_gb",
    "dense_W_plus_grad_gb",
]


def main(argv: list[str] | None = None) -> int:
    """Run the sweeps, print tables and verdicts, write CSV/PNG; exit code 1 if a criterion fails."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sweep (fewer steps, fewer widths)")
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--b", type=float, default=2.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mem-m", type=int, default=1024, help="width for the d = 784² memory run")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix for output files, e.g. cuda")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    out = Path(args.out_dir)
    tag = f"_{args.tag}" if args.tag else ""
    common = {
        "n": args.n,
        "batch": args.batch,
        "b": args.b,
        "dtype": dtype,
        "device": args.device,
        "progress": not args.no_progress,
    }
    steps = {"kron_steps": 15, "dense_steps": 3} if args.quick else {"kron_steps": 40, "dense_steps": 5}
    print(
        f"# Kronecker SGD benchmark ({'quick' if args.quick else 'full'}) — torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, device {args.device}, threads {args.threads}, "
        f"{args.dtype}, m={args.m}, n={args.n}, batch={args.batch}, b={args.b}\n"
    )

    # 1. d sweep --------------------------------------------------------------------------
    sides = (16, 32, 64, 128) if args.quick else (16, 32, 64, 128, 256)
    d_rows = sweep([{"dims": (s, s)} for s in sides], desc="d sweep", m=args.m, **steps, **common)
    d = [r["d"] for r in d_rows]
    slope_dense = fit_slope(d, [r["dense_ms"] for r in d_rows])
    slope_kron = fit_slope(d, [r["kron_ms"] for r in d_rows])
    at16k = next(r for r in d_rows if r["d"] == 16384)
    print("## Per-step time against d\n")
    print(markdown_table(d_rows, D_COLS))
    verdicts = [
        (f"dense slope {slope_dense:.3f} >= 0.8", slope_dense >= 0.8),
        (f"Kronecker slope {slope_kron:.3f} <= 0.2", slope_kron <= 0.2),
        (f"speed-up at d=16,384 {at16k['speedup']:.1f}x >= 20x", at16k["speedup"] >= 20),
    ]
    print(f"\nfitted slope log(time) vs log(d): dense {slope_dense:.3f}, Kronecker {slope_kron:.3f}")
    write_csv(d_rows, out / f"kron_d_sweep{tag}.csv")
    plot_step_time(
        d_rows,
        out / f"kron_step_time{tag}.png",
        title=f"m={args.m}, n={args.n}, B={args.batch}, b={args.b}, {args.dtype}, {args.device}",
    )

    # 2. m sweep --------------------------------------------------------------------------
    widths = (256, 1024, 4096) if args.quick else (256, 512, 1024, 2048, 4096)
    m_rows = sweep([{"m": m} for m in widths], desc="m sweep", dims=(64, 64), **steps, **common)
    print("\n## Width sweep at d = 4,096\n")
    print(markdown_table(m_rows, M_COLS))
    write_csv(m_rows, out / f"kron_m_sweep{tag}.csv")

    # 3. memory at d = 784² -----------------------------------------------------------------
    if not args.skip_memory:
        mem = memory_probe(
            size=28,
            m=args.mem_m,
            n=128,
            batch=args.batch,
            b=args.b,
            dtype=args.dtype,
            device=args.device,
            steps=10 if args.quick else 30,
        )
        print("\n## Memory at d = 784² = 614,656 (fresh process)\n")
        print(markdown_table([mem], MEM_COLS + (["peak_cuda_mb"] if "peak_cuda_mb" in mem else [])))
        write_csv([mem], out / f"kron_memory{tag}.csv")
        verdicts += [
            (f"Kronecker peak RSS {mem['peak_rss_mb']:.0f} MB <= 2048 MB", mem["peak_rss_mb"] <= 2048),
            (f"dense W alone would need {mem['dense_W_gb']:.2f} GB > 2 GB", mem["dense_W_gb"] > 2.0),
        ]

    print("\n## Criteria\n")
    for text, ok in verdicts:
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    print(f"\nCSV/PNG written to {out}/kron_*{tag}.*")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
