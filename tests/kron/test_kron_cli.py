"""CLI smoke tests: `kron train` and `kron bench` through argparse, tiny sizes."""

import argparse

import pytest

from quicktrain.kron import cli


def _parse(argv):
    parser = argparse.ArgumentParser(prog="quicktrain")
    cli.add_subparser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_train_teacher_with_dense_check(tmp_path, capsys):
    args = _parse(
        [
            "kron",
            "train",
            "--task",
            "teacher",
            "--dims",
            "4,5",
            "--n",
            "40",
            "--n-test",
            "10",
            "--m",
            "64",
            "--b",
            "0.5",
            "--steps",
            "12",
            "--batch",
            "4",
            "--dtype",
            "float64",
            "--check-dense",
            "--no-progress",
            "--save",
            str(tmp_path / "state.pt"),
        ]
    )
    summary = args.func(args)
    assert summary["max_pred_dev_vs_dense"] < 1e-10
    assert (tmp_path / "state.pt").exists() and "test_mse" in summary
    assert "kron: task=teacher" in capsys.readouterr().out


def test_train_digits_default_b():
    summary = cli.main(
        [
            "train",
            "--task",
            "digits",
            "--n",
            "64",
            "--n-test",
            "16",
            "--m",
            "128",
            "--steps",
            "5",
            "--no-progress",
        ]
    )
    assert summary["d"] == 4096 and 0.0 <= summary["test_acc"] <= 1.0


def test_bench_writes_csv_and_png(tmp_path):
    rows = cli.main(
        [
            "bench",
            "--sides",
            "4,8",
            "--m",
            "32",
            "--n",
            "16",
            "--batch",
            "4",
            "--b",
            "0.5",
            "--kron-steps",
            "2",
            "--dense-steps",
            "2",
            "--no-progress",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert [r["d"] for r in rows] == [16, 64]
    assert (tmp_path / "kron_cli_bench.csv").read_text().startswith("d,")
    assert (tmp_path / "kron_cli_bench.png").stat().st_size > 1000


def test_bad_cli_values():
    with pytest.raises(SystemExit):
        _parse(["kron", "train", "--dims", "4,x"])
    with pytest.raises(ValueError, match="Unknown task"):
        cli.build_dataset("mnist", n=4, dims=(2, 2), size=8, seed=0, dtype=None)
