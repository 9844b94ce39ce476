"""Bad input through ``quicktrain`` as a user types it: exit status 2, one line naming the problem, no traceback.

Each case runs the console entry point (:func:`quicktrain.cli.main`) in this process; ``test_cli_process.py``
checks the same behaviour in real subprocesses (exit status, stderr, Ctrl-C, ``torchrun``).
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quicktrain import cli
from quicktrain.train import TrainConfig, fit

QUICK = ["--model", "mlp", "--epochs", "1", "--max-steps-per-epoch", "2", "--no-progress"]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A folder with a finished run, broken checkpoints, recipes and image folders to point the CLI at."""
    root = tmp_path_factory.mktemp("bad-input")
    fit(TrainConfig(model="mlp", epochs=1, max_steps_per_epoch=2, progress=False, out=str(root / "run")))
    (root / "corrupt").mkdir()
    (root / "corrupt" / "last.pt").write_bytes(b"not a checkpoint at all")
    (root / "unsafe").mkdir()
    torch.save({"code": _Evil()}, root / "unsafe" / "last.pt")
    (root / "final-as-last").mkdir()
    (root / "final-as-last" / "last.pt").write_bytes((root / "run" / "model.pt").read_bytes())
    (root / "empty").mkdir()
    recipes = {
        "bool-string": 'boost = "false"',
        "fractional": "epochs = 1.5",
        "list": "lr = [0.1, 0.2]",
        "unknown": "epochz = 3",
        "toml": "epochs = ",
        "dataset": 'dataset = "nope"',
        "negative": "[budget]\nbatch_size = -4",
    }
    for name, text in recipes.items():
        (root / f"{name}.toml").write_text(text)
    _image_tree(root / "extra-class", {"train": ("a", "b"), "test": ("a", "b", "c")})
    _image_tree(root / "truncated", {"train": ("a", "b"), "test": ("a", "b")})
    broken = root / "truncated" / "train" / "b" / "0.png"
    broken.write_bytes(broken.read_bytes()[:60])
    _image_tree(root / "test-only", {"test": ("a",)})
    (root / "no-epochs").mkdir()
    (root / "no-epochs" / "metrics.jsonl").write_text('{"kind": "config", "step": 0, "epoch": 0, "config": {}}\n')
    return root


class _Evil:
    """Pickled as a class instance: a checkpoint holding code, which ``weights_only=True`` must refuse."""


def _image_tree(root: Path, splits: dict[str, tuple[str, ...]]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


CASES = [
    # (argv; "{p}" is the fixture folder), words the message must contain
    (["train", "--epochs", "1.5"], ["--epochs", "invalid int value", "1.5"]),
    (["train", "--lr", "abc"], ["--lr", "invalid float value"]),
    (["train", "--lr", "0"], ["lr = 0.0", "finite number > 0"]),
    (["train", "--lr", "nan"], ["lr = nan", "finite"]),
    (["train", "--lr", "-1"], ["lr = -1.0"]),
    (["train", "--epochs", "0"], ["epochs = 0", "at least 1"]),
    (["train", "--epochs"], ["--epochs", "expected one argument"]),
    (["train", "--batch-size", "0"], ["batch_size = 0", "at least 1"]),
    (["train", "--max-steps-per-epoch", "-1"], ["max_steps_per_epoch = -1", "at least 1"]),
    (["train", "--save-every-steps", "0"], ["save_every_steps = 0"]),
    (["train", "--warmup-steps", "-3"], ["warmup_steps = -3"]),
    (["train", "--threads", "0"], ["threads = 0"]),
    (["train", "--momentum", "1.5"], ["momentum = 1.5"]),
    (["train", "--weight-decay", "-1"], ["weight_decay = -1.0"]),
    (["train", "--damping", "0"], ["damping = 0.0"]),
    (["train", "--grafting", "rms"], ["grafting = 'rms'", "must be one of"]),
    (["train", "--precond", "psgd", "--grafting", "adam", *QUICK], ["--grafting adam does not apply to 'psgd'"]),
    (["train", "--boost-ratio", "0"], ["boost_ratio = 0.0", "> 0"]),
    (["train", "--plt-start", "0.9", "--plt-end", "0.5"], ["plt_start", "plt_end"]),
    (["train", "--classes", ""], ["classes", "empty"]),
    (["train", "--classes", "abc", *QUICK], ["cannot read classes 'abc'"]),
    (["train", "--classes", "0-42", *QUICK], ["subset of 0..9"]),
    (["train", "--optimizer", "lbfgs"], ["--optimizer", "invalid choice: 'lbfgs'"]),
    (["train", "--model", "nope", "--no-progress"], ["Unknown model 'nope'", "choose from"]),
    (["train", "--dataset", "nope", "--no-progress"], ["Unknown dataset 'nope'", "folder:PATH"]),
    (["train", "--dataset", "folder:", *QUICK], ["folder: needs a path"]),
    (["train", "--dataset", "folder:{p}/missing", *QUICK], ["missing does not exist"]),
    (["train", "--dataset", "folder:{p}/extra-class", *QUICK], ["classes that train/ lacks", "['c']"]),
    (["train", "--dataset", "folder:{p}/truncated", *QUICK], ["cannot decode image", "0.png"]),
    (["train", "--dataset", "folder:{p}/test-only", *QUICK], ["has test/ but no train/"]),
    (["train", "--device", "tpu", *QUICK], ["--device 'tpu'"]),
    (["train", "--device", "cpu", "--amp", *QUICK], ["--amp", "CUDA"]),
    (["train", "--batch-size", "5000", *QUICK], ["exceeds the 1257 training examples", "--batch-size"]),
    (["train", "--init", "foo", *QUICK], ["Unknown --init 'foo'"]),
    (["train", "--init", "ghn:{p}/missing.pt", *QUICK], ["missing.pt"]),
    (["train", "--precond", "nope", *QUICK], ["Unknown preconditioner 'nope'"]),
    (["train", "--consolidate", "{p}/run", "--boost", *QUICK], ["--consolidate", "cannot be combined"]),
    (["train", "--consolidate", "{p}/empty", *QUICK], ["empty"]),
    (["train", "--tensorboard", *QUICK], ["--tensorboard", "--out"]),
    (["train", "--resume", *QUICK], ["--resume needs --out"]),
    (["train", "--resume", "--out", "{p}/empty", *QUICK], ["does not exist"]),
    (["train", "--resume", "--overwrite", "--out", "{p}/run", *QUICK], ["--resume", "--overwrite", "one of them"]),
    (["train", "--out", "{p}/run", *QUICK], ["already holds a run", "--resume", "--overwrite"]),
    (["train", "--resume", "--out", "{p}/run", *QUICK, "--model", "cnn"], ["different run", "model: saved 'mlp'"]),
    (["train", "--resume", "--out", "{p}/run", *QUICK, "--seed", "3"], ["different run", "seed"]),
    (["train", "--resume", "--out", "{p}/corrupt", *QUICK], ["corrupt", "delete it"]),
    (["train", "--resume", "--out", "{p}/unsafe", *QUICK], ["unsafe", "pickled"]),
    (["train", "--resume", "--out", "{p}/final-as-last", *QUICK], ["final model file", "last.pt"]),
    (["train", "--recipe", "{p}/missing.toml"], ["recipe", "does not exist"]),
    (["train", "--recipe", "{p}/bool-string.toml"], ["boost = 'false'", "expected a bool", "without quotes"]),
    (["train", "--recipe", "{p}/fractional.toml"], ["epochs = 1.5", "expected an integer"]),
    (["train", "--recipe", "{p}/list.toml"], ["lr = [0.1, 0.2]", "expected a number"]),
    (["train", "--recipe", "{p}/unknown.toml"], ["unknown setting 'epochz'"]),
    (["train", "--recipe", "{p}/toml.toml"], ["not valid TOML"]),
    (["train", "--recipe", "{p}/negative.toml"], ["batch_size = -4"]),
    (["train", "--recipe", "{p}/dataset.toml", "--no-progress"], ["Unknown dataset 'nope'"]),
    (["report", "{p}/empty"], ["metrics.jsonl not found"]),
    (["report", "{p}/no-epochs"], ["no completed epoch"]),
    (["nope"], ["invalid choice: 'nope'"]),
    (["train", "--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
]


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_with_status_2(place, capsys, argv, words):
    argv = [a.replace("{p}", str(place)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    for word in words:
        assert word.replace("{p}", str(place)) in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]


def test_the_suite_has_at_least_40_cases():
    assert len(CASES) >= 40


def test_debug_shows_the_traceback_instead(place):
    with pytest.raises(ValueError, match="Unknown model 'nope'"):
        cli.main(["train", "--model", "nope", "--no-progress", "--debug"])


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cli.main(["train", *QUICK, "--out", str(out)])
    before = (out / "last.pt").read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *QUICK, "--out", str(out), "--resume", "--epochs", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "disk full while writing" in err and "--resume" in err
    assert "Traceback" not in err
    assert (out / "last.pt").read_bytes() == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_an_unknown_error_is_not_hidden(monkeypatch):
    def bug(args):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(cli, "cmd_report", bug)
    with pytest.raises(KeyError):
        cli.main(["report", "somewhere"])
