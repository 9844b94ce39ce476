"""Base supervision (NetAug's loss on NetBooster's giant): gradients against an independent two-copy reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quicktrain import models
from quicktrain.boost import BoostTransform, base_supervision, expand, get_slopes, is_giant, set_slope
from quicktrain.train import Hooks, TrainConfig, fit
from quicktrain.train.hooks import AutogradGradients


def _giant(slope: float) -> nn.Module:
    torch.manual_seed(0)
    tiny = models.get_model("tinycnn", num_classes=10, in_shape=(1, 8, 8))
    giant = expand(tiny, ratio=2, zero_init=False)  # non-identity blocks, so the slope changes the function
    set_slope(giant, slope)
    return giant.double().train()


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_gradient_is_slope_one_loss_plus_weighted_current_slope_loss(weight: float) -> None:
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    giant, loss_fn = _giant(0.3), nn.CrossEntropyLoss()
    # reference: two independent copies of the same weights, one at slope 1, one at slope 0.3
    at_one, at_alpha = copy.deepcopy(giant), copy.deepcopy(giant)
    set_slope(at_one, 1.0)
    ref_loss = loss_fn(at_one(x), y)
    ref_loss.backward()
    (weight * loss_fn(at_alpha(x), y)).backward()
    expected = [a.grad + b.grad for a, b in zip(at_one.parameters(), at_alpha.parameters(), strict=True)]

    loss, logits = base_supervision(weight)(giant, loss_fn).forward_backward(x, y)
    for got, want in zip(_grads(giant), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss.detach())  # the reported loss is the slope-1 network's
    assert logits.shape == (16, 10) and not logits.requires_grad
    assert set(get_slopes(giant).values()) == {0.3}  # restored after the slope-1 pass
    assert {float(b) for n, b in giant.named_buffers() if n.endswith(".act.slope")} == {0.3}


def test_without_plt_activations_or_at_slope_one_it_is_plain_autograd() -> None:
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    for model in (models.get_model("tinycnn", num_classes=10, in_shape=(1, 8, 8)).double(), _giant(1.0)):
        reference = copy.deepcopy(model)
        AutogradGradients(reference, nn.CrossEntropyLoss()).forward_backward(x, y)
        base_supervision(1.0)(model, nn.CrossEntropyLoss()).forward_backward(x, y)
        for got, want in zip(_grads(model), _grads(reference), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # one pass, not the loss counted twice


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_bad_weight_is_refused_with_the_fix(weight: float) -> None:
    with pytest.raises(ValueError, match="base-supervision weight must be a finite number >= 0"):
        base_supervision(weight)


def test_in_the_loop_it_contracts_to_the_tiny_network() -> None:
    config = TrainConfig(dataset="digits", model="tinycnn", epochs=1, max_steps_per_epoch=10, batch_size=32,
                         progress=False)
    transform = BoostTransform(ratio=2, verbose=False)
    result = fit(config, Hooks(gradients=base_supervision(1.0), transforms=[transform]))
    assert transform.contracted_at == 5 and not is_giant(result.model)
    assert result.metrics["test_acc"] > 0.1  # it trained (10 classes: chance is 0.1)
