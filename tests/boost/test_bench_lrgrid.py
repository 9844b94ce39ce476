"""benchmarks/boost_lrgrid.py: each contender's learning rate is chosen on validation accuracy, never on test."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def lrgrid(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports benchmarks/boost.py as `boost`
    return importlib.import_module("boost_lrgrid")


def _log(folder: Path, tag: str, lr: float, cells: dict[str, list[tuple[float, float]]]) -> None:
    """boost{tag}.json with one (val, test) accuracy pair per seed for each method."""
    records = [{"kind": "pretrain", "model": "m", "method": method, "variant": "", "seed": seed, "lr": lr,
                "val_acc": val, "test_acc": test} for method, pairs in cells.items()
               for seed, (val, test) in enumerate(pairs)]
    (folder / f"boost{tag}.json").write_text(json.dumps({"args": {"lr": lr}, "records": records}))


def test_rates_are_chosen_on_validation_and_paired_on_test(lrgrid, tmp_path: Path) -> None:
    # vanilla: lr 0.1 has the better validation, lr 0.2 the better test -> 0.1 must be chosen
    low = {"vanilla": [(0.80, 0.70), (0.82, 0.71), (0.81, 0.69)],
           "netbooster": [(0.70, 0.70), (0.71, 0.72), (0.69, 0.71)]}
    high = {"vanilla": [(0.75, 0.90), (0.76, 0.91), (0.74, 0.92)],
            "netbooster": [(0.85, 0.80), (0.86, 0.83), (0.84, 0.81)]}
    _log(tmp_path, "_a", 0.1, low)
    _log(tmp_path, "_b", 0.2, high)
    grid = lrgrid.load_grid(tmp_path, ["_a", "_b"], "m", ["vanilla", "netbooster"])
    seeds = lrgrid.common_seeds(grid)
    chosen = lrgrid.choose(grid, seeds)
    assert chosen == {"vanilla": 0.1, "netbooster": 0.2}
    text, rows = lrgrid.tables(grid, seeds, chosen, "header")
    diffs = 100 * (np.array([t for _, t in high["netbooster"]]) - np.array([t for _, t in low["vanilla"]]))
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    row = next(r for r in rows if r["comparison"] == "netbooster - vanilla" and r["lr"] == [0.2, 0.1])
    assert row["mean"] == pytest.approx(diffs.mean()) and row["low"] == pytest.approx(diffs.mean() - half)
    assert "| netbooster − vanilla | 0.2 vs 0.1 |" in text


def test_a_contender_missing_a_rate_is_a_clear_error(lrgrid, tmp_path: Path) -> None:
    _log(tmp_path, "_a", 0.1, {"vanilla": [(0.8, 0.8), (0.8, 0.8)], "netbooster": [(0.8, 0.8), (0.8, 0.8)]})
    _log(tmp_path, "_b", 0.2, {"vanilla": [(0.8, 0.8), (0.8, 0.8)]})
    grid = lrgrid.load_grid(tmp_path, ["_a", "_b"], "m", ["vanilla", "netbooster"])
    with pytest.raises(SystemExit, match=r"netbooster has no runs at lr \[0.2\]"):
        lrgrid.common_seeds(grid)


def test_the_fine_tuning_grid_is_keyed_by_transfer_lr_and_reads_only_that_protocol(lrgrid, tmp_path: Path) -> None:
    def log(tag: str, transfer_lr: float, val: float) -> None:
        # the pre-training is shared by the tags (the same rows); only the "transfer" protocol's accuracy moves
        rows = [{"kind": kind, "model": "m", "method": "vanilla", "variant": "", "seed": seed,
                 "lr": 0.05 if kind == "pretrain" else transfer_lr, "val_acc": val if kind == "transfer" else 0.99,
                 "test_acc": val if kind == "transfer" else 0.9}
                for kind in ("pretrain", "transfer", "transfer_low") for seed in (0, 1)]
        (tmp_path / f"boost{tag}.json").write_text(
            json.dumps({"args": {"lr": 0.05, "transfer_lr": transfer_lr}, "records": rows}))

    log("_a", 0.01, 0.7)
    log("_b", 0.03, 0.8)
    grid = lrgrid.load_grid(tmp_path, ["_a", "_b"], "m", ["vanilla"], kind="transfer")
    assert sorted(grid["vanilla"]) == [0.01, 0.03]
    assert {r["kind"] for cell in grid["vanilla"].values() for r in cell.values()} == {"transfer"}
    assert lrgrid.choose(grid, [0, 1]) == {"vanilla": 0.03}
    assert sorted(lrgrid.load_grid(tmp_path, ["_a", "_b"], "m", ["vanilla"])["vanilla"]) == [0.05]  # pre-training


def test_kd_rows_are_taken_from_the_tags_of_the_given_weight_only(lrgrid, tmp_path: Path) -> None:
    for tag, alpha, acc in (("_l9", 0.9, 0.7), ("_l1", 0.1, 0.8)):
        rows = [{"kind": "pretrain", "model": "m", "method": method, "variant": "", "seed": seed, "lr": 0.1,
                 "val_acc": acc, "test_acc": acc} for method in ("kd", "vanilla") for seed in (0, 1)]
        (tmp_path / f"boost{tag}.json").write_text(
            json.dumps({"args": {"lr": 0.1, "kd_alpha": alpha}, "records": rows}))
    with pytest.raises(SystemExit, match="appears twice"):  # two weights' KD in one cell
        lrgrid.load_grid(tmp_path, ["_l9", "_l1"], "m", ["kd"])
    grid = lrgrid.load_grid(tmp_path, ["_l9", "_l1"], "m", ["kd"], kd_alpha=0.1)
    assert [r["test_acc"] for r in grid["kd"][0.1].values()] == [0.8, 0.8]
