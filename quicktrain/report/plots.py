"""Accuracy and loss curves of several runs, against epochs and against wall time, in one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .runs import RunRecord  # noqa: E402

# (y label, metric drawn solid, metric drawn dashed in the same colour)
PANELS = (
    ("accuracy (test solid, val dashed)", "test_acc", "val_acc"),
    ("loss (train solid, val dashed)", "train_loss", "val_loss"),
)


def plot_runs(runs: Sequence[RunRecord], path: str | Path, title: str = "") -> Path:
    """Draw a 2x2 grid (accuracy/loss x epochs/wall seconds) with one line per run; return the PNG path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for row, (label, solid, dashed) in enumerate(PANELS):
        for col, (x_key, x_label) in enumerate((("epoch", "epoch"), ("wall", "wall time (s)"))):
            ax = axes[row][col]
            for run in runs:
                x = [e[x_key] for e in run.epochs]
                (line,) = ax.plot(x, [e[solid] for e in run.epochs], marker="o", ms=3, label=run.name)
                ax.plot(x, [e[dashed] for e in run.epochs], ls="--", color=line.get_color(), alpha=0.7)
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
