"""Reading run directories: the per-epoch records of ``metrics.jsonl`` and the run's configuration."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunRecord:
    """One run as the report sees it: its name, configuration and per-epoch metrics."""

    name: str
    config: dict[str, Any]
    epochs: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        return self.epochs[-1]

    def time_to(self, metric: str, target: float) -> float | None:
        """Wall seconds until ``metric`` first reached ``target`` (None if it never did)."""
        return next((e["wall"] for e in self.epochs if e[metric] >= target), None)


def load_run(directory: str | Path) -> RunRecord:
    """Read ``directory/metrics.jsonl`` and the run's configuration (from ``summary.json``, else the log's
    ``config`` record); raise if there are no epochs."""
    directory = Path(directory)
    metrics = directory / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {directory} the --out folder of a quicktrain run?")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    if not epochs:
        raise ValueError(f"{metrics} has no completed epoch yet")
    summary = directory / "summary.json"
    logged = next((r["config"] for r in records if r["kind"] == "config"), {})  # a run still going, or killed
    config = json.loads(summary.read_text())["config"] if summary.is_file() else logged
    return RunRecord(directory.name or str(directory), config, epochs)
