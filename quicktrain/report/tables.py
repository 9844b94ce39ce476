"""Comparison tables of runs, for the terminal (rich) and for Markdown."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from .runs import RunRecord

COLUMNS = ("run", "model", "dataset", "epochs", "best val acc", "test acc", "test loss", "wall s")


def run_rows(runs: Sequence[RunRecord]) -> list[list[str]]:
    """One row of :data:`COLUMNS` per run."""
    rows = []
    for run in runs:
        final = run.final
        rows.append(
            [
                run.name,
                str(run.config.get("model", "?")),
                str(run.config.get("dataset", "?")),
                str(final["epoch"]),
                f"{max(e['val_acc'] for e in run.epochs):.4f}",
                f"{final['test_acc']:.4f}",
                f"{final['test_loss']:.4f}",
                f"{final['wall']:.1f}",
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
            column, justify="left" if column in ("run", "config", "method", "model", "dataset") else "right"
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
