"""``torchrun`` with two CPU ranks (gloo) and DDP: every rank applies the same preconditioner, and it equals one
process on the whole batch (statistics averaged over ranks; exact Fisher, so nothing is sampled)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_torchrun_ranks_agree_with_one_process_on_the_whole_batch(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    for name in worker.METHODS:
        single = worker.grads(worker.model(), name)
        for a, b, c in zip(ranks[0][name], ranks[1][name], single, strict=True):
            torch.testing.assert_close(a, b, msg=f"{name}: ranks differ")
            torch.testing.assert_close(a, c, msg=f"{name}: differs from one process on the whole batch")
