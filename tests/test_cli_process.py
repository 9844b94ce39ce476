"""``quicktrain`` as a process: help speed, exit status and stderr, Ctrl-C, the start-up summary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from quicktrain import cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _quicktrain(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quicktrain.cli", *args], capture_output=True, text=True, env=ENV,
                          **kwargs)


def test_top_level_help_is_fast_and_imports_no_part_and_no_torch():
    start = time.perf_counter()
    done = _quicktrain("--help")
    assert time.perf_counter() - start < 1.0 and done.returncode == 0
    for command in ("train", "demo", "report", "bench", "boost", "ghn", "kron", "prune"):
        assert command in done.stdout
    probe = "import sys; from quicktrain import cli; cli.get_args_parser(command=None); print(sorted(sys.modules))"
    modules = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "'torch'" not in modules and "quicktrain.ghn" not in modules and "quicktrain.train" not in modules


def test_every_train_flag_has_help_text_and_shows_its_default():
    parser = cli.get_args_parser(command="train")
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    options = [a for a in train._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 40
    assert all(a.help and a.help.strip() for a in options), [a.dest for a in options if not a.help]
    text = train.format_help().replace("\n", " ")
    assert text.count("(default:") == len(options)


def test_errors_are_one_line_with_status_2_and_debug_shows_the_traceback():
    done = _quicktrain("train", "--lr", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["quicktrain: error: lr = 0.0: must be a finite number > 0"]
    debug = _quicktrain("train", "--lr", "0", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_ctrl_c_says_how_to_continue_and_resume_does(tmp_path: Path):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--epochs", "400", "--no-progress", "--out", str(out)]
    # a shell's background job inherits SIGINT ignored; the child must get the default, as in a terminal
    process = subprocess.Popen([sys.executable, "-m", "quicktrain.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (out / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None and (out / "last.pt").exists(), "the run ended or wrote no checkpoint in time"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted; continue with `quicktrain train --resume --out {out}`"
    from quicktrain.train import load_checkpoint

    next_epoch = str(load_checkpoint(out / "last.pt")["epoch"] + 1)
    resumed = _quicktrain(*[next_epoch if a == "400" else a for a in args], "--resume", timeout=600)
    assert resumed.returncode == 0 and "final: test acc" in resumed.stdout, resumed.stderr


def test_start_up_summary_names_device_data_model_steps_and_parts(tmp_path: Path):
    done = _quicktrain("train", "--model", "cnn", "--epochs", "1", "--max-steps-per-epoch", "2", "--precond",
                       "kfac", "--out", str(tmp_path / "run"), timeout=600)
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    for words in ("loading digits", "device cpu", "train 1257, val 180, test 360", "cnn:", "parameters",
                  "1 epochs x 2 steps = 2 at batch 64", "kfac preconditioner", "epoch   1/1", "final: test acc"):
        assert words in text, words
