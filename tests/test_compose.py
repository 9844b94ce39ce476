"""The parts composed in one run: every pair and the triple train, end in the tiny architecture, and resume."""

import dataclasses
import math

import pytest
import torch

from quicktrain import models
from quicktrain.compose import build_hooks
from quicktrain.train import CheckpointError, TrainConfig, fit, load_checkpoint

BASE = TrainConfig(
    dataset="digits",
    model="cnn",
    epochs=3,
    batch_size=64,
    lr=0.01,
    optimizer="sgd",
    max_steps_per_epoch=6,
    progress=False,
    damping=0.1,
    plt_start=0.3,
    plt_end=0.6,
    boost_ratio=2,
)
PARTS = {
    "ghn+kfac": {"init": "ghn", "precond": "kfac"},
    "ghn+shampoo": {"init": "ghn", "precond": "shampoo"},
    "ghn+boost": {"init": "ghn", "boost": True},
    "boost+kfac": {"boost": True, "precond": "kfac"},
    "ghn+kfac+boost": {"init": "ghn", "precond": "kfac", "boost": True},
}


def _original_shapes(config):
    model = models.get_model(config.model, num_classes=10, in_shape=models.input_shape(config.model, (1, 8, 8)))
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("parts", PARTS.values(), ids=PARTS.keys())
def test_parts_compose_and_the_saved_model_is_the_tiny_architecture(tmp_path, parts):
    config = dataclasses.replace(BASE, out=str(tmp_path), **parts)
    result = fit(config, build_hooks(config))
    assert math.isfinite(result.metrics["test_loss"]) and result.metrics["test_acc"] > 0.3
    saved = load_checkpoint(tmp_path / "model.pt")["model"]
    assert {k: v.shape for k, v in saved.items()} == _original_shapes(config)


def test_the_preconditioner_follows_the_model_through_contraction_and_resume(tmp_path):
    config = dataclasses.replace(BASE, epochs=4, **PARTS["boost+kfac"])
    fit(dataclasses.replace(config, out=str(tmp_path / "straight")), build_hooks(config))

    # kill the run in epoch 4 (after the contraction at 60% of 24 steps), then resume
    split = dataclasses.replace(config, out=str(tmp_path / "split"))
    hooks = build_hooks(split)
    make_kfac, calls = hooks.gradients, [0]

    def dying_factory(model, loss_fn):
        maker = make_kfac(model, loss_fn)
        step = maker.forward_backward

        def forward_backward(x, y):
            calls[0] += 1
            if calls[0] == 21:
                raise KeyboardInterrupt
            return step(x, y)

        maker.forward_backward = forward_backward
        return maker

    hooks.gradients = dying_factory
    with pytest.raises(KeyboardInterrupt):
        fit(split, hooks)
    state = load_checkpoint(tmp_path / "split" / "last.pt")
    assert state["epoch"] == 3 and state["gradients"], "the checkpoint holds the tiny model's K-FAC state"
    assert set(state["model"]) == set(_original_shapes(config))
    fit(dataclasses.replace(split, resume=True), build_hooks(split))
    a = load_checkpoint(tmp_path / "straight" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "model.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"init": "xavier"}, "Unknown --init 'xavier'"),
        ({"precond": "kfca"}, "Unknown preconditioner 'kfca'"),
        ({"init": "ghn:/nonexistent/ghn.pt"}, "nonexistent"),
        ({"init": "ghn", "dataset": "folder:/tmp"}, "GHN"),
    ],
)
def test_invalid_combinations_are_rejected_before_training(overrides, message):
    with pytest.raises((ValueError, FileNotFoundError, CheckpointError), match=message):
        build_hooks(dataclasses.replace(BASE, **overrides))


def test_consolidate_continues_from_the_run_and_its_penalty_holds_the_weights(tmp_path):
    task_a = dataclasses.replace(BASE, model="mlp", classes="0-4", out=str(tmp_path / "a"))
    fit(task_a)
    anchor = load_checkpoint(tmp_path / "a" / "model.pt")["model"]

    def drift(strength):
        config = dataclasses.replace(
            BASE,
            model="mlp",
            classes="5-9",
            consolidate=str(tmp_path / "a"),
            consolidate_strength=strength,
            consolidate_curvature="kron",
        )
        weights = fit(config, build_hooks(config)).model.state_dict()
        return sum((weights[k] - anchor[k]).norm() ** 2 for k in anchor).sqrt().item()

    free, held = drift(0.0), drift(100.0)
    assert 0 < held < 0.6 * free  # measured: 0.26 vs 0.50


def test_consolidate_cannot_be_combined_with_init_or_boost(tmp_path):
    for parts in ({"init": "ghn"}, {"boost": True}):
        with pytest.raises(ValueError, match="--consolidate continues from a finished run"):
            build_hooks(dataclasses.replace(BASE, consolidate=str(tmp_path), **parts))


def test_grafting_reaches_the_maker_and_matches_the_precond_choices():
    from quicktrain.precond.grafting import GRAFTING
    from quicktrain.train.config import GRAFTINGS

    assert GRAFTINGS == GRAFTING
    config = dataclasses.replace(BASE, precond="kfac", grafting="adam")
    maker = build_hooks(config).gradients(torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss())
    assert maker.grafting.kind == "adam"
    plain = build_hooks(dataclasses.replace(config, grafting="none")).gradients(
        torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss()
    )
    assert plain.grafting.kind == "none"
