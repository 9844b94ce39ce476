"""Benchmark: Kronecker SGD (Song & Yue, arXiv 2305.08001) — paths, dense SGD and initialisation, one run.

1. Paths at d = 4,096, n = 256, |B| = 16: the plain column scan, the block bounds and the
   paper's tree, stepped in turns (the default is whichever of them its rule picks), with the
   time of each phase of a step; at m = 1,024 / 4,096 / 16,384 (b = 2), at m = 65,536 with
   b = √(0.4 ln m) and, where active neurons are rare, at m = 65,536 with b = 3.
   Criterion: default ≤ 1.0× scan at the first four.
2. d sweep 256 … 262,144 (m = 1,024, n = 256, b = 2): default step vs dense SGD, fitted slope
   (criterion ≤ 0.1), speed-up at d = 262,144 (criterion ≥ 1,000×; dense gets few timed steps
   there), initialisation time and steps to break even.
3. m sweep (d = 4,096) at b = 2 and b = √(0.4 ln m): active neurons per point, touched neurons
   per step, step time, fitted slopes in m.
4. n sweep (d = 256 and 4,096, m = 1,024): where dense SGD catches up (large n, small d).
5. Initialisation Z(0) at d = 65,536 and 262,144 (m = 1,024, n = 256), in turns: the previous
   per-row code (kept below as the reference), the seeded default (``draw_seeded``: Z(0) ~ N(0, G)
   drawn directly where chosen), the full draw (W(0) drawn in blocks and contracted) and the
   contraction of a given W(0) (``from_weights``' cost). The floor of any code that draws W(0) and
   contracts it: torch.randn of m·d numbers into one cache-resident block, plus the one GEMM of the
   contraction (2mnd flops) on a cache-resident block, nothing else. Also materialising W(0)
   (``weight()``) for both draws, and the trainer's steps to break even against dense SGD (from
   section 2, same m, n).
   Criterion: the default ≥ 3× faster than the previous code at d = 65,536.
6. (optional) Memory: training on digit pairs at d = 784² in a fresh process.

Usage::

    .venv/bin/python benchmarks/kron.py              # full run, ~10 min on one busy CPU thread
    .venv/bin/python benchmarks/kron.py --quick      # fewer steps and sizes
    .venv/bin/python benchmarks/kron.py --memory     # also the d = 784² memory probe

Prints Markdown tables and PASS/FAIL per criterion; writes CSV and one JSON into --out-dir
(default benchmarks/results/kron_*.csv, kron_summary.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from quicktrain.kron.bench import (
    DTYPES,
    PHASES,
    compare_at,
    compare_paths,
    fit_slope,
    markdown_table,
    memory_probe,
    write_csv,
)
from quicktrain.kron.data import make_teacher
from quicktrain.kron.model import ROW_BLOCK, ExplicitInit, SeededInit
from quicktrain.kron.sgd import draw_seeded, initial_preactivations

PATH_COLS = ["m", "b", "contender", "path", "ms", "vs_scan", "active_per_point", "touched_per_step"] + [
    f"{p}_ms" for p in PHASES
]
D_COLS = ["d", "path", "kron_ms", "dense_ms", "dense_steps", "speedup", "kron_init_s", "break_even_steps"]
M_COLS = ["m", "b", "path", "kron_ms", "active_per_point", "touched_per_step", "kron_init_s"]
N_COLS = ["n", "path", "kron_ms", "dense_ms", "speedup", "active_per_point", "touched_per_step"]
INIT_COLS = [
    "d", "m", "n", "draw", "previous_s", "default_s", "speedup", "full_s", "contract_s", "randn_floor_s",
    "gemm_floor_s", "full_bound", "materialise_full_s", "materialise_default_s", "break_even_steps",
]


def per_row_reference(init: SeededInit, factors: tuple[torch.Tensor, ...], chunk_elems: int = 1 << 23) -> torch.Tensor:
    """The initialisation before part 2, kept only as this benchmark's baseline (K = 2 factors).

    One generator call per row of W(0), the old chunk rule, and the old contraction: a matmul
    with the last factor, then a broadcast multiply and sum with the first. Its rows differ
    from :class:`SeededInit`'s; its cost is what is compared.
    """
    (u, v), dims = factors, [f.shape[1] for f in factors]
    n, d = u.shape[0], math.prod(dims)
    rows = max(1, chunk_elems // (d + dims[0] * n))
    out = torch.empty(init.m, n, dtype=u.dtype)
    g = torch.Generator()
    for s in range(0, init.m, rows):
        e = min(init.m, s + rows)
        block = torch.empty(e - s, d, dtype=u.dtype)
        for j, r in enumerate(range(s, e)):
            g.manual_seed((init.seed * 0x9E3779B97F4A7C15 + r + 1) % (2**63 - 1))
            torch.randn(d, generator=g, dtype=u.dtype, out=block[j])
        t = (block.reshape((e - s) * dims[0], dims[1]) @ v.T).reshape(e - s, dims[0], n)
        out[s:e] = (t * u.T[None]).sum(dim=1)
    return out


def init_in_turns(side: int, *, m: int, n: int, reps: int, dtype: torch.dtype) -> dict[str, Any]:
    """Median seconds of each way to Z(0) (and of materialising W(0)), in turns in this process."""
    ds = make_teacher(n, (side, side), seed=0, dtype=dtype)
    init = SeededInit(m, side * side, 0)
    default, _ = draw_seeded(init, ds.factors)
    given = ExplicitInit(init.weight(dtype=dtype), init.signs(dtype=dtype))
    block, gen = torch.empty(ROW_BLOCK, side * side, dtype=dtype), torch.Generator().manual_seed(0)
    v = ds.factors[-1]

    def randn_floor() -> None:  # m·d standard normals, written into one reused (cache-resident) block
        for _ in range(m // ROW_BLOCK):
            torch.randn(block.shape, generator=gen, dtype=dtype, out=block)

    def gemm_floor() -> None:  # the contraction's GEMM [n, d_K] x [d_K, m·d/d_K] on one reused block
        for _ in range(m // ROW_BLOCK):
            v @ block.view(-1, side).T

    jobs = {
        "previous": lambda: per_row_reference(init, ds.factors),
        "default": lambda: initial_preactivations(draw_seeded(init, ds.factors)[0], ds.factors),
        "full": lambda: initial_preactivations(init, ds.factors),
        "contract": lambda: initial_preactivations(given, ds.factors),
        "randn_floor": randn_floor,
        "gemm_floor": gemm_floor,
        "materialise_full": lambda: init.weight(dtype=dtype),
        "materialise_default": lambda: default.weight(dtype=dtype),
    }
    runs: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(reps):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            runs[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "d": side * side,
        "m": m,
        "n": n,
        "draw": "full" if default is init else "conditional",
        "previous_s": med["previous"],
        "default_s": med["default"],
        "speedup": med["previous"] / med["default"],
        "full_s": med["full"],
        "contract_s": med["contract"],
        "randn_floor_s": med["randn_floor"],
        "gemm_floor_s": med["gemm_floor"],
        # best ratio any draw-then-contract init could reach: its two unavoidable parts, nothing else
        "full_bound": med["previous"] / (med["randn_floor"] + med["gemm_floor"]),
        "materialise_full_s": med["materialise_full"],
        "materialise_default_s": med["materialise_default"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run all sections, print tables and verdicts, write CSV/JSON; exit code 1 if a criterion fails."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and sizes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory", action="store_true", help="also run the d = 784² memory probe")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix for output files, e.g. cuda")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    out = Path(args.out_dir)
    tag = f"_{args.tag}" if args.tag else ""
    q = args.quick
    dev = {"dtype": dtype, "device": args.device}
    print(
        f"# Kronecker SGD benchmark ({'quick' if q else 'full'}) — torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, device {args.device}, threads {args.threads}, {args.dtype}\n"
    )
    verdicts: list[tuple[str, bool]] = []
    summary: dict[str, Any] = {"args": vars(args)}

    # 1. paths ------------------------------------------------------------------------------
    settings = [(1024, 2.0), (4096, 2.0), (16384, 2.0), (65536, math.sqrt(0.4 * math.log(65536))), (65536, 3.0)]
    path_rows = []
    for m, b in settings:
        path_rows += compare_paths(
            (64, 64), m=m, n=256, batch=16, b=b, steps=15 if q else 40, profile_steps=5 if q else 10, **dev
        )
    print("## Activated-neuron paths (d = 4,096, n = 256, |B| = 16; ms per step and per phase)\n")
    print(markdown_table(path_rows, PATH_COLS))
    for m, b in settings[:4]:
        r = next(r for r in path_rows if r["m"] == m and r["b"] == b and r["contender"] == "default")
        # the default is the trainer of the path its rule picks (ratio exactly 1 where that is the scan)
        note = " (the default is the scan here)" if r["path"] == "scan" else ""
        text = f"default ({r['path']}) at m={m}, b={b:.3f}: {r['vs_scan']:.3f}x the scan <= 1.0{note}"
        verdicts.append((text, r["vs_scan"] <= 1.0))
    write_csv(path_rows, out / f"kron_paths{tag}.csv")
    summary["paths"] = path_rows

    # 2. d sweep ----------------------------------------------------------------------------
    sides = (16, 64, 256, 512) if q else (16, 32, 64, 128, 256, 512)
    d_rows = []
    for s in sides:
        dense_steps = 2 if s >= 512 else (3 if s >= 256 else 5)
        d_rows.append(
            compare_at(
                (s, s), m=1024, n=256, batch=16, b=2.0, kron_steps=20 if q else 40, dense_steps=dense_steps, **dev
            )
        )
    slope_kron = fit_slope([r["d"] for r in d_rows], [r["kron_ms"] for r in d_rows])
    slope_dense = fit_slope([r["d"] for r in d_rows], [r["dense_ms"] for r in d_rows])
    top = d_rows[-1]
    print("\n## Per-step time against d (m = 1,024, n = 256, |B| = 16, b = 2)\n")
    print(markdown_table(d_rows, D_COLS))
    print(f"\nfitted slope of log(ms) vs log(d): Kronecker {slope_kron:.3f}, dense {slope_dense:.3f}")
    verdicts += [
        (f"Kronecker step slope in d {slope_kron:.3f} <= 0.1", slope_kron <= 0.1),
        (f"speed-up at d={top['d']:,} {top['speedup']:.0f}x >= 1000x (dense: {top['dense_steps']} timed steps)",
         top["speedup"] >= 1000),
    ]
    write_csv(d_rows, out / f"kron_d_sweep{tag}.csv")
    summary["d_sweep"] = {"rows": d_rows, "slope_kron": slope_kron, "slope_dense": slope_dense}

    # 3. m sweep ----------------------------------------------------------------------------
    widths = (1024, 4096, 16384) if q else (1024, 4096, 16384, 65536)
    m_rows, m_slopes = [], {}
    for label, rule in (("b=2", lambda m: 2.0), ("b=sqrt(0.4 ln m)", lambda m: math.sqrt(0.4 * math.log(m)))):
        rows = [
            compare_at((64, 64), m=m, n=256, batch=16, b=rule(m), kron_steps=15 if q else 30, dense=False, **dev)
            for m in widths
        ]
        for r in rows:
            r["rule"] = label
        m_rows += rows
        ms = [r["m"] for r in rows]
        m_slopes[label] = {
            "step": fit_slope(ms, [r["kron_ms"] for r in rows]),
            "active_per_point": fit_slope(ms, [r["active_per_point"] for r in rows]),
            "touched_per_step": fit_slope(ms, [r["touched_per_step"] for r in rows]),
        }
    print("\n## Width sweep (d = 4,096, n = 256, |B| = 16)\n")
    print(markdown_table(m_rows, ["rule"] + M_COLS))
    for label, sl in m_slopes.items():
        print(f"\nslopes in m, {label}: step {sl['step']:.2f}, active/point {sl['active_per_point']:.2f}, "
              f"touched/step {sl['touched_per_step']:.2f}")
    write_csv(m_rows, out / f"kron_m_sweep{tag}.csv")
    summary["m_sweep"] = {"rows": m_rows, "slopes": m_slopes}

    # 4. n sweep ----------------------------------------------------------------------------
    counts = (64, 256, 1024) if q else (64, 256, 1024, 4096)
    n_rows, slope_n = [], {}
    for side in (16, 64):
        rows = [
            compare_at((side, side), m=1024, n=n, batch=16, b=2.0, kron_steps=15 if q else 30, dense_steps=5, **dev)
            for n in counts
        ]
        n_rows += rows
        slope_n[side * side] = fit_slope([r["n"] for r in rows], [r["kron_ms"] for r in rows])
    print("\n## Data-set size sweep at d = 256 and 4,096 (m = 1,024, |B| = 16, b = 2): where dense SGD wins\n")
    print(markdown_table(n_rows, ["d"] + N_COLS))
    for d, sl in slope_n.items():
        print(f"\nfitted slope of the Kronecker step in n at d = {d:,}: {sl:.2f} (dense SGD does not depend on n)")
    write_csv(n_rows, out / f"kron_n_sweep{tag}.csv")
    summary["n_sweep"] = {"rows": n_rows, "slope_n": slope_n}

    # 5. initialisation -----------------------------------------------------------------------
    init_rows = [init_in_turns(s, m=1024, n=256, reps=1 if q else 3, dtype=dtype) for s in (256, 512)]
    for r in init_rows:  # the whole trainer's init against dense SGD, from the d sweep (same m, n, b)
        r["break_even_steps"] = next((x["break_even_steps"] for x in d_rows if x["d"] == r["d"]), math.nan)
    print("\n## Initialisation Z(0) = W(0) X^T (m = 1,024, n = 256): previous code vs the default and the full draw,"
          " in turns\n")
    print(markdown_table(init_rows, INIT_COLS))
    at65k = init_rows[0]
    verdicts.append((
        f"initialisation at d=65,536 ({at65k['draw']} draw) {at65k['speedup']:.2f}x faster >= 3x "
        f"(any draw-then-contract: <= {at65k['full_bound']:.2f}x)",
        at65k["speedup"] >= 3,
    ))
    write_csv(init_rows, out / f"kron_init{tag}.csv")
    summary["init"] = init_rows

    # 6. memory -------------------------------------------------------------------------------
    if args.memory:
        mem = memory_probe(size=28, m=1024, n=128, batch=16, b=2.0, dtype=args.dtype, device=args.device,
                           steps=10 if q else 30)
        print("\n## Memory at d = 784² = 614,656 (fresh process)\n")
        print(markdown_table([mem], ["d", "m", "n", "kron_init_s", "kron_ms", "peak_rss_mb", "rss_after_import_mb",
                                     "dense_W_gb"]))
        write_csv([mem], out / f"kron_memory{tag}.csv")
        summary["memory"] = mem

    print("\n## Criteria\n")
    for text, ok in verdicts:
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    summary["verdicts"] = [{"criterion": t, "pass": ok} for t, ok in verdicts]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kron_summary{tag}.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nCSV/JSON written to {out}/kron_*{tag}.*")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
