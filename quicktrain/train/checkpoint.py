"""Atomic checkpoint files, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the run that tries to load it."""


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` to ``path`` atomically: to a temporary file in the same folder, fsync, then rename.

    A crash while writing leaves the previous file at ``path`` intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing or cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or start without --resume")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({type(error).__name__}: {error}); "
            "delete it to start over or point to an intact one"
        ) from error
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj
