"""Comparison tables of runs, for the terminal (rich) and for Markdown."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from .runs import RunRecord

_TEXT_COLUMNS = ("run", "config", "method", "model", "dataset", "optimizer", "parts", "note")
COLUMNS = (
    "run", "model", "dataset", "optimizer", "lr", "steps", "seed", "parts",
    "best val acc", "test acc", "test loss", "wall s", "note",
)


def parts_label(config: dict[str, Any]) -> str:
    """The parts a run used, e.g. ``"ghn+kfac+boost"`` (``"-"`` for plain training)."""
    parts = [config["init"]] if config.get("init") else []
    parts += [config["precond"]] if config.get("precond") else []
    parts += ["boost"] if config.get("boost") else []
    parts += ["ewc"] if config.get("consolidate") else []
    return "+".join(parts) or "-"


def run_rows(runs: Sequence[RunRecord], target: float | None = None) -> list[list[str]]:
    """One row of :data:`COLUMNS` per run. With ``target``, the note flags a run whose test accuracy reached
    ``target`` at some epoch but ended below it."""
    rows = []
    for run in runs:
        final, config = run.final, run.config
        reached = target is not None and any(e["test_acc"] >= target for e in run.epochs)
        note = f"reached {target:g}, ended below" if reached and final["test_acc"] < target else ""
        rows.append(
            [
                run.name,
                str(config.get("model", "?")),
                str(config.get("dataset", "?")),
                str(config.get("optimizer", "?")),
                f"{config['lr']:g}" if "lr" in config else "?",
                str(final.get("step", "?")),
                str(config.get("seed", "?")),
                parts_label(config),
                f"{max(e['val_acc'] for e in run.epochs):.4f}",
                f"{final['test_acc']:.4f}",
                f"{final['test_loss']:.4f}",
                f"{final['wall']:.1f}",
                note,
            ]
        )
    return rows


def print_table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], title: str = "", console: Console | None = None
) -> None:
    """Print ``rows`` under ``columns`` as a rich table."""
    table = Table(title=title or None)
    for column in columns:
        table.add_column(
            column, justify="left" if column in _TEXT_COLUMNS else "right"
        )
    for row in rows:
        table.add_row(*row)
    (console or Console(width=shutil.get_terminal_size((160, 24)).columns)).print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``rows`` under ``columns`` as a GitHub Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_value(value: Any) -> str:
    """A compact cell: 3 significant digits for floats, thousands separators for large numbers."""
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def records_markdown(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Markdown table of dict ``records`` restricted to ``columns`` (missing entries are blank)."""
    return markdown_table(columns, [[format_value(r.get(c, "")) for c in columns] for r in records])
