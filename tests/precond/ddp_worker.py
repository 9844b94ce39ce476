"""``torchrun --nproc_per_node 2 ddp_worker.py OUT``: each rank trains a DDP model on its half of every batch
with each method and saves its final gradients to ``OUT/rank{r}.pt`` (used by test_distributed.py)."""

import sys

import torch
import torch.distributed as dist
from torch import nn

from quicktrain import precond

METHODS = {"kfac": {"fisher_type": "exact"}, "ekfac": {"fisher_type": "exact"}, "smw_ng": {"fisher_type": "exact"},
           "diag_ng": {"fisher_type": "exact"}, "shampoo": {}, "newton_cg": {}, "psgd": {}, "kbfgs": {},
           "curveball": {}}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]


def grads(net: nn.Module, name: str, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    maker = precond.make(name, net, nn.CrossEntropyLoss(), damping=0.1, **METHODS[name])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in data():
        n = x.shape[0] // world
        opt.zero_grad()
        maker.forward_backward(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
        opt.step()
    return [p.grad.clone() for p in net.parameters()]


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {name: grads(nn.parallel.DistributedDataParallel(model()), name, rank, world) for name in METHODS}
    torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
