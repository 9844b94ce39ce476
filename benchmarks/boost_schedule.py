"""Why does NetBooster fall behind vanilla training at 4 epochs? Schedule variants of the tiny network's
fine-tuning phase, on validation accuracy, CPU, one thread, in sequence in one process.

The hypothesis under test (docs/boost.md, "The schedule hypothesis tested"): the default run contracts at 80%
of one cosine schedule, so the tiny network is fine-tuned only for the last 20% at learning rates below 10% of
the peak.
Variants (``E`` = ``--epochs``, each epoch ``--steps`` steps; PLT times in epochs):

* ``vanilla``: the tiny network, E epochs, one cosine schedule (the reference of every difference);
* ``default``: :class:`quicktrain.boost.BoostTransform` with the schedule that was its default before this
  study, PLT 0.5E-0.8E, contraction at 0.8E, the tiny network trained on at the tail of the same cosine;
* ``early``: PLT 0.2E-0.5E: contraction at half the run, the tiny network gets half the steps, at the middle
  of the cosine (learning rates from 50% of the peak down); chosen by this study, now the default;
* ``restart``: the giant for E-1 epochs with its own cosine (PLT from 0.5E to E-1, contraction at its end),
  then the tiny network for 1 epoch with a fresh cosine from the peak learning rate and a fresh AdamW
  (the "fine-tune after contraction" phase as a separate schedule); E epochs in all;
* ``giant+1``: the giant for E epochs (PLT 0.5E-E, contraction at the end), then the tiny network for 1 more
  epoch with a fresh cosine: E + 1 epochs, so it is also compared with ``vanilla +1`` (E + 1 epochs);
* ``contracted only``: the phase-1 model of ``restart`` right after contraction, before any fine-tuning
  (how much the tiny network gains from its own phase).

Every finished run goes to ``benchmarks/results/boost_schedule{tag}.jsonl`` (a rerun skips those there);
tables to ``.md``:

    python benchmarks/boost_schedule.py --epochs 4 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from boost import StepCPUTime, mean_std, paired, train_accuracy
from torch import nn

from quicktrain.boost import BoostTransform
from quicktrain.train import Hooks, TrainConfig, fit

VARIANTS = ("vanilla", "default", "early", "restart", "giant+1", "vanilla +1")


def _curve(out: str) -> list[float]:
    """Validation accuracy at the end of every epoch of a run (its ``metrics.jsonl``)."""
    rows = map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
    return [r["val_acc"] for r in rows if r.get("kind") == "epoch"]


def _phase(config: TrainConfig, transform: BoostTransform | None = None,
           start: nn.Module | None = None) -> tuple[Any, float]:
    """One fit (the tiny network, a boosted giant, or the tiny network started from ``start``'s weights)."""
    clock = StepCPUTime(config.max_steps_per_epoch)
    init = None
    if start is not None:
        state = start.state_dict()

        def init(model: nn.Module, _: torch.Tensor) -> None:
            model.load_state_dict(state)

    result = fit(config, Hooks(init=init, transforms=[t for t in (transform, clock) if t is not None]))
    return result, clock.seconds


def run_variant(base: TrainConfig, variant: str, steps: int) -> list[dict[str, Any]]:
    """The rows of one variant (``restart`` also gives its ``contracted only`` row)."""
    E = base.epochs
    boost = {"ratio": 4.0, "depth": 1, "verbose": False}

    def row(name: str, result: Any, cpu: float, epochs: int, curve: list[float], **extra: Any) -> dict[str, Any]:
        return {"variant": name, "seed": base.seed, "val_acc": result.metrics["val_acc"],
                "test_acc": result.metrics["test_acc"], "train_acc": train_accuracy(result.model, base),
                "epochs": epochs, "train_cpu_s": cpu, "val_curve": curve, **extra}

    if variant in ("vanilla", "vanilla +1"):
        epochs = E + (variant == "vanilla +1")
        result, cpu = _phase(replace(base, epochs=epochs))
        return [row(variant, result, cpu, epochs, _curve(base.out))]
    if variant in ("default", "early"):
        window = (0.5, 0.8) if variant == "default" else (0.2, 0.5)
        transform = BoostTransform(**boost, plt_start=window[0], plt_end=window[1])
        result, cpu = _phase(base, transform)
        return [row(variant, result, cpu, E, _curve(base.out), contracted_at_step=transform.contracted_at)]
    # two phases: the giant with its own cosine, contracted at its end, then the tiny network, fresh cosine
    giant_epochs = E - 1 if variant == "restart" else E
    transform = BoostTransform(**boost, plt_start=0.5 * E * steps, plt_end=giant_epochs * steps, unit="step")
    first, cpu1 = _phase(replace(base, epochs=giant_epochs), transform)
    curve1 = _curve(base.out)
    second_cfg = replace(base, epochs=1, out=base.out + "-ft")
    second, cpu2 = _phase(second_cfg, start=first.model)
    rows = [row(variant, second, cpu1 + cpu2, giant_epochs + 1, curve1 + _curve(second_cfg.out),
                giant_epochs=giant_epochs)]
    if variant == "restart":
        rows.append(row("contracted only", first, cpu1, giant_epochs, curve1))
    return rows


def table(records: list[dict[str, Any]], header: str) -> str:
    names = list(dict.fromkeys(r["variant"] for r in records))
    lines = [header, "", "| variant | epochs | val acc (%) | test acc (%) | train acc (%) | train CPU (s) | "
             "val acc after each epoch (%, seed mean) | seeds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        rows = [r for r in records if r["variant"] == name]
        curves = [r["val_curve"] for r in rows]
        curve = " ".join(f"{100 * sum(c[i] for c in curves) / len(curves):.1f}" for i in range(len(curves[0])))
        lines.append(f"| {name} | {rows[0]['epochs']} | {mean_std([r['val_acc'] for r in rows], 100)} | "
                     f"{mean_std([r['test_acc'] for r in rows], 100)} | "
                     f"{mean_std([r['train_acc'] for r in rows], 100)} | "
                     f"{mean_std([r['train_cpu_s'] for r in rows], digits=1)} | {curve} | {len(rows)} |")
    lines += ["", "Paired differences in validation accuracy (points, mean and 95% t-interval over seeds):", "",
              "| comparison | difference | 95% interval | seeds |", "| --- | --- | --- | --- |"]
    by = {name: {r["seed"]: r["val_acc"] for r in records if r["variant"] == name} for name in names}
    pairs = [(n, "vanilla") for n in names if n != "vanilla"] + [(n, "default") for n in names
                                                                  if n not in ("vanilla", "default", "vanilla +1")]
    pairs.append(("giant+1", "vanilla +1"))
    for a, b in pairs:
        if a in by and b in by:
            mean, low, high, n = paired(by[a], by[b])
            lines.append(f"| {a} − {b} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {n} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinycnn")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=429, help="optimizer steps of an epoch (at most one pass)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--runs", default="runs/bench_boost_schedule")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.results)
    log = out / f"boost_schedule{args.tag}.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    seen = {(r["variant"], r["seed"]) for r in records}
    base = TrainConfig(model=args.model, dataset="fashion-mnist", epochs=args.epochs, batch_size=128, lr=args.lr,
                       device="cpu", max_steps_per_epoch=args.steps, progress=False, overwrite=True)
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in seen:
                continue
            config = replace(base, seed=seed, out=f"{args.runs}/{args.tag or 'main'}-{variant.replace(' ', '')}-{seed}")
            for row in run_variant(config, variant, args.steps):
                records.append(row)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    command = "python benchmarks/boost_schedule.py " + " ".join(argv)
    header = (f"NetBooster fine-tuning schedules, {args.model} on fashion-mnist, {args.epochs} epochs of {args.steps} "
              f"steps (batch 128, AdamW lr {args.lr:g}, cosine), ratio 4, depth 1; CPU, one thread, "
              f"torch {torch.__version__}, python {platform.python_version()}.\nCommand: {command}")
    text = table(records, header)
    print(text)
    (out / f"boost_schedule{args.tag}.md").write_text(text + "\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
