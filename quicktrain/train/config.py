"""The configuration of one training run, as built from the command line or a recipe, checked field by field."""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A setting has the wrong type or is out of range; the message names the key, the value and the fix."""


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
CURVATURES = ("diag", "kron", "unitwise")
GRAFTINGS = ("none", "sgd", "adam")  # quicktrain.precond.grafting.GRAFTING


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. The loop reads the first block; the parts' fields are read by
    :mod:`quicktrain.compose`, which turns them into :class:`~quicktrain.train.hooks.Hooks`.

    Every field is checked against its annotated type and its range (:data:`RANGES`) when the config is
    built, so a recipe value such as ``boost = "false"`` or ``epochs = 1.5`` fails before anything runs.
    Integers are accepted for float fields (and stored as floats); nothing else is converted.
    """

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
    overwrite: bool = False
    save_every_steps: int | None = None
    tensorboard: bool = False
    device: str = "auto"
    threads: int | None = 1
    data_dir: str | None = None
    download: bool = False
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 1000
    progress: bool = True
    amp: bool = False
    compile: bool = False
    sync_batchnorm: bool = True
    # parts
    init: str | None = None
    ghn_noise: float = 0.0
    precond: str | None = None
    damping: float = 1e-3
    curvature_interval: int = 1
    inverse_interval: int = 1
    grafting: str = "none"  # layer-wise step size of "sgd" or "adam" for the preconditioner's direction
    boost: bool = False
    boost_ratio: float = 4.0
    plt_start: float = 0.2  # NetBooster's defaults (quicktrain.boost.BoostTransform)
    plt_end: float = 0.5
    consolidate: str | None = None
    consolidate_strength: float = 1000.0
    consolidate_curvature: str = "diag"

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))
        if self.plt_start > self.plt_end:
            raise ConfigError(f"plt_start ({self.plt_start}) must not exceed plt_end ({self.plt_end})")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it: give one of them")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _at_least(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low}"


def _finite(low: float, *, strict: bool = False, high: float | None = None) -> Callable[[Any], str | None]:
    def check(v: float) -> str | None:
        ok = math.isfinite(v) and (v > low if strict else v >= low) and (high is None or v <= high)
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        return None if ok else f"must be a finite number {bound}"

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {list(choices)}"


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty (leave the setting out instead)"


RANGES: dict[str, Callable[[Any], str | None]] = {
    **{name: _at_least(1) for name in ("epochs", "batch_size", "eval_batch_size", "curvature_interval",
                                       "inverse_interval", "max_steps_per_epoch", "threads", "save_every_steps")},
    **{name: _at_least(0) for name in ("warmup_steps", "seed")},
    "lr": _finite(0.0, strict=True),
    "momentum": _finite(0.0, high=1.0),
    "weight_decay": _finite(0.0),
    "ghn_noise": _finite(0.0),
    "damping": _finite(0.0, strict=True),
    "boost_ratio": _finite(0.0, strict=True),
    "plt_start": _finite(0.0, high=1.0),
    "plt_end": _finite(0.0, high=1.0),
    "consolidate_strength": _finite(0.0),
    "optimizer": _one_of(OPTIMIZERS),
    "schedule": _one_of(SCHEDULES),
    "consolidate_curvature": _one_of(CURVATURES),
    "grafting": _one_of(GRAFTINGS),
    **{name: _non_empty for name in ("dataset", "model", "classes", "out", "device", "data_dir", "init", "precond",
                                     "consolidate")},
}
"""Range check per field: returns what is wrong with a (well-typed) value, or None."""


def check_setting(name: str, value: Any) -> Any:
    """``value`` checked against field ``name``'s type and range (an int for a float field becomes a float).

    Raises:
        ConfigError: naming the key, the value, the expected type or range.
    """
    hints = _type_hints()
    if name not in hints:
        raise ConfigError(f"unknown setting {name!r}; choose from {TrainConfig.field_names()}")
    expected = hints[name]
    allowed = _members(expected)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{name} = None: expected {_type_name(expected)}")
    base = next(t for t in allowed if t is not type(None))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        hint = " (write true or false, without quotes)" if base is bool else ""
        raise ConfigError(f"{name} = {value!r}: expected {_type_name(expected)}, got {type(value).__name__}{hint}")
    problem = RANGES.get(name, lambda _: None)(value)
    if problem:
        raise ConfigError(f"{name} = {value!r}: {problem}")
    return value


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _type_name(annotation: Any) -> str:
    names = {bool: "a bool", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    return " or ".join(names.get(t, str(t)) for t in _members(annotation))


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types an annotation admits: ``(str, NoneType)`` for ``str | None``, ``(int,)`` for ``int``."""
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


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
