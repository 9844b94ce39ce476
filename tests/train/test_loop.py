import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from quicktrain.train import (
    AutogradGradients,
    CheckpointError,
    Hooks,
    NonFiniteLossError,
    TrainConfig,
    fit,
    load_checkpoint,
    lr_at,
    save_checkpoint,
)

BASE = TrainConfig(
    dataset="digits", model="cnn", epochs=4, batch_size=32, lr=3e-3, max_steps_per_epoch=6, progress=False
)


def _weights(path):
    return load_checkpoint(path)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_learns_digits():
    result = fit(dataclasses.replace(BASE, max_steps_per_epoch=None, epochs=3))
    assert result.metrics["test_acc"] > 0.9


def _failing_at_call(n, error):
    """A gradient maker that behaves like autograd but, on its ``n``-th call, spoils the loss or dies."""

    class Failing(AutogradGradients):
        calls = 0

        def forward_backward(self, inputs, targets):
            loss, logits = super().forward_backward(inputs, targets)
            Failing.calls += 1
            if Failing.calls == n:
                if error is None:
                    return loss * math.nan, logits
                raise error
            return loss, logits

    return Failing


def test_resume_continues_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    fit(dataclasses.replace(BASE, out=str(straight)))
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of epoch 3
        fit(dataclasses.replace(BASE, out=str(split)), Hooks(gradients=_failing_at_call(15, KeyboardInterrupt)))
    assert load_checkpoint(split / "last.pt")["epoch"] == 2
    fit(dataclasses.replace(BASE, out=str(split), resume=True))
    _assert_same_weights(_weights(straight / "model.pt"), _weights(split / "model.pt"))
    straight_opt = load_checkpoint(straight / "last.pt")["optimizer"]["state"]
    split_opt = load_checkpoint(split / "last.pt")["optimizer"]["state"]
    for k in straight_opt:
        assert torch.equal(straight_opt[k]["exp_avg_sq"], split_opt[k]["exp_avg_sq"])
    records = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(24))
    straight_records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]

    def losses(rs):
        return [r["loss"] for r in rs if r["kind"] == "step"]

    assert losses(records) == losses(straight_records)


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    fit(dataclasses.replace(BASE, out=str(out), epochs=2))
    with (out / "metrics.jsonl").open("a") as f:  # a run that died mid-epoch 3 left step records behind
        f.write('{"kind": "step", "step": 12, "epoch": 3, "loss": 9.0}\n')
    fit(dataclasses.replace(BASE, out=str(out), resume=True, epochs=3))
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"step", "step": 12,' in line]
    assert len(steps) == 1 and '"loss": 9.0' not in steps[0]


def test_nan_loss_stops_with_step_and_last_finite_loss_and_keeps_checkpoint(tmp_path):
    out = tmp_path / "run"
    fit(dataclasses.replace(BASE, out=str(out), epochs=1))
    before = (out / "last.pt").read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 8 \(epoch 2\); last finite loss was \d"):
        fit(dataclasses.replace(BASE, out=str(out), resume=True), Hooks(gradients=_failing_at_call(3, None)))
    assert (out / "last.pt").read_bytes() == before


def test_bad_checkpoints_give_clear_errors(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="does not exist"):
        fit(dataclasses.replace(BASE, out=str(out), resume=True))
    fit(dataclasses.replace(BASE, out=str(out), epochs=1))
    with pytest.raises(CheckpointError, match=r"different run \(model: saved 'cnn' vs now 'mlp'\)"):
        fit(dataclasses.replace(BASE, model="mlp", out=str(out), resume=True))
    (out / "last.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(dataclasses.replace(BASE, out=str(out), resume=True))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"a": torch.ones(2)}, path)

    def dies_mid_write(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_lr_schedule_closed_form():
    assert lr_at(0, 100, base_lr=1.0) == 1.0
    assert lr_at(50, 100, base_lr=1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, base_lr=1.0) == pytest.approx(0.0)
    assert lr_at(4, 100, base_lr=2.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(60, 100, base_lr=2.0, schedule="constant") == 2.0


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match=r"optimizer = 'lbfgs': must be one of \['sgd', 'adam', 'adamw'\]"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr = nan: must be a finite number > 0"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="exceeds the 1257 training examples"):
        fit(dataclasses.replace(BASE, batch_size=5000))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
DDP_ARGS = ["--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--lr", "0.01", "--max-steps-per-epoch",
            "5", "--device", "cpu", "--optimizer", "sgd"]


def _cli(prefix, args, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*prefix, "-m", "quicktrain.cli", "train", *args, "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:  # pytest shows a failed test's captured stderr: torchrun's and the workers' errors
        print(done.stdout, done.stderr, sep="\n", file=sys.stderr)
    done.check_returncode()
    return done


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_torchrun_two_processes_equal_one_process(tmp_path, model):
    """With BatchNorm (cnn) too: statistics are synchronised, so running means and variances match as well."""
    args = [*DDP_ARGS, "--model", model]
    single = _cli([sys.executable], args, tmp_path / "single")
    double = _cli(TORCHRUN, args, tmp_path / "double")
    a, b = _weights(tmp_path / "single" / "model.pt"), _weights(tmp_path / "double" / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # one rank prints and logs, and its metrics are those of the whole batch and the whole evaluation sets
    assert double.stdout.count("final:") == 1 == single.stdout.count("final:")
    epochs = [[r for r in _records(tmp_path / run) if r["kind"] == "epoch"] for run in ("single", "double")]
    for one, two in zip(*epochs, strict=True):
        for key in ("train_loss", "train_acc", "val_acc", "test_acc"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_torchrun_without_sync_batchnorm_differs_and_an_indivisible_batch_is_refused_first(tmp_path):
    args = [*DDP_ARGS, "--model", "cnn", "--no-progress"]
    _cli([sys.executable], args, tmp_path / "single")
    _cli(TORCHRUN, [*args, "--no-sync-batchnorm"], tmp_path / "local")
    a, b = _weights(tmp_path / "single" / "model.pt"), _weights(tmp_path / "local" / "model.pt")
    gap = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a if k.endswith("running_var"))
    assert gap > 1e-3  # per-rank statistics: not the one-process result (the test above is not vacuous)
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _cli(TORCHRUN, ["--model", "mlp", "--batch-size", "63"], tmp_path / "odd")
    assert "--batch-size 63 does not split evenly over 2 processes" in failed.value.stderr
    assert "loading" not in failed.value.stdout and not (tmp_path / "odd").exists()


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_used_run_folder_is_refused_unless_resumed_or_overwritten(tmp_path):
    fit(dataclasses.replace(BASE, out=str(tmp_path), epochs=2))
    kept = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run .*--resume.*--overwrite"):
        fit(dataclasses.replace(BASE, out=str(tmp_path), epochs=1))
    assert (tmp_path / "metrics.jsonl").read_text() == kept  # nothing was touched
    fit(dataclasses.replace(BASE, out=str(tmp_path), epochs=1, overwrite=True))
    records = _records(tmp_path)
    assert records[0]["kind"] == "config" and records[0]["config"]["epochs"] == 1
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]


def test_resume_from_a_mid_epoch_checkpoint_is_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    fit(dataclasses.replace(BASE, out=str(straight)))
    split = tmp_path / "split"
    every = dataclasses.replace(BASE, out=str(split), save_every_steps=4)
    with pytest.raises(KeyboardInterrupt):  # step 10 is the 5th batch of epoch 2; last save after step 8
        fit(every, Hooks(gradients=_failing_at_call(11, KeyboardInterrupt)))
    state = load_checkpoint(split / "last.pt")
    assert (state["epoch"], state["step"], state["batch"]) == (1, 8, 2)
    fit(dataclasses.replace(every, resume=True))
    _assert_same_weights(_weights(straight / "model.pt"), _weights(split / "model.pt"))

    def losses(out):
        return [r["loss"] for r in _records(out) if r["kind"] == "step"]

    assert losses(split) == losses(straight)
    epochs = [r for r in _records(split) if r["kind"] == "epoch"]
    assert [r["train_acc"] for r in epochs] == [r["train_acc"] for r in _records(straight) if r["kind"] == "epoch"]


def test_nan_stop_keeps_the_last_finite_checkpoint_and_resume_takes_a_lower_lr(tmp_path):
    out = tmp_path / "run"
    fit(dataclasses.replace(BASE, out=str(out), epochs=1))
    before = (out / "last.pt").read_bytes()

    class Exploding(AutogradGradients):
        """Finite losses, but weights blown to infinity on the last step of epoch 2: its evaluation is NaN."""

        calls = 0

        def forward_backward(self, inputs, targets):
            result = super().forward_backward(inputs, targets)
            Exploding.calls += 1
            if Exploding.calls == 6:
                for p in self.model.parameters():
                    p.grad.fill_(math.inf)
            return result

    message = r"after epoch 2 is not finite.*epoch 1, step 6.*--resume --out .* --lr 0.0003"
    with pytest.raises(NonFiniteLossError, match=message):
        fit(dataclasses.replace(BASE, out=str(out), resume=True), Hooks(gradients=Exploding))
    assert (out / "last.pt").read_bytes() == before
    fit(dataclasses.replace(BASE, out=str(out), resume=True, lr=3e-4))
    resumed = [r for r in _records(out) if r["kind"] == "resume"]
    assert resumed[-1]["changed"] == {"epochs": [1, 4], "lr": [3e-3, 3e-4]} and resumed[-1]["step"] == 6
    assert [r["lr"] for r in _records(out) if r["kind"] == "step"][6] == pytest.approx(lr_at(6, 24, base_lr=3e-4))
    with pytest.raises(CheckpointError, match="only --epochs and --lr may change"):
        fit(dataclasses.replace(BASE, out=str(out), resume=True, lr=3e-4, momentum=0.5))


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(dataclasses.replace(BASE, out=str(tmp_path), epochs=2, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("step/loss")]
    logged = [r["loss"] for r in _records(tmp_path) if r["kind"] == "step"]
    assert losses == pytest.approx(logged, rel=1e-6)
    assert [e.step for e in events.Scalars("epoch/test_acc")] == [6, 12]
    assert events.Tags()["tensors"] == ["config/text_summary"]


ONE_RANK_NAN = '''
import dataclasses, math, os
from quicktrain.train import AutogradGradients, Hooks, TrainConfig, fit

class SpoiledOnRankOne(AutogradGradients):
    calls = 0

    def forward_backward(self, inputs, targets):
        loss, logits = super().forward_backward(inputs, targets)
        SpoiledOnRankOne.calls += 1
        if SpoiledOnRankOne.calls == 3 and os.environ["RANK"] == "1":
            return loss * math.nan, logits
        return loss, logits

config = TrainConfig(dataset="digits", model="mlp", epochs=2, batch_size=64, max_steps_per_epoch=5, progress=False)
fit(config, Hooks(gradients=SpoiledOnRankOne))
'''


def test_torchrun_a_nan_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "one_rank_nan.py"
    script.write_text(ONE_RANK_NAN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # without the all-reduced loss, rank 0 would wait forever in the next gradient all-reduce
    done = subprocess.run([*TORCHRUN, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert done.stderr.count("loss became nan at step 2") >= 2, done.stderr[-2000:]
