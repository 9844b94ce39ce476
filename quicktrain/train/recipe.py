"""Recipe files: a TOML file that names a run's dataset, model, parts' settings and budget.

Keys are :class:`TrainConfig` field names. They may sit at the top level or in tables that group them for
the reader (``[budget]``, ``[optim]``, ``[ghn]``, ``[precond]``, ``[boost]``, ...); each key may appear once::

    dataset = "fashion-mnist"
    model = "cnn"

    [budget]
    epochs = 3
    batch_size = 128

    [precond]
    precond = "kfac"
    damping = 1e-3
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, check_setting


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The flat ``{field: value}`` settings of the recipe at ``path``, each checked against its field's type and
    range; unknown or repeated keys and ill-typed values raise, naming the recipe."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"recipe {path} is not valid TOML: {error}") from error
    settings: dict[str, Any] = {}
    for key, value in document.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, setting in items:
            if name not in TrainConfig.field_names():
                raise ValueError(f"recipe {path}: unknown setting {name!r}; choose from {TrainConfig.field_names()}")
            if name in settings:
                raise ValueError(f"recipe {path}: setting {name!r} is given twice")
            try:
                settings[name] = check_setting(name, setting)
            except ConfigError as error:
                raise ConfigError(f"recipe {path}: {error}") from None
    return settings
