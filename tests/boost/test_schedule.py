"""PLT activations, the slope schedule, and BoostTransform driven by the real training loop."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from quicktrain import models
from quicktrain.boost import (
    BoostTransform,
    PLTActivation,
    count_params,
    expand,
    get_slopes,
    is_giant,
    plt_slope,
    set_slope,
)
from quicktrain.boost.export import load_final_model
from quicktrain.compose import build_hooks
from quicktrain.train import Hooks, TrainConfig, fit, load_checkpoint


def test_plt_activation_is_leaky_relu_and_exact_identity_at_one() -> None:
    x = torch.randn(1000, dtype=torch.float64)
    act = PLTActivation(0.0).double()  # the slope buffer follows the model's dtype
    assert torch.equal(act(x), torch.relu(x))
    set_slope(torch.nn.Sequential(act), 0.3)
    torch.testing.assert_close(act(x), F.leaky_relu(x, 0.3), rtol=0, atol=0)
    act.set(1.0)
    assert torch.equal(act(x), x)  # bit for bit
    assert float(act.state_dict()["slope"]) == 1.0
    loaded = PLTActivation(0.0).double()
    loaded.load_state_dict(act.state_dict())  # loading sets the slope the forward uses, not only the buffer
    assert loaded.negative_slope == 1.0 and torch.equal(loaded(x), x)
    with pytest.raises(ValueError, match=r"slope must be in \[0, 1\]"):
        PLTActivation(1.5)


def test_plt_slope_hits_zero_and_one_at_the_window_edges() -> None:
    assert plt_slope(0.0, 0.4, 0.8) == 0.0
    assert plt_slope(0.4, 0.4, 0.8) == 0.0
    assert math.isclose(plt_slope(0.6, 0.4, 0.8), 0.5)
    assert plt_slope(0.8, 0.4, 0.8) == 1.0
    assert plt_slope(0.9, 0.4, 0.8) == 1.0
    assert plt_slope(0.5, 0.5, 0.5) == 1.0  # empty window: hard switch
    assert plt_slope(0.49, 0.5, 0.5) == 0.0
    with pytest.raises(ValueError, match="start <= end"):
        plt_slope(0.5, 0.8, 0.4)


@pytest.mark.parametrize(
    ("kwargs", "total", "zero_until", "one_from"),
    [
        ({"plt_start": 0.25, "plt_end": 0.75}, 100, 25, 75),  # fractions of the run
        ({"plt_start": 10, "plt_end": 30, "unit": "step"}, 100, 10, 30),
        ({"plt_start": 2, "plt_end": 5, "unit": "epoch", "steps_per_epoch": 7}, 70, 14, 35),
        ({"plt_start": 0.2, "finetune_fraction": 0.3}, 50, 10, 35),
    ],
    ids=["fraction", "step", "epoch", "finetune_fraction"],
)
def test_boost_transform_slope_schedule(kwargs: dict, total: int, zero_until: int, one_from: int) -> None:
    t = BoostTransform(**kwargs)
    slopes = [t.slope_at(s, total) for s in range(total)]
    assert all(a == 0.0 for a in slopes[: zero_until + 1])
    assert 0.0 < slopes[zero_until + 1] < 1.0
    assert all(0 < a < 1 for a in slopes[zero_until + 1 : one_from])
    assert all(a == 1.0 for a in slopes[one_from:])
    assert slopes == sorted(slopes)


def test_per_epoch_update_holds_slope_within_an_epoch() -> None:
    t = BoostTransform(plt_start=0.0, plt_end=1.0, update="epoch", steps_per_epoch=10)
    slopes = [t.slope_at(s, 40) for s in range(40)]
    assert slopes[:10] == [0.0] * 10 and slopes[10:20] == [0.25] * 10 and slopes[30:] == [0.75] * 10


def test_boost_transform_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="disagree"):
        BoostTransform(plt_end=0.9, finetune_fraction=0.3)
    with pytest.raises(ValueError, match="plt_start <= plt_end"):
        BoostTransform(plt_start=0.9, plt_end=0.5)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        BoostTransform(unit="epoch", plt_start=1, plt_end=2)
    with pytest.raises(ValueError, match="Unknown PLT unit"):
        BoostTransform(unit="minutes")


def test_transform_protocol_without_the_loop() -> None:
    tiny = models.get_model("cnn", num_classes=10, in_shape=(1, 28, 28))
    t = BoostTransform(ratio=2, plt_start=0.5, plt_end=0.75)
    giant = t.before_training(tiny)
    assert is_giant(giant) and not is_giant(tiny)
    assert t.on_step_start(giant, 0, 8) is giant and set(get_slopes(giant).values()) == {0.0}
    assert t.on_step_start(giant, 5, 8) is giant and set(get_slopes(giant).values()) == {0.5}
    small = t.on_step_start(giant, 6, 8)  # slope reaches 1 at 6/8 = 0.75: contracted
    assert small is not giant and not is_giant(small) and t.contracted_at == 6
    assert count_params(small) == count_params(tiny)
    assert t.on_step_start(small, 7, 8) is small and t.after_training(small) is small
    with pytest.raises(ValueError, match="already expanded"):
        BoostTransform().before_training(giant)


def test_rebuild_restores_the_saved_architecture() -> None:
    tiny = models.get_model("cnn", num_classes=10, in_shape=(1, 28, 28))
    t = BoostTransform(ratio=2, plt_start=0.25, plt_end=0.5)
    giant = t.before_training(tiny)
    t.on_step_start(giant, 3, 8)
    mid_state, mid_model = t.state_dict(), {k: v.clone() for k, v in giant.state_dict().items()}
    small = t.on_step_start(giant, 4, 8)
    # resume mid-PLT: giant with the saved slope
    t2 = BoostTransform(ratio=2, plt_start=0.25, plt_end=0.5)
    fresh = t2.before_training(models.get_model("cnn", num_classes=10, in_shape=(1, 28, 28)))
    t2.load_state_dict(mid_state)
    rebuilt = t2.rebuild(fresh)
    rebuilt.load_state_dict(mid_model)
    assert rebuilt is fresh and set(get_slopes(rebuilt).values()) == {0.5}
    # resume after contraction: the tiny architecture, strict load of the tiny weights
    t3 = BoostTransform(ratio=2, plt_start=0.25, plt_end=0.5)
    fresh = t3.before_training(models.get_model("cnn", num_classes=10, in_shape=(1, 28, 28)))
    t3.load_state_dict(t.state_dict())
    rebuilt = t3.rebuild(fresh)
    rebuilt.load_state_dict(small.state_dict())
    assert not is_giant(rebuilt) and t3.on_step_start(rebuilt, 5, 8) is rebuilt
    with pytest.raises(ValueError, match="config differs"):
        BoostTransform(ratio=3).load_state_dict(t.state_dict())


def test_fit_with_boost_contracts_saves_tiny_model_and_resumes(tmp_path, caplog) -> None:
    config = TrainConfig(dataset="digits", model="cnn", epochs=2, lr=3e-3, progress=False, out=str(tmp_path),
                         max_steps_per_epoch=6, batch_size=32, eval_batch_size=500)
    transform = BoostTransform(ratio=2, plt_start=0.25, plt_end=0.5)
    with caplog.at_level(logging.INFO, logger="quicktrain.boost"):
        result = fit(config, Hooks(transforms=[transform]))
    assert "4 layer(s) expanded" in caplog.text and "contracted the giant at step 6" in caplog.text
    assert transform.contracted_at == 6 and not is_giant(result.model)
    saved = load_checkpoint(tmp_path / "model.pt")
    tiny = models.get_model("cnn", num_classes=10, in_shape=(1, 8, 8))
    assert {k: v.shape for k, v in saved["model"].items()} == {k: v.shape for k, v in tiny.state_dict().items()}
    assert saved["metrics"]["test_acc"] > 0.3  # far above chance (0.1) after 12 steps
    loaded = load_final_model(tmp_path)  # what `quicktrain boost export RUN` reads
    assert not is_giant(loaded.model) and loaded.in_shape == (1, 8, 8)
    # resume from last.pt (written after contraction): rebuild must give the tiny architecture
    resumed = fit(TrainConfig(**{**vars(config), "resume": True}), Hooks(transforms=[BoostTransform(
        ratio=2, plt_start=0.25, plt_end=0.5)]))
    assert not is_giant(resumed.model)
    for k, v in result.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v)


def test_giant_trains_and_its_slope_is_in_the_state_dict() -> None:
    giant = expand(models.get_model("mlp", num_classes=3, in_shape=(1, 4, 4)), ratio=2)
    keys = [k for k in giant.state_dict() if k.endswith("act.slope")]
    assert len(keys) == 3
    opt = torch.optim.SGD(giant.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    F.cross_entropy(giant(x), y).backward()
    opt.step()
    # zero-initialised BN_2 gamma receives gradient, so the blocks leave the identity
    assert giant[1].blocks[0].bn2.weight.abs().sum() > 0


def test_default_schedule_hands_back_the_tiny_network_at_half_the_run(tmp_path) -> None:
    # The default (PLT from 20% to 50%, benchmarks/boost_schedule.py) contracts at T/2, so the tiny network is
    # trained for the second half of the cosine schedule, from half the peak learning rate down; the old
    # default contracted at 80%, where the cosine is at 9.5% of the peak. `quicktrain train --boost` (through
    # TrainConfig) gets the same schedule as BoostTransform().
    config = TrainConfig(dataset="digits", model="tinycnn", epochs=2, lr=3e-3, progress=False, out=str(tmp_path),
                         max_steps_per_epoch=5, batch_size=32, eval_batch_size=500, boost=True)
    hooks = build_hooks(config)
    (transform,) = hooks.transforms
    assert (transform.plt_start, transform.plt_end) == (BoostTransform().plt_start, BoostTransform().plt_end)
    result = fit(config, hooks)
    assert transform.contracted_at == 5 and not is_giant(result.model)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in steps if r["kind"] == "step"}
    assert math.isclose(lr[5], 1.5e-3)  # the tiny network's first step: cosine at half the run, half the peak
    slopes = [transform.slope_at(s, 10) for s in range(10)]
    assert slopes[:3] == [0.0, 0.0, 0.0] and 0 < slopes[3] < slopes[4] < 1 and slopes[5:] == [1.0] * 5
