"""A worker killed mid-epoch under ``torchrun --max-restarts`` resumes from the last checkpoint."""

import os
import subprocess
import sys
import textwrap

import torch

from quicktrain.train import load_checkpoint

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from quicktrain.train import AutogradGradients, Hooks, TrainConfig, fit

    class KilledOnce(AutogradGradients):
        calls = 0

        def forward_backward(self, inputs, targets):
            KilledOnce.calls += 1
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if first_attempt and os.environ.get("RANK") == "1" and KilledOnce.calls == int(sys.argv[2]):
                os._exit(13)  # a hard crash: no clean-up, no checkpoint
            return super().forward_backward(inputs, targets)

    config = TrainConfig(dataset="digits", model="mlp", epochs=3, batch_size=64, lr=0.02, optimizer="sgd",
                         max_steps_per_epoch=5, device="cpu", progress=False, out=sys.argv[1], auto_resume=True)
    fit(config, Hooks(gradients=KilledOnce))
    """
)


def _torchrun(tmp_path, out, kill_at_call, restarts):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(restarts),
        str(script),
        str(out),
        str(kill_at_call),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    print(done.stderr, file=sys.stderr)  # pytest shows it if the test fails: the workers' errors precede torchrun's
    return done


def test_killed_worker_resumes_and_matches_the_uninterrupted_run(tmp_path):
    clean = _torchrun(tmp_path, tmp_path / "clean", kill_at_call=-1, restarts=0)
    assert clean.returncode == 0
    killed = _torchrun(tmp_path, tmp_path / "killed", kill_at_call=8, restarts=1)  # step 7, inside epoch 2
    assert killed.returncode == 0
    assert "(exitcode: 13)" in killed.stderr  # the first attempt really crashed
    a = load_checkpoint(tmp_path / "clean" / "model.pt")
    b = load_checkpoint(tmp_path / "killed" / "model.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-6, atol=1e-7)
    assert a["metrics"]["test_acc"] == b["metrics"]["test_acc"]
    steps = [line for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert len([s for s in steps if '"kind": "step"' in s]) == 15  # the dead attempt's epoch-2 steps were dropped


def test_without_restarts_the_crash_fails_the_job_and_keeps_the_checkpoint(tmp_path):
    result = _torchrun(tmp_path, tmp_path / "run", kill_at_call=8, restarts=0)
    assert result.returncode != 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
