"""Benchmark: forgetting on a two-task split, plain fine-tuning vs EWC with diagonal and Kronecker Fisher.

Task A is classes 0-4 of a dataset, task B classes 5-9 (one shared 10-way head, as ``--classes`` trains). Per
seed: train task A from scratch, then continue on task B from A's final weights with

* ``finetune``: plain training on B;
* ``ewc-diag`` / ``ewc-kron``: the same plus the EWC penalty ``½λ(θ-θ*_A)ᵀF_A(θ-θ*_A)`` with A's Fisher (exact,
  32 batches of A's training data) in the diagonal or K-FAC representation
  (:func:`quicktrain.curvature_apps.ewc.consolidation_hooks`, what ``quicktrain train --consolidate`` uses),
  for every ``λ`` in ``--strengths``.

Reported on the test sets, after B: task-A and task-B accuracy with the 10-way head (*class-incremental*:
argmax over all classes; ``mean_class_il`` is their average) and with the argmax restricted to the task's own 5
classes (*task-incremental*), mean ± std over seeds. ``λ`` is not tuned: the table shows the whole sweep.
The model is the registry ``mlp`` (no BatchNorm, whose running statistics EWC does not protect).

Usage::

    .venv/bin/python benchmarks/continual.py --dataset digits --seeds 0 1 2
    .venv/bin/python benchmarks/continual.py --dataset fashion-mnist --seeds 0 1 --epochs 2 --max-steps 150

Prints Markdown tables; writes ``benchmarks/results/continual_<dataset>.csv`` (one row per method, λ, seed)
and ``benchmarks/results/continual_<dataset>.md`` (the summary table).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from quicktrain import data, models
from quicktrain.curvature_apps.ewc import consolidation_hooks, run_initializer
from quicktrain.report import markdown_table, write_csv
from quicktrain.train import Hooks, TrainConfig, evaluate, fit

ROOT = Path(__file__).resolve().parent
TASKS = {"A": "0-4", "B": "5-9"}


@torch.no_grad()
def task_accuracy(model: nn.Module, split: torch.utils.data.TensorDataset, adapter: nn.Module,
                  classes: list[int]) -> float:
    """Accuracy with the argmax restricted to ``classes`` (task-incremental evaluation)."""
    model.eval()
    images, labels = split.tensors
    logits = model(adapter(images))[:, classes]
    return (torch.tensor(classes)[logits.argmax(1)] == labels).float().mean().item()


def measure(model: nn.Module, splits: data.Splits, adapter: nn.Module) -> dict[str, float]:
    out = {}
    for task, spec in TASKS.items():
        classes = data.parse_classes(spec)
        test = data.select_classes(splits, classes).test
        out[f"{task}_class_il"] = evaluate(model, test, adapter, 1000, torch.device("cpu"))["acc"]
        out[f"{task}_task_il"] = task_accuracy(model, test, adapter, classes)
    out["mean_class_il"] = (out["A_class_il"] + out["B_class_il"]) / 2
    return out


def run_seed(args: argparse.Namespace, seed: int, root: Path) -> list[dict]:
    base = dict(dataset=args.dataset, model="mlp", epochs=args.epochs, lr=args.lr, seed=seed, progress=False,
                max_steps_per_epoch=args.max_steps, batch_size=args.batch_size)
    splits = data.get_dataset(args.dataset, seed=seed)
    adapter = data.Adapter(splits.in_shape, models.input_shape("mlp", splits.in_shape))
    start = time.perf_counter()
    run_a = root / f"s{seed}-A"
    model_a = fit(TrainConfig(classes=TASKS["A"], out=str(run_a), overwrite=True, **base)).model
    rows = [{"method": "A only (before B)", "strength": 0.0, "seed": seed, **measure(model_a, splits, adapter),
             "seconds": time.perf_counter() - start}]
    config_b = TrainConfig(classes=TASKS["B"], **base)
    variants = [("finetune", None, 0.0)] + [(f"ewc-{rep}", rep, lam) for rep in ("diag", "kron")
                                             for lam in args.strengths]
    for method, rep, lam in variants:
        start = time.perf_counter()
        if rep is None:
            hooks = Hooks(init=run_initializer(run_a, model_name="mlp", dataset=args.dataset))
        else:
            init, factory = consolidation_hooks(run_a, strength=lam, representation=rep, model_name="mlp",
                                                dataset=args.dataset, batches=32, fisher="exact", seed=seed)
            hooks = Hooks(init=init, gradients=factory)
        model = fit(config_b, hooks).model
        rows.append({"method": method, "strength": lam, "seed": seed, **measure(model, splits, adapter),
                     "seconds": time.perf_counter() - start})
        print(f"seed {seed} {method:9s} λ={lam:<8g} " + "  ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                                                  if k.endswith("_il")), flush=True)
    return rows


METRICS = ("A_class_il", "B_class_il", "mean_class_il", "A_task_il", "B_task_il")


def summarize(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    columns = ["method", "λ", "seeds", *METRICS, "s/run"]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["strength"]), []).append(r)
    table = []
    for (method, lam), rs in groups.items():
        cells = []
        for m in METRICS:
            vals = [r[m] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        table.append([method, "-" if not method.startswith("ewc") else f"{lam:g}", str(len(rs)), *cells,
                      f"{statistics.mean(r['seconds'] for r in rs):.1f}"])
    return columns, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20, help="epochs per task")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--strengths", type=float, nargs="+", default=[1.0, 10.0, 100.0, 1000.0, 10000.0])
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows += run_seed(args, seed, Path(tmp))
    name = f"continual_{args.dataset}{args.tag}"
    write_csv(["method", "strength", "seed", *METRICS, "seconds"],
              [[r["method"], f"{r['strength']:g}", r["seed"], *[f"{r[m]:.4f}" for m in METRICS],
                f"{r['seconds']:.1f}"] for r in rows], ROOT / "results" / f"{name}.csv")
    columns, table = summarize(rows)
    text = (f"{args.dataset}: task A = classes 0-4, task B = 5-9, mlp, {args.epochs} epochs per task"
            + (f" (at most {args.max_steps} steps each)" if args.max_steps else "")
            + f", seeds {args.seeds}; test accuracy; total {time.perf_counter() - start:.0f} s on "
            f"{torch.get_num_threads()} thread(s)\n\n" + markdown_table(columns, table))
    (ROOT / "results" / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
