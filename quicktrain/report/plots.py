"""Accuracy and loss curves of several runs, against epochs and against wall time, in one PNG.

Runs that differ only in their seed share a colour (one per configuration) in shades from dark to light, and
the legend sits outside the axes so that it never hides a curve.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .runs import RunRecord  # noqa: E402

# (y label, metric drawn solid, metric drawn dashed in the same colour)
PANELS = (
    ("accuracy (test solid, val dashed)", "test_acc", "val_acc"),
    ("loss (train solid, val dashed)", "train_loss", "val_loss"),
)
# settings that do not make a different configuration: runs differing only in these share a colour
_NOT_CONFIG = ("seed", "out", "resume", "auto_resume", "overwrite", "progress", "device", "threads", "data_dir")


def configuration_key(run: RunRecord) -> str:
    """What identifies ``run``'s configuration: its settings without seed and bookkeeping (else its name)."""
    if not run.config:
        return run.name
    return json.dumps({k: v for k, v in run.config.items() if k not in _NOT_CONFIG}, sort_keys=True, default=str)


def run_colours(runs: Sequence[RunRecord]) -> list[tuple[float, float, float]]:
    """One colour per run: a ``tab10`` hue per configuration, seeds as shades of it (dark to light)."""
    keys = [configuration_key(run) for run in runs]
    hues = {key: to_rgb(plt.get_cmap("tab10")(i % 10)) for i, key in enumerate(dict.fromkeys(keys))}
    colours = []
    for i, key in enumerate(keys):
        siblings = [j for j, k in enumerate(keys) if k == key]
        lighten = 0.55 * siblings.index(i) / max(1, len(siblings) - 1)
        colours.append(tuple(c + (1.0 - c) * lighten for c in hues[key]))
    return colours


def plot_runs(runs: Sequence[RunRecord], path: str | Path, title: str = "") -> Path:
    """Draw :func:`draw_runs` into the PNG file ``path``; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = draw_runs(runs, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_runs(runs: Sequence[RunRecord], title: str = "") -> Figure:
    """A 2x2 grid (accuracy/loss x epochs/wall seconds) with one line per run and the legend beside it."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), constrained_layout=True)
    colours = run_colours(runs)
    for row, (label, solid, dashed) in enumerate(PANELS):
        for col, (x_key, x_label) in enumerate((("epoch", "epoch"), ("wall", "wall time (s)"))):
            ax = axes[row][col]
            for run, colour in zip(runs, colours, strict=True):
                x = [e[x_key] for e in run.epochs]
                ax.plot(x, [e[solid] for e in run.epochs], marker="o", ms=3, color=colour, label=run.name)
                ax.plot(x, [e[dashed] for e in run.epochs], ls="--", color=colour, alpha=0.7)
            if x_key == "epoch":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
