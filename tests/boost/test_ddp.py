"""BoostTransform under torchrun (2 CPU processes, gloo): both ranks contract to the same tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quicktrain import models


@pytest.mark.slow
def test_boost_under_torchrun(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_boost_script.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["contracted_at"] == ranks[1]["contracted_at"] == 4
    tiny = models.get_model("cnn", num_classes=10, in_shape=(1, 8, 8)).state_dict()
    assert {k: v.shape for k, v in ranks[0]["state"].items()} == {k: v.shape for k, v in tiny.items()}
    # parameters agree (DDP re-broadcasts rank 0's contracted weights when it wraps the tiny model); BatchNorm
    # running statistics may differ by the last step's local batch, as in any DDP run (synced at next forward)
    params = {k for k, _ in models.get_model("cnn", num_classes=10, in_shape=(1, 8, 8)).named_parameters()}
    for k in params:
        torch.testing.assert_close(ranks[1]["state"][k], ranks[0]["state"][k], rtol=0, atol=0)
    saved = torch.load(tmp_path / "run" / "model.pt")
    assert saved["model"].keys() == tiny.keys()
