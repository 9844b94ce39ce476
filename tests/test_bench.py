"""``quicktrain bench``'s summary: accuracy differences are paired by seed."""

import pytest

from quicktrain import bench
from quicktrain.report import RunRecord


def _run(name: str, seed: int, acc: float, wall: float) -> RunRecord:
    return RunRecord(name=name, config={"seed": seed}, epochs=[{"test_acc": acc, "wall": wall}])


def test_summary_pairs_accuracy_by_seed_and_gives_the_range():
    records = {
        "adamw": [_run("a", 0, 0.80, 10.0), _run("a", 1, 0.90, 10.0)],
        # listed in the other seed order: pairing must follow the seed, not the position
        "+kfac": [_run("k", 1, 0.91, 20.0), _run("k", 0, 0.85, 30.0)],
    }
    rows = bench.summary_rows(records, target=0.99)
    assert rows[0][5] == "+0.0000 [+0.0000, +0.0000]"
    # per seed: 0.85 - 0.80 = +0.05, 0.91 - 0.90 = +0.01; by position it would be +0.11 and -0.05
    assert rows[1][5] == "+0.0300 [+0.0100, +0.0500]"
    assert rows[1][6] == "2.50x"
    assert rows[1][4] == "never"


def test_summary_refuses_a_seed_the_baseline_lacks():
    records = {"adamw": [_run("a", 0, 0.8, 1.0)], "+ghn": [_run("g", 0, 0.8, 1.0), _run("g", 3, 0.8, 1.0)]}
    with pytest.raises(ValueError, match=r"seeds \[3\] that the baseline lacks"):
        bench.summary_rows(records, target=0.9)
