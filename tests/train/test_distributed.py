"""The process group that ``init_distributed`` creates is destroyed before the interpreter finalises."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import atexit
    import torch
    import torch.distributed as dist
    from quicktrain.train.distributed import init_distributed

    # atexit runs handlers last-in first-out: this one runs after any that init_distributed registers.
    # Each line is one f-string, one write: print("a", b) writes its pieces separately, and two workers
    # sharing the pipe can interleave them ("sum:sum: 2 2").
    atexit.register(lambda: print(f"alive at exit: {dist.is_initialized()}", flush=True))
    init_distributed(torch.device("cpu"))
    total = torch.ones(1)
    dist.all_reduce(total)
    print(f"sum: {int(total.item())}", flush=True)
    """
)


def test_the_group_is_gone_before_python_finalises(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    print(done.stderr, file=sys.stderr)
    assert done.returncode == 0
    assert done.stdout.count("sum: 2") == 2
    assert done.stdout.count("alive at exit: False") == 2
