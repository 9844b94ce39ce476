"""Run by ``torchrun --nproc_per_node 2`` from test_ddp.py: a boosted run under DistributedDataParallel."""

import sys
from pathlib import Path

import torch

from quicktrain.boost import BoostTransform
from quicktrain.train import Hooks, TrainConfig, fit

if __name__ == "__main__":
    out = Path(sys.argv[1])
    config = TrainConfig(dataset="digits", model="cnn", epochs=2, lr=3e-3, progress=False, out=str(out / "run"),
                         max_steps_per_epoch=4, batch_size=32, eval_batch_size=500, device="cpu")
    transform = BoostTransform(ratio=2, plt_start=0.25, plt_end=0.5)
    result = fit(config, Hooks(transforms=[transform]))
    rank = torch.distributed.get_rank()
    torch.save({"state": result.model.state_dict(), "contracted_at": transform.contracted_at}, out / f"rank{rank}.pt")
