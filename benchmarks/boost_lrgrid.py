"""The same learning-rate grid for every contender: does NetBooster's lead survive when each contender trains at
its own best learning rate?

Reads ``benchmarks/boost.py`` logs of one model and budget, one tag per ``--lr``, picks each contender's rate by
its mean **validation** accuracy over the seeds (the test split is never looked at for the choice), and pairs the
test accuracies of the contenders at their chosen rates (95% t-intervals over seeds). A second table pairs
NetBooster with vanilla at each rate of the grid, to show whether the comparison depends on the rate.
``vanilla_wall`` at a rate is sized to NetBooster's CPU time at that rate (the step cost does not depend on it).

    python benchmarks/boost.py --models microcnn --methods vanilla netbooster vanilla_wall linear --transfer '' \\
        --steps 429 --epochs 4 --lr LR --seeds 0 1 2 3 4 --tag _micro4_lrLR      # LR = 0.001, 0.004, 0.008
    python benchmarks/boost_lrgrid.py --model microcnn --tags _micro4_lr0.001 _micro4 _micro4_lr0.004 \\
        _micro4_lr0.008 --tag _micro4_lrgrid

``--kind transfer`` (or ``transfer_low``) does the same for the fine-tuning: the tags then share the
pre-training (its rate) and differ in ``--transfer-lr``; each pre-training method gets the fine-tuning rate of
its best validation accuracy on the transfer set.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from boost import mean_std, paired

# (contender, baseline) pairs reported at the chosen rates, where both ran
COMPARISONS = (("netbooster", "vanilla"), ("vanilla", "scratch"), ("netbooster", "vanilla_wall"),
               ("linear", "netbooster"), ("linear", "vanilla"), ("netbooster", "kd"), ("netbooster_base", "netbooster"))


def load_grid(results: Path, tags: list[str], model: str, methods: list[str], kind: str = "pretrain",
              kd_alpha: float | None = None) -> dict[str, dict[float, dict[int, dict[str, Any]]]]:
    """``grid[method][lr][seed]``: the rows of ``kind`` (``pretrain``, or a fine-tuning protocol, ``transfer`` or
    ``transfer_low``, whose rate is ``--transfer-lr``) of ``model`` and ``methods`` (main runs, not variants) in
    each tag's log; with ``kd_alpha``, KD rows only from logs run with that ``--kd-alpha``."""
    grid: dict[str, dict[float, dict[int, dict[str, Any]]]] = {}
    for tag in tags:
        path = results / f"boost{tag}.json"
        if not path.exists():
            raise SystemExit(f"{path} not found: run benchmarks/boost.py with --tag {tag} first (it writes the .json)")
        log = json.loads(path.read_text())
        lr = log["args"]["lr"]
        if kind != "pretrain" and log["args"].get("transfer_lr") is not None:
            lr = log["args"]["transfer_lr"]
        for row in log["records"]:
            if (row.get("kind") != kind or row["model"] != model or row["method"] not in methods
                    or row.get("variant")
                    or (row["method"] == "kd" and kd_alpha is not None and log["args"]["kd_alpha"] != kd_alpha)):
                continue
            if row.get("lr", lr) != lr:
                raise SystemExit(f"boost{tag}.json mixes learning rates ({row['lr']} and {lr}); give one tag per rate")
            cell = grid.setdefault(row["method"], {}).setdefault(lr, {})
            if row["seed"] in cell and cell[row["seed"]]["test_acc"] != row["test_acc"]:
                raise SystemExit(f"{row['method']} seed {row['seed']} at lr {lr} appears twice with different results")
            cell[row["seed"]] = row
    if not grid:
        raise SystemExit(f"no {kind} rows of model {model!r} in tags {tags}")
    return grid


def common_seeds(grid: dict[str, dict[float, dict[int, dict[str, Any]]]]) -> list[int]:
    """The seeds every (contender, rate) cell has; a contender missing a rate of the grid is an error."""
    rates = sorted({lr for cells in grid.values() for lr in cells})
    for method, cells in grid.items():
        missing = [lr for lr in rates if lr not in cells]
        if missing:
            raise SystemExit(f"{method} has no runs at lr {missing}: run it there, or leave that rate's tag out")
    seeds = sorted(set.intersection(*(set(cell) for cells in grid.values() for cell in cells.values())))
    if len(seeds) < 2:
        raise SystemExit(f"only seeds {seeds} ran in every cell of the grid; paired intervals need at least 2")
    return seeds


def choose(grid: dict[str, dict[float, dict[int, dict[str, Any]]]], seeds: list[int]) -> dict[str, float]:
    """Each contender's rate: the highest mean validation accuracy over ``seeds``."""
    return {method: max(cells, key=lambda lr: statistics.mean(cells[lr][s]["val_acc"] for s in seeds))
            for method, cells in grid.items()}


def _test(cell: dict[int, dict[str, Any]], seeds: list[int]) -> dict[int, float]:
    return {s: cell[s]["test_acc"] for s in seeds}


def tables(grid: dict[str, dict[float, dict[int, dict[str, Any]]]], seeds: list[int], chosen: dict[str, float],
           header: str) -> tuple[str, list[dict[str, Any]]]:
    rates = sorted({lr for cells in grid.values() for lr in cells})
    lines = [header, "", "Validation accuracy (%, mean ± std over seeds) by learning rate; **bold**: the rate chosen:",
             "", "| contender | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen lr | test acc at it (%) |",
             "| --- | " + " | ".join("---" for _ in rates) + " | --- | --- |"]
    for method, cells in grid.items():
        vals = []
        for lr in rates:
            text = mean_std([cells[lr][s]["val_acc"] for s in seeds], 100)
            vals.append(f"**{text}**" if lr == chosen[method] else text)
        test = mean_std([cells[chosen[method]][s]["test_acc"] for s in seeds], 100)
        lines.append(f"| {method} | " + " | ".join(vals) + f" | {chosen[method]:g} | {test} |")
    rows: list[dict[str, Any]] = []
    lines += ["", "Paired differences in test accuracy at each contender's chosen rate (points, 95% t-interval):", "",
              "| comparison | rates | difference | 95% interval | per seed | seeds |",
              "| --- | --- | --- | --- | --- | --- |"]
    for mine, theirs in COMPARISONS:
        if mine not in grid or theirs not in grid:
            continue
        a, b = _test(grid[mine][chosen[mine]], seeds), _test(grid[theirs][chosen[theirs]], seeds)
        mean, low, high, n = paired(a, b)
        per_seed = ", ".join(f"{100 * (a[s] - b[s]):+.2f}" for s in seeds)
        lines.append(f"| {mine} − {theirs} | {chosen[mine]:g} vs {chosen[theirs]:g} | {mean:+.2f} | "
                     f"[{low:+.2f}, {high:+.2f}] | {per_seed} | {n} |")
        rows.append({"comparison": f"{mine} - {theirs}", "lr": [chosen[mine], chosen[theirs]], "mean": mean,
                     "low": low, "high": high, "seeds": n})
    if "netbooster" in grid and "vanilla" in grid:
        lines += ["", "NetBooster − vanilla at the same rate (test, points, 95% t-interval):", "",
                  "| lr | netbooster − vanilla | 95% interval |", "| --- | --- | --- |"]
        for lr in rates:
            mean, low, high, _ = paired(_test(grid["netbooster"][lr], seeds), _test(grid["vanilla"][lr], seeds))
            lines.append(f"| {lr:g} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] |")
            rows.append({"comparison": "netbooster - vanilla", "lr": [lr, lr], "mean": mean, "low": low,
                         "high": high, "seeds": len(seeds)})
    return "\n".join(lines), rows


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tags", nargs="+", required=True, help="benchmarks/boost.py tags, one per learning rate")
    p.add_argument("--methods", nargs="+", default=["vanilla", "netbooster", "vanilla_wall", "linear"],
                   help="contenders (each must have run at every rate)")
    p.add_argument("--kind", default="pretrain", choices=["pretrain", "transfer", "transfer_low"],
                   help="pre-training, or a fine-tuning protocol (one tag per --transfer-lr; the pre-training fixed)")
    p.add_argument("--kd-alpha", type=float, default=None,
                   help="take KD rows only from tags run with this --kd-alpha (when tags of two weights are given)")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--tag", required=True, help="suffix of the output files (boost{tag}.md/.json)")
    args = p.parse_args(argv)
    results = Path(args.results)
    grid = load_grid(results, args.tags, args.model, args.methods, args.kind, args.kd_alpha)
    seeds = common_seeds(grid)
    chosen = choose(grid, seeds)
    command = "python benchmarks/boost_lrgrid.py " + " ".join(argv)
    stage = "pre-training" if args.kind == "pretrain" else f"fine-tuning ({args.kind}; rows: pre-training method)"
    header = (f"NetBooster learning-rate grid of the {stage}, {args.model}: each contender at the rate of its best "
              f"mean validation accuracy over seeds {seeds}.\nCommand: {command}")
    text, rows = tables(grid, seeds, chosen, header)
    print(text)
    (results / f"boost{args.tag}.md").write_text(text + "\n")
    (results / f"boost{args.tag}.json").write_text(json.dumps(
        {"command": command, "seeds": seeds, "chosen": chosen, "comparisons": rows}, indent=1))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
