"""A finished training run as the model, data and adapter it was trained with (for EWC and pruning).

A run folder (``quicktrain train --out DIR``) holds ``model.pt`` with the weights, the model name, the dataset
and the run's :class:`~quicktrain.train.TrainConfig`; :func:`load_run` rebuilds the model and reloads the run's
own task data (its dataset restricted to its ``classes``), so curvature is computed where the run learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quicktrain import data, models
from quicktrain.curvature_apps.channels import shrink
from quicktrain.train import CheckpointError, load_checkpoint

__all__ = ["LoadedRun", "load_run", "task_batches"]


@dataclass
class LoadedRun:
    """What :func:`load_run` returns.

    Attributes:
        model: the run's final model (eval mode, on CPU).
        splits: the run's dataset, restricted to its classes.
        adapter: turns dataset images into the model's input shape.
        checkpoint: the ``model.pt`` dict.
    """

    model: nn.Module
    splits: data.Splits
    adapter: data.Adapter
    checkpoint: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.checkpoint["config"]


def read_model_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/model.pt``, checked to be a final-model checkpoint of ``quicktrain train``."""
    path = Path(run_dir) / "model.pt"
    ckpt = load_checkpoint(path)
    missing = {"model", "model_name", "num_classes", "in_shape", "config"} - set(ckpt)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}; pass the --out folder of a finished quicktrain run")
    return ckpt


def build_model(ckpt: dict[str, Any]) -> nn.Module:
    """The registry model named by a ``model.pt`` dict, with its weights loaded (and its hidden layers narrowed
    to ``ckpt["pruning"]["widths"]`` when it was written by structured pruning)."""
    model = models.get_model(ckpt["model_name"], num_classes=ckpt["num_classes"], in_shape=tuple(ckpt["in_shape"]))
    widths = ckpt.get("pruning", {}).get("widths")
    if widths:
        model = shrink(model, {name: torch.arange(w) for name, w in widths.items()})
    model.load_state_dict(ckpt["model"])
    return model


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a finished run's model and reload its task data (see the module docstring)."""
    ckpt = read_model_checkpoint(run_dir)
    cfg = ckpt["config"]
    splits = data.get_dataset(cfg["dataset"], root=cfg.get("data_dir"), seed=cfg.get("seed", 0))
    if cfg.get("classes"):
        splits = data.select_classes(splits, data.parse_classes(cfg["classes"]))
    model = build_model(ckpt).eval()
    return LoadedRun(model, splits, data.Adapter(splits.in_shape, tuple(ckpt["in_shape"])), ckpt)


def task_batches(run: LoadedRun, *, batches: int | None, batch_size: int,
                 seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """At most ``batches`` batches (all when None) of the run's training split in a fixed random order, adapted."""
    images, labels = run.splits.train.tensors
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    count = len(order) // batch_size if batches is None else min(batches, len(order) // batch_size)
    if count < 1:
        raise ValueError(f"cannot take a batch of {batch_size} from {len(order)} training examples; lower batch_size")
    return [(run.adapter(images[idx]), labels[idx]) for idx in order[: count * batch_size].split(batch_size)]
