"""The configuration of one training run, as built from the command line or a recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. The loop reads the first block; the parts' fields are read by
    :mod:`quicktrain.compose`, which turns them into :class:`~quicktrain.train.hooks.Hooks`."""

    dataset: str = "digits"
    classes: str | None = None
    model: str = "cnn"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    seed: int = 0
    out: str | None = None
    resume: bool = False
    auto_resume: bool = False
    device: str = "auto"
    threads: int | None = 1
    data_dir: str | None = None
    download: bool = False
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 1000
    progress: bool = True
    amp: bool = False
    compile: bool = False
    # parts
    init: str | None = None
    ghn_noise: float = 0.0
    precond: str | None = None
    damping: float = 1e-3
    curvature_interval: int = 1
    inverse_interval: int = 1
    boost: bool = False
    boost_ratio: float = 4.0
    plt_start: float = 0.5
    plt_end: float = 0.8
    consolidate: str | None = None
    consolidate_strength: float = 1000.0
    consolidate_curvature: str = "diag"

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "eval_batch_size", "curvature_interval", "inverse_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose from {sorted(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; choose from {sorted(SCHEDULES)}")
        if not 0.0 <= self.plt_start <= self.plt_end <= 1.0:
            raise ValueError(f"need 0 <= plt_start <= plt_end <= 1, got {self.plt_start} and {self.plt_end}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")


def lr_at(step: int, total_steps: int, *, base_lr: float, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant or cosine decay to zero.

    .. math:: \\eta_t = \\eta \\cdot \\tfrac{1}{2}\\left(1 + \\cos\\left(\\pi \\tfrac{t - w}{T - w}\\right)\\right)
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
