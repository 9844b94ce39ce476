import json
import re
from pathlib import Path

import matplotlib.image
import pytest

from quicktrain import cli, models


def test_demo_trains_digits_above_90_percent_and_prints_a_table(tmp_path, capsys):
    cli.main(["demo", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    out = captured.out
    assert "quicktrain demo" in out and "test acc" in out
    for label in ("adamw seed 0", "+ghn seed 0", "+kfac seed 0", "+boost seed 0", "all seed 0"):
        assert label in captured.err  # one progress line per run
    assert "epoch   1/" not in captured.err + out  # no per-epoch lines inside the demo
    for summary in tmp_path.glob("*/summary.json"):
        assert json.loads(summary.read_text())["metrics"]["test_acc"] > 0.9
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_train_then_report_draws_the_runs(tmp_path, capsys):
    for seed in (0, 1):
        cli.main(
            [
                "train",
                "--dataset",
                "digits",
                "--model",
                "mlp",
                "--epochs",
                "2",
                "--seed",
                str(seed),
                "--out",
                str(tmp_path / f"run{seed}"),
                "--no-progress",
            ]
        )
    png = tmp_path / "report.png"
    cli.main(["report", str(tmp_path / "run0"), str(tmp_path / "run1"), "--out", str(png)])
    out = capsys.readouterr().out
    assert "run0" in out and "run1" in out
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 500 and image[..., :3].std() > 0.05  # a drawn figure, not a blank canvas


def test_unknown_model_on_the_command_line_lists_the_valid_ones():
    valid = ", ".join(repr(name) for name in models.list_models())
    with pytest.raises(ValueError, match=re.escape(f"choose from [{valid}]")):
        cli.run(["train", "--model", "nope", "--no-progress"])


def test_report_of_a_folder_without_metrics_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        cli.run(["report", str(tmp_path)])


def test_bench_all_writes_under_runs_by_default_not_over_the_committed_results():
    args = cli.parse_args(["bench", "all"])
    assert args.out == "runs/bench-all"
    assert "--out benchmarks/results/all" in (Path(__file__).parents[1] / "README.md").read_text().replace("\n", " ")
