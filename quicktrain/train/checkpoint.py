"""Atomic checkpoint files, loaded with ``weights_only=True``."""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe, or does not match the run that tries to load it."""


class DiskFullError(OSError):
    """Writing a checkpoint ran out of disk space; the previous checkpoint is intact."""


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` to ``path`` atomically: to a temporary file in the same folder, fsync, then rename.

    A crash while writing leaves the previous file at ``path`` intact.

    Raises:
        DiskFullError: the disk filled up while writing (the temporary file is removed).
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
    except (OSError, RuntimeError) as error:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(error):
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing {path}; free some space and continue with --resume "
                "(the previous checkpoint is intact)",
            ) from error
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_disk_full(error: BaseException) -> bool:
    # torch.save reports a failed write as a RuntimeError from its zip writer, with the OSError as context
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and "write failed" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, cannot be read as a checkpoint, or holds pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or start without --resume")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe:
            raise CheckpointError(
                f"checkpoint {path} is unsafe: it holds pickled Python code ({unsafe.group(1)}) that "
                "weights_only=True refuses to run; load only checkpoints of tensors and plain values, such as "
                "quicktrain writes"
            ) from None
        raise _corrupt(path, error) from error
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as error:
        raise _corrupt(path, error) from error
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    text = str(error).split("WeightsUnpickler error:")[-1]  # torch's own advice before it does not apply here
    reason = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return CheckpointError(
        f"checkpoint {path} is corrupt or not a torch checkpoint ({type(error).__name__}: {reason}); "
        "delete it to start over or point to an intact one"
    )
