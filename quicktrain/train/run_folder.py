"""The run folder (``--out``): who may write into it, and the logs written there.

A folder that already holds a run is never written over by accident: a new run into it is refused unless
``--resume`` (continue it) or ``--overwrite`` (replace it) is given. ``metrics.jsonl`` starts with one
``config`` record, then holds a record per step, per epoch and per resumption; ``--tensorboard`` writes the
same scalars as TensorBoard events into ``tensorboard/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

RUN_FILES = ("metrics.jsonl", "last.pt", "model.pt", "summary.json")
TENSORBOARD_DIR = "tensorboard"


class RunFolderError(ValueError):
    """``--out`` already holds a run and neither ``--resume`` nor ``--overwrite`` was given."""


def existing_run_files(out: Path) -> list[str]:
    """Names of the run files (and the TensorBoard folder) already in ``out``."""
    names = [name for name in RUN_FILES if (out / name).exists()]
    return names + ([TENSORBOARD_DIR] if (out / TENSORBOARD_DIR).exists() else [])


def check_fresh_start(out: Path, *, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one, unless ``overwrite`` is set."""
    found = existing_run_files(out)
    if found and not overwrite:
        raise RunFolderError(
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume, replace it with "
            "--overwrite, or choose another --out"
        )


def clear_run_files(out: Path) -> None:
    """Delete the run files of a previous run in ``out`` (other files are left alone)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)


class MetricsLog:
    """Appends JSON lines to ``path``, and scalars to a TensorBoard writer when one is given.

    Nothing is written when ``path`` is None (ranks other than 0, or runs without ``--out``).
    """

    def __init__(self, path: Path | None, *, tensorboard: bool = False) -> None:
        self.path = path
        self.writer = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self.writer = _summary_writer(path.parent / TENSORBOARD_DIR)

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self._write_scalars(record)

    def _write_scalars(self, record: dict[str, Any]) -> None:
        kind, step = record["kind"], record.get("step", 0)
        if kind == "config":
            self.writer.add_text("config", "```\n" + json.dumps(record["config"], indent=2) + "\n```", 0)
            return
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "epoch"):
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def truncate(self, step: int, epoch: int) -> None:
        """Drop records written after the checkpoint we resume from (by a run that died mid-epoch)."""
        if self.path is None or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if _before(json.loads(line), step, epoch)]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _before(record: dict[str, Any], step: int, epoch: int) -> bool:
    kind = record["kind"]
    if kind == "config":
        return True
    if kind == "epoch":
        return record["epoch"] <= epoch
    return record["step"] < step if kind == "step" else record["step"] <= step


def _summary_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "--tensorboard needs the tensorboard package: pip install 'quicktrain[tensorboard]' (or drop the flag)"
        ) from None
    return SummaryWriter(log_dir=str(directory))
