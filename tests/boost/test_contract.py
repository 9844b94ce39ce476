"""Exactness of expand -> linearise -> contract on every supported model, in float32 and float64."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from quicktrain import models
from quicktrain.boost import (
    BoostedLayer,
    block_affine,
    contract,
    count_macs,
    count_params,
    expand,
    plan_expansion,
    set_slope,
)

# name -> (builder, input shape used in the test). Spatial sizes are small to keep the suite fast; the
# models accept them (global pooling). tv:mobilenet_v2 at width 0.35 is built directly with torchvision.
CASES = {
    "mlp": (lambda: models.get_model("mlp", num_classes=10, in_shape=(1, 28, 28)), (1, 28, 28)),
    "cnn": (lambda: models.get_model("cnn", num_classes=10, in_shape=(1, 28, 28)), (1, 13, 11)),
    "resnet20": (lambda: models.get_model("resnet20", num_classes=10, in_shape=(1, 28, 28)), (1, 9, 9)),
    "mobilenetv2_tiny": (
        lambda: models.get_model("mobilenetv2_tiny", num_classes=10, in_shape=(1, 28, 28)), (1, 10, 10)),
    "tinycnn": (lambda: models.get_model("tinycnn", num_classes=10, in_shape=(1, 28, 28)), (1, 12, 9)),
    "mobilenetv2_mcu": (
        lambda: models.get_model("mobilenetv2_mcu", num_classes=10, in_shape=(1, 28, 28)), (1, 28, 28)),
    "tv:mobilenet_v2@0.35": (lambda: torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10), (3, 33, 33)),
    "tv:mobilenet_v3_small": (
        lambda: models.get_model("tv:mobilenet_v3_small", num_classes=10, in_shape=(3, 32, 32)), (3, 33, 33)),
}


def randomize_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics everywhere (giant and tiny BNs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.6 * torch.rand(n, generator=generator) - 0.3)


def inputs_with_borders(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random batch whose border pixels are large, so padded borders matter."""
    x = torch.randn(3, *shape, generator=generator, dtype=torch.float64)
    if len(shape) == 3:
        x[..., 0, :] *= 5
        x[..., -1, :] *= 5
        x[..., :, 0] *= 5
        x[..., :, -1] *= 5
    return x.to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def linearised_giant(tiny: nn.Module, dtype: torch.dtype, *, ratio: float = 2, depth: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    giant = expand(tiny.to(dtype), ratio=ratio, depth=depth, zero_init=False)
    randomize_bn(giant, gen)
    set_slope(giant, 1.0)
    return giant.eval()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"])
def test_contracted_equals_linearised_giant(name: str, dtype: torch.dtype, tol: float) -> None:
    build, shape = CASES[name]
    tiny = build().to(dtype)
    giant = linearised_giant(tiny, dtype)
    small = contract(giant).eval()
    x = inputs_with_borders(shape, dtype, torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = giant(x), small(x)
    assert rel_err(got, want) <= tol
    # exactly the tiny architecture: keys, shapes, dtypes, parameter count and MACs
    ref = tiny.state_dict()
    assert list(small.state_dict()) == list(ref)
    assert {k: (v.shape, v.dtype) for k, v in small.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in ref.items()}
    assert count_params(small) == count_params(tiny)
    if dtype == torch.float32:
        assert count_macs(small, shape) == count_macs(tiny, shape) < count_macs(giant, shape)
    assert not any(isinstance(m, BoostedLayer) for m in small.modules())


@pytest.mark.parametrize("name", ["cnn", "mobilenetv2_tiny", "tv:mobilenet_v3_small"])
def test_identity_blocks_return_original_function(name: str) -> None:
    """expand -> contract without training, identity-initialised blocks: the original function (float64)."""
    build, shape = CASES[name]
    tiny = build().double().eval()
    randomize_bn(tiny, torch.Generator().manual_seed(3))
    giant = expand(tiny, ratio=4).eval()  # zero_init=True: gamma of BN_2 is 0
    x = inputs_with_borders(shape, torch.float64, torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = tiny(x)
        assert rel_err(giant(x), want) <= 1e-14  # the giant starts as the tiny network (at slope 0 too)
        set_slope(giant, 1.0)
        small = contract(giant).eval()
        assert rel_err(small(x), want) <= 1e-14
    for k, v in tiny.state_dict().items():
        torch.testing.assert_close(small.state_dict()[k], v, rtol=1e-14, atol=1e-14)


class Odd(nn.Module):
    """Layers that exercise strides, dilation, padding modes, groups, biases and a BN-folded bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")  # depthwise, with bias
        self.g = nn.Conv2d(8, 12, (1, 3), stride=(1, 2), padding=(0, 1), groups=4, bias=False)  # grouped
        self.bn_g = nn.BatchNorm2d(12)
        self.mult = nn.Conv2d(12, 24, 3, padding=1, groups=12, padding_mode="circular")  # depth multiplier 2
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_g(self.g(torch.relu(self.dw(x)))))
        return self.fc(self.mult(x).mean((2, 3)))


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("ratio", [1.5, 3])
def test_odd_layers_float64(depth: int, ratio: float) -> None:
    tiny = Odd().double()
    giant = linearised_giant(tiny, torch.float64, ratio=ratio, depth=depth)
    assert set(plan_expansion(tiny).expanded) == {"a", "dw", "g", "mult", "fc"}
    assert plan_expansion(tiny).expanded["a"] == "bn_a" and plan_expansion(tiny).expanded["g"] == "bn_g"
    small = contract(giant).eval()
    x = inputs_with_borders((3, 15, 14), torch.float64, torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(small(x), giant(x)) <= 1e-12
    # grouped/depthwise layers keep their weight shape; the block matrices are block diagonal
    assert small.dw.weight.shape == tiny.dw.weight.shape and small.g.weight.shape == tiny.g.weight.shape
    m, _ = block_affine(giant.g.blocks[0])
    mask = torch.block_diag(*[torch.ones(3, 3, dtype=torch.bool)] * 4)
    assert m[~mask].abs().max() == 0 and m[mask].abs().min() > 0
    # the bias of a bias-free conv went into the following BN's running mean
    assert not torch.equal(small.bn_a.running_mean, tiny.bn_a.running_mean)


def test_block_affine_matches_forward() -> None:
    """(M, c) of a linearised block reproduces its eval-mode forward (float64 reference)."""
    giant = linearised_giant(nn.Sequential(nn.Conv2d(2, 6, 1, groups=2)), torch.float64, ratio=3)
    block = giant[0].blocks[0]
    z = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    m, c = block_affine(block)
    want = torch.einsum("oi,nihw->nohw", m, z) + c[:, None, None]
    torch.testing.assert_close(block(z), want, rtol=1e-13, atol=1e-13)


def test_contract_refuses_nonlinear_giant() -> None:
    giant = expand(models.get_model("cnn", num_classes=10, in_shape=(1, 28, 28)), ratio=2)
    with pytest.raises(ValueError, match="not linear yet"):
        contract(giant)
    set_slope(giant, 1.0)
    giant.classifier[1].blocks[0].act.set(0.999)
    with pytest.raises(ValueError, match=r"classifier\.1\.blocks\.0\.act=0\.999"):
        contract(giant)
    with pytest.raises(ValueError, match="nothing to contract"):
        contract(nn.Sequential(nn.Linear(2, 2)))


class NoSink(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)  # no bias, followed by ReLU: cannot take a bias
        self.shared = nn.Linear(4, 4, bias=False)  # no bias, called twice
        self.head = nn.Linear(4, 2)
        self.t = nn.ConvTranspose2d(4, 4, 1)  # unsupported type, unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(self.shared(self.shared(h)))


def test_plan_reports_skipped_layers_with_reasons() -> None:
    plan = plan_expansion(NoSink())
    assert list(plan.expanded) == ["head"]
    assert "does not go only into a BatchNorm" in plan.skipped["conv"]
    assert "called 2 times" in plan.skipped["shared"]
    assert "unsupported layer type ConvTranspose2d" in plan.skipped["t"]
    assert "conv" in plan.summary() and "+ head" in plan.summary()
    with pytest.raises(ValueError, match=r"cannot expand the selected layer\(s\):\n  conv: has no bias"):
        expand(NoSink(), layers=["conv", "head"])
    with pytest.raises(ValueError, match="Unknown layer"):
        expand(NoSink(), layers=["nope"])
    giant = expand(NoSink(), layers=["head"])
    with pytest.raises(ValueError, match="already expanded"):
        expand(giant, layers=["head.layer"])
    assert list(plan_expansion(giant).expanded) == []  # nothing left: block layers are never candidates
    with pytest.raises(ValueError, match="no layer can be expanded"):
        expand(giant)
    with pytest.raises(ValueError, match="ratio must be > 0"):
        expand(NoSink(), ratio=0)


def test_untraceable_model_keeps_biased_layers() -> None:
    """vit_tiny cannot be traced by torch.fx; its layers all have biases, so they still expand exactly."""
    tiny = models.get_model("vit_tiny", num_classes=10, in_shape=(1, 28, 28)).double()
    plan = plan_expansion(tiny)
    assert len(plan.expanded) == 18 and not plan.skipped
    giant = linearised_giant(tiny, torch.float64)
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(contract(giant).eval()(x), giant(x)) <= 1e-10


def test_expand_and_contract_are_pure() -> None:
    tiny = models.get_model("cnn", num_classes=10, in_shape=(1, 28, 28))
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    giant = linearised_giant(tiny, torch.float32)
    giant_state = {k: v.clone() for k, v in giant.state_dict().items()}
    contract(giant)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in giant.state_dict().items():
        assert torch.equal(v, giant_state[k])


def test_count_macs_matches_a_hand_count() -> None:
    """cnn at 28x28: two 3x3 convs (28x28 and 14x14 outputs) and two linear layers, one MAC per weight use."""
    tiny = models.get_model("cnn", num_classes=10, in_shape=(1, 28, 28))
    want = 28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 64 * 16 * 128 + 128 * 10
    assert count_macs(tiny, (1, 28, 28)) == want
    # one expansion block after the first conv adds 2 * r * C MACs per output pixel (expand + project)
    giant = expand(tiny, layers=["features.0.0"], ratio=2)
    assert count_macs(giant, (1, 28, 28)) == want + 28 * 28 * 2 * (2 * 32 * 32)
