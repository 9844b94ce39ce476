"""Benchmark: test accuracy against sparsity for magnitude, OBD-diag and OBD-kron pruning scores.

Trains one model (``--model``, default ``cnn``) on ``--dataset`` with ``quicktrain.train.fit``, then for every
score and sparsity runs :func:`quicktrain.curvature_apps.prune.prune_run` (what ``quicktrain prune`` runs):

* unstructured: the lowest-scoring fraction ``S`` of all Linear/Conv2d weights, ranked globally;
* unstructured per layer: the lowest-scoring fraction ``S`` of each layer's weights;
* structured: the fraction ``S`` of every hidden layer's output channels (same widths for every score).

OBD scores use the exact Fisher (Gauss-Newton) of 16 batches of 128 training examples. Each point is
measured right after pruning and again after ``--finetune-steps`` steps of fine-tuning (a tenth of the
training learning rate, pruned weights held at zero).

Usage::

    .venv/bin/python benchmarks/prune.py --dataset digits --model cnn
    .venv/bin/python benchmarks/prune.py --dataset fashion-mnist --model mlp --epochs 3 --max-steps 300

Prints a Markdown table; writes ``benchmarks/results/prune_<dataset>_<model>.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402

from quicktrain.curvature_apps.prune import SCORES, prune_run  # noqa: E402
from quicktrain.report import markdown_table, write_csv  # noqa: E402
from quicktrain.train import TrainConfig, fit  # noqa: E402

ROOT = Path(__file__).resolve().parent
UNSTRUCTURED = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
SPARSITY = {"unstructured": UNSTRUCTURED, "unstructured per layer": UNSTRUCTURED,
            "structured": [0.25, 0.5, 0.75, 0.875]}
COLUMNS = ["mode", "sparsity", "score", "params", "test acc (pruned)", "test acc (fine-tuned)"]


def plot(rows: list[list], dense_acc: float, path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), constrained_layout=True)
    for ax, mode in zip(axes, SPARSITY, strict=True):
        for i, score in enumerate(SCORES):
            pts = [r for r in rows if r[0] == mode and r[2] == score]
            x = [r[1] for r in pts]
            ax.plot(x, [r[4] for r in pts], marker="o", color=f"C{i}", label=f"{score}")
            ax.plot(x, [r[5] for r in pts], marker="s", ls="--", color=f"C{i}", label=f"{score} + fine-tune")
        ax.axhline(dense_acc, color="grey", lw=0.8, label="dense")
        ax.set_xlabel("fraction of channels removed per hidden layer" if mode == "structured" else
                      "sparsity (fraction of Linear/Conv2d weights)")
        ax.set_ylabel("test accuracy")
        ax.set_title(mode)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="cnn")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--max-steps", type=int, default=None, help="cap on training steps per epoch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--finetune-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    name = f"prune_{args.dataset}_{args.model}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "dense"
        dense = fit(TrainConfig(dataset=args.dataset, model=args.model, epochs=args.epochs, lr=args.lr,
                                seed=args.seed, max_steps_per_epoch=args.max_steps, out=str(run), progress=False))
        dense_acc = dense.metrics["test_acc"]
        dense_params = sum(p.numel() for p in dense.model.parameters())
        for mode, sparsities in SPARSITY.items():
            for s in sparsities:
                for score in SCORES:
                    r = prune_run(run, s, structured=mode == "structured", score=score,
                                  finetune_steps=args.finetune_steps, per_layer=mode == "unstructured per layer",
                                  out=Path(tmp) / f"{mode}-{s}-{score}".replace(" ", "-"), seed=args.seed)
                    rows.append([mode, s, score, r["params"] - r["zero_weights"], r["before"]["test_acc"],
                                 r["metrics"]["test_acc"]])
                    print(f"{mode:22s} S={s:<6g} {score:9s} pruned {rows[-1][4]:.4f}  fine-tuned {rows[-1][5]:.4f}",
                          flush=True)
    table = [[m, f"{s:g}", sc, str(n), f"{a:.4f}", f"{b:.4f}"] for m, s, sc, n, a, b in rows]
    write_csv(COLUMNS, table, ROOT / "results" / f"{name}.csv")
    title = (f"{args.model} on {args.dataset}: dense test acc {dense_acc:.4f} ({dense_params} params), "
             f"fine-tune {args.finetune_steps} steps")
    png = plot(rows, dense_acc, ROOT / "results" / f"{name}.png", title)
    text = (f"{title}; seed {args.seed}; total {time.perf_counter() - start:.0f} s on 1 thread. Plot: {png.name}\n\n"
            + markdown_table(COLUMNS, table))
    (ROOT / "results" / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
