"""NetBooster benchmark: vanilla training vs knowledge distillation vs NetBooster, same epochs and data.

For each model and seed, three methods get the same total number of epochs (``--epochs``) on the same data:

* ``vanilla``: the tiny network trained for all epochs;
* ``kd``: a giant (the same expansion NetBooster uses, trained normally) for ``--kd-teacher-fraction`` of the
  epochs, then the tiny network distilled from it (Hinton et al., 2015) for the rest;
* ``netbooster``: :class:`quicktrain.boost.BoostTransform` - giant, PLT between ``--plt-start`` and
  ``--plt-end``, exact contraction, fine-tuning of the tiny network for the rest.

Then a transfer run: every pre-trained tiny model (and one from scratch) is fine-tuned on ``--transfer``
(all weights but the last linear layer are loaded). Prints Markdown tables of mean +- std over seeds and
writes ``boost.json``/``boost.md`` into ``--results``. Runs go through :func:`quicktrain.train.fit`.

    python benchmarks/boost.py --quick                       # CPU smoke version (cnn, subset of steps)
    python benchmarks/boost.py --device cuda --jobs 18       # the full table, runs in parallel on one GPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quicktrain import models
from quicktrain.boost import BoostTransform, count_macs, count_params, distillation, expand
from quicktrain.train import Hooks, TrainConfig, Transform, fit, load_checkpoint

METHODS = ("vanilla", "kd", "netbooster")


class ExpandOnly(Transform):
    """A model transform that only expands (the KD teacher is the giant, trained normally)."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def before_training(self, model: nn.Module) -> nn.Module:
        return expand(model, ratio=self.ratio)


def _cost(model: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, int]:
    model = model.cpu().float()
    return count_params(model), count_macs(model, in_shape)


def run_method(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, method, seed) run; returns its metrics, wall time and final cost."""
    torch.set_num_threads(1)
    base = TrainConfig(**job["config"])
    args = job["args"]
    in_shape = tuple(models.input_shape(base.model, tuple(job["data_shape"])))
    start = time.perf_counter()
    method = job["method"]
    extra: dict[str, Any] = {}
    if method == "vanilla":
        result = fit(base)
        train_wall = result.metrics["wall"]
    elif method == "netbooster":
        transform = BoostTransform(ratio=args["ratio"], plt_start=args["plt_start"], plt_end=args["plt_end"])
        result = fit(base, Hooks(transforms=[transform]))
        train_wall = result.metrics["wall"]
        extra["contracted_at_step"] = transform.contracted_at
    elif method == "kd":
        teacher_epochs = max(1, round(base.epochs * args["kd_teacher_fraction"]))
        student_epochs = base.epochs - teacher_epochs
        if student_epochs < 1:
            raise ValueError(f"--kd-teacher-fraction leaves no epochs for the student ({base.epochs} epochs)")
        teacher_cfg = replace(base, epochs=teacher_epochs, out=str(Path(base.out) / "teacher"))
        teacher = fit(teacher_cfg, Hooks(transforms=[ExpandOnly(args["ratio"])]))
        student_cfg = replace(base, epochs=student_epochs)
        result = fit(student_cfg, Hooks(gradients=distillation(teacher.model, temperature=args["kd_temperature"],
                                                               alpha=args["kd_alpha"])))
        train_wall = teacher.metrics["wall"] + result.metrics["wall"]
        extra.update(teacher_test_acc=teacher.metrics["test_acc"], teacher_epochs=teacher_epochs)
    else:
        raise ValueError(f"Unknown method {method!r}; choose from {list(METHODS)}")
    params, macs = _cost(result.model, in_shape)
    return {
        "model": base.model, "method": method, "seed": base.seed, "test_acc": result.metrics["test_acc"],
        "val_acc": result.metrics["val_acc"], "train_wall_s": train_wall, "total_wall_s": time.perf_counter() - start,
        "params": params, "macs": macs, "out": base.out, **extra,
    }


def _last_linear_prefix(model: nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + "."


def run_transfer(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune a pre-trained tiny model (or one from scratch) on the transfer data set."""
    torch.set_num_threads(1)
    config = TrainConfig(**job["config"])
    source = job["source"]
    init: Callable[[nn.Module, torch.Tensor], None] | None = None
    if source is not None:
        state = load_checkpoint(Path(source) / "model.pt")["model"]

        def init(model: nn.Module, _: torch.Tensor) -> None:
            head = _last_linear_prefix(model)
            backbone = {k: v for k, v in state.items() if not k.startswith(head)}
            missing, unexpected = model.load_state_dict(backbone, strict=False)
            if unexpected or any(not k.startswith(head) for k in missing):
                raise RuntimeError(f"pre-trained weights do not fit: missing {missing}, unexpected {unexpected}")

    result = fit(config, Hooks(init=init))
    return {"model": config.model, "pretrain": job["pretrain"], "seed": config.seed,
            "test_acc": result.metrics["test_acc"], "train_wall_s": result.metrics["wall"]}


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def tables(results: list[dict[str, Any]], transfer: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| model | method | test acc (%) | train wall (s) | params | MACs |",
             "| --- | --- | --- | --- | --- | --- |"]
    for model in dict.fromkeys(r["model"] for r in results):
        for method in METHODS:
            rows = [r for r in results if r["model"] == model and r["method"] == method]
            if rows:
                lines.append(
                    f"| {model} | {method} | {_mean_std([r['test_acc'] for r in rows], 100)} | "
                    f"{_mean_std([r['train_wall_s'] for r in rows], digits=1)} | {rows[0]['params']:,} | "
                    f"{rows[0]['macs']:,} |")
    if transfer:
        lines += ["", "Transfer (fine-tune on the transfer set; pre-training method as rows):", "",
                  "| model | pre-training | test acc (%) |", "| --- | --- | --- |"]
        for model in dict.fromkeys(r["model"] for r in transfer):
            for pre in ("scratch", *METHODS):
                rows = [r for r in transfer if r["model"] == model and r["pretrain"] == pre]
                if rows:
                    lines.append(f"| {model} | {pre} | {_mean_std([r['test_acc'] for r in rows], 100)} |")
    return "\n".join(lines)


def _run_all(
    fn: Callable[[dict[str, Any]], dict[str, Any]], jobs: list[dict[str, Any]], workers: int, partial: Path
) -> list[dict[str, Any]]:
    """Run ``fn`` over ``jobs`` (``workers`` processes), appending each finished result to ``partial``."""
    partial.parent.mkdir(parents=True, exist_ok=True)

    def done(result: dict[str, Any]) -> dict[str, Any]:
        with partial.open("a") as f:
            f.write(json.dumps(result) + "\n")
        return result

    if workers <= 1:
        return [done(fn(job)) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        for future in as_completed(futures):
            done(future.result())
        return [f.result() for f in futures]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU version: cnn only, 2 epochs of 100 steps")
    p.add_argument("--models", nargs="+", default=["mobilenetv2_tiny", "cnn"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--transfer", default="digits", help="fine-tuning data set ('' to skip)")
    p.add_argument("--transfer-epochs", type=int, default=10)
    p.add_argument("--transfer-batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--ratio", type=float, default=2)
    p.add_argument("--plt-start", type=float, default=0.5)
    p.add_argument("--plt-end", type=float, default=0.8)
    p.add_argument("--kd-teacher-fraction", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--kd-alpha", type=float, default=0.9)
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--runs", default="runs/bench_boost", help="folder for the runs' checkpoints")
    p.add_argument("--results", default="benchmarks/results", help="folder for boost.json and boost.md")
    p.add_argument("--tag", default="", help="suffix of the result files (boost{tag}.json)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.models, args.epochs, args.max_steps_per_epoch = ["cnn"], 2, args.max_steps_per_epoch or 100
        args.tag = args.tag or "_quick"
    runs = Path(args.runs)
    from quicktrain import data

    data_shape = list(data.get_dataset(args.dataset, root=args.data_dir).in_shape)
    settings = {k: getattr(args, k) for k in ("ratio", "plt_start", "plt_end", "kd_teacher_fraction",
                                               "kd_temperature", "kd_alpha")}
    base = TrainConfig(dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       device=args.device, data_dir=args.data_dir, max_steps_per_epoch=args.max_steps_per_epoch,
                       progress=False)
    jobs = [
        {"config": asdict(replace(base, model=m, seed=s, out=str(runs / f"{m}-{method}-{s}"))), "method": method,
         "args": settings, "data_shape": data_shape}
        for m in args.models for method in args.methods for s in args.seeds
    ]
    start = time.perf_counter()
    out = Path(args.results)
    partial = out / f"boost{args.tag}.partial.jsonl"
    partial.unlink(missing_ok=True)
    results = _run_all(run_method, jobs, args.jobs, partial)
    transfer: list[dict[str, Any]] = []
    if args.transfer:
        tbase = replace(base, dataset=args.transfer, epochs=args.transfer_epochs, max_steps_per_epoch=None,
                        data_dir=None, batch_size=args.transfer_batch_size)
        tjobs = [{"config": asdict(replace(tbase, model=r["model"], seed=r["seed"])), "pretrain": r["method"],
                  "source": r["out"]} for r in results]
        tjobs += [{"config": asdict(replace(tbase, model=m, seed=s)), "pretrain": "scratch", "source": None}
                  for m in args.models for s in args.seeds]
        transfer = _run_all(run_transfer, tjobs, args.jobs, partial)
    total = time.perf_counter() - start
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    header = (
        f"NetBooster benchmark on {args.dataset}: {args.epochs} epochs"
        + (f" of {args.max_steps_per_epoch} steps" if args.max_steps_per_epoch else "")
        + f", batch {args.batch_size}, AdamW lr {args.lr} cosine, seeds {args.seeds}, ratio {args.ratio}, "
        f"PLT {args.plt_start}-{args.plt_end}, KD teacher {args.kd_teacher_fraction} of the epochs "
        f"(T={args.kd_temperature}, alpha={args.kd_alpha}); device {device}, {args.jobs} run(s) in parallel "
        f"(wall times are per run, under that sharing); total {total:.0f}s.\n"
        f"Command: python benchmarks/boost.py {' '.join(argv) if argv is not None else ''}".rstrip()
    )
    text = tables(results, transfer, header)
    print(text)
    (out / f"boost{args.tag}.md").write_text(text + "\n")
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    (out / f"boost{args.tag}.json").write_text(json.dumps(
        {"args": vars(args), "environment": env, "total_s": total, "results": results, "transfer": transfer},
        indent=1))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
