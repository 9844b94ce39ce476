"""MCU-scale registry models, and the robustness items: batch of 1, fractional ratios, skip reasons,
the linear over-parameterisation ablation, contracted MCU models exported to ONNX."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quicktrain import models
from quicktrain.boost import (
    BoostTransform,
    contract,
    count_params,
    expand,
    get_slopes,
    is_giant,
    plan_expansion,
    set_slope,
)
from quicktrain.boost.export import export_model
from quicktrain.cli import parse_args
from quicktrain.compose import build_hooks
from quicktrain.train import Hooks, TrainConfig, fit

SIZES = [("microcnn", 1_000, 2_000), ("tinycnn", 5_000, 10_000), ("mobilenetv2_mcu", 40_000, 50_000)]


@pytest.mark.parametrize(("name", "low", "high"), SIZES)
def test_mcu_models_are_mcu_sized(name: str, low: int, high: int) -> None:
    model = models.get_model(name, num_classes=10, in_shape=(1, 28, 28))
    assert low < count_params(model) <= high


@pytest.mark.parametrize("name", ["tinycnn", pytest.param("mobilenetv2_mcu", marks=pytest.mark.slow)])  # ONNX: ~1 min
def test_contracted_mcu_model_exports_to_onnx_with_the_same_outputs(tmp_path, name: str) -> None:
    tiny = models.get_model(name, num_classes=10, in_shape=(1, 28, 28))
    giant = expand(tiny, ratio=1.5)
    giant.train()
    giant(torch.randn(8, 1, 28, 28))  # running statistics of the blocks move away from the identity's
    set_slope(giant, 1.0)
    small = contract(giant).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(small(x), giant.eval()(x), rtol=1e-4, atol=1e-5)
    # export_model runs the ONNX file (onnxruntime) and the TorchScript file against eager PyTorch
    written = export_model(small, (1, 28, 28), tmp_path, atol=1e-4)
    assert written["onnx"].stat().st_size > 0


def test_batch_of_one_in_train_mode_is_a_clear_error_and_works_in_eval_mode() -> None:
    giant = expand(models.get_model("mobilenetv2_mcu", num_classes=10, in_shape=(1, 28, 28)), ratio=2)
    with pytest.raises(ValueError, match=r"one value per channel .* batch size >= 2"):
        giant.train()(torch.randn(1, 1, 28, 28))  # the blocks after the 1x1 feature maps see 1 value
    assert giant.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    assert giant.train()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    linear = expand(nn.Sequential(nn.Linear(3, 4)), ratio=2).train()
    with pytest.raises(ValueError, match="one value per channel"):
        linear(torch.randn(1, 3))


def test_fractional_boost_ratio_from_the_command_line() -> None:
    args = parse_args(["train", "--boost", "--boost-ratio", "1.5"])
    assert args.boost_ratio == 1.5
    config = TrainConfig(boost=True, boost_ratio=1.5, model="tinycnn")
    (transform,) = build_hooks(config).transforms
    giant = transform.before_training(models.get_model("tinycnn", num_classes=10, in_shape=(1, 28, 28)))
    widths = [b.blocks[0].bn1.num_features for b in giant.modules() if hasattr(b, "blocks")]
    assert widths == [12, 24, 48, 15]  # round(1.5 * C) for C = 8, 16, 32 and the 10 logits
    with pytest.raises(ValueError, match="expansion ratio must be a positive number"):
        BoostTransform(ratio=0)


def test_multihead_attention_out_proj_is_skipped_for_the_right_reason() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    plan = plan_expansion(Attn())
    assert "read directly by nn.MultiheadAttention" in plan.skipped["attn.out_proj"]
    assert "subclass" not in plan.skipped["attn.out_proj"]
    assert list(plan.expanded) == ["head"]


def test_linear_ablation_has_slope_one_throughout_and_contracts_at_plt_end(tmp_path) -> None:
    transform = BoostTransform(ratio=2, plt_start=0.3, plt_end=0.5, linear=True, verbose=False)
    assert [transform.slope_at(s, 10) for s in (0, 3, 9)] == [1.0, 1.0, 1.0]
    giant = transform.before_training(models.get_model("tinycnn", num_classes=10, in_shape=(1, 8, 8)))
    assert set(get_slopes(giant).values()) == {0.0}  # the slope is set at the first step
    assert transform.on_step_start(giant, 0, 10) is giant and set(get_slopes(giant).values()) == {1.0}
    assert transform.on_step_start(giant, 4, 10) is giant  # still the giant before plt_end
    assert not is_giant(transform.on_step_start(giant, 5, 10)) and transform.contracted_at == 5
    config = TrainConfig(dataset="digits", model="tinycnn", epochs=1, max_steps_per_epoch=10, batch_size=32,
                         progress=False)
    run = BoostTransform(ratio=2, plt_end=0.5, linear=True, verbose=False)
    result = fit(config, Hooks(transforms=[run]))
    assert run.contracted_at == 5 and not is_giant(result.model)
