"""Synchronised BatchNorm on CPU against torch's BatchNorm in float64 (one rank: global batch = local batch).

The two-rank equality with one process on the whole batch is tested through ``torchrun`` in test_loop.py.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from quicktrain.train.syncbn import CpuSyncBatchNorm, synchronised_view


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(("make", "shape"), [(nn.BatchNorm2d, (6, 3, 5, 4)), (nn.BatchNorm1d, (7, 3))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cpu_sync_batchnorm_equals_batchnorm(one_rank_group, make, shape, momentum):
    reference = make(3, momentum=momentum).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    synced = CpuSyncBatchNorm(copy.deepcopy(reference))
    for _ in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = reference(x), synced(x2)
        torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-12)
        weights = torch.randn_like(y)
        (y * weights).sum().backward()
        (y2 * weights).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(synced.bn, name), getattr(reference, name), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(synced.bn.weight.grad, reference.weight.grad, rtol=1e-10, atol=1e-12)
    synced.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(synced(x), reference.eval()(x))


def test_synchronised_view_shares_parameters_and_buffers_and_keeps_the_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 1, 6, 6))
    view = synchronised_view(model, torch.device("cpu"))
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(view[1], CpuSyncBatchNorm)
    assert view[1].bn.running_mean is model[1].running_mean
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}
    plain = nn.Sequential(nn.Linear(3, 2))
    assert synchronised_view(plain, torch.device("cpu")) is plain
