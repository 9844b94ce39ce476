"""Every torchvision classifier (10 classes): all parameters predicted with the right shape, finite."""

import gc

import pytest
import torch

from quicktrain import models
from quicktrain.ghn import GHN, ghn_config, predict_into

# models whose spatial reductions need larger inputs than the registry's 32-pixel default
SIZE = {"alexnet": 64, "maxvit_t": 224, "vit_h_14": 42, "inception_v3": 75}
FAST = [
    "resnet18",
    "mobilenet_v3_small",
    "squeezenet1_1",
    "efficientnet_b0",
    "googlenet",
    "densenet121",
    "swin_t",
]


@pytest.fixture(scope="module")
def ghn() -> GHN:
    torch.manual_seed(0)
    return GHN(ghn_config("T")).eval()


def _check(name: str, ghn: GHN) -> None:
    size = SIZE.get(name, 32)
    model = models.get_model(f"tv:{name}", num_classes=10, in_shape=(3, size, size))
    x = torch.randn(2, 3, size, size)
    report = predict_into(model, ghn, example_inputs=x, bn_batches=[x])
    names = [n for n, _ in model.named_parameters()]
    assert report.unsupported == [] and sorted(report.predicted) == sorted(names), name
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name}: {n}"
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all(), name
    del model, out
    gc.collect()


@pytest.mark.parametrize("name", FAST)
def test_some_torchvision_models(name, ghn):
    _check(name, ghn)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.list_torchvision_models())
def test_every_torchvision_model(name, ghn):
    _check(name, ghn)
