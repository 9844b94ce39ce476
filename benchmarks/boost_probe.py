"""Where does NetBooster's non-linear phase lose what it learns? Validation accuracy along a run, of the giant
as it is and of the tiny network its weights would contract to right then. CPU, one thread, in sequence.

At every ``--every`` fraction of the run a probe (a model transform that changes nothing; the run's numbers are
those of ``benchmarks/boost.py``, same config and seed) evaluates on the validation split:

* ``giant``: the model being trained (the giant at its current PLT slope; after contraction the tiny network);
* ``linearised``: a copy of the giant with every PLT slope set to 1, BatchNorm statistics re-estimated at slope 1
  on ``--calib-batches`` fixed training batches (running statistics gathered at slope 0 do not describe the
  linear network), i.e. the tiny network that contracting the current weights would give, without training.

For ``linear`` (slope 1 throughout) the two coincide; ``netbooster_base`` is NetBooster with base supervision
(:func:`quicktrain.boost.base_supervision`, weight 1). The question: during the non-linear phase, does the
linearisation of NetBooster's giant improve as fast as the ``linear`` giant (which trains exactly that
function), and how much of the non-linear giant's lead survives PLT?

    python benchmarks/boost_probe.py --seeds 0 --methods netbooster linear --stop-at 0.5 --every 0.05 --tag _probe
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from boost import LAYERS
from torch import nn

from quicktrain import data, models
from quicktrain.boost import BoostTransform, base_supervision, is_giant, set_slope
from quicktrain.ghn import reestimate_bn
from quicktrain.train import AutogradGradients, Hooks, TrainConfig, Transform, evaluate, fit


class _Stop(Exception):
    """Raised by the probe at ``--stop-at`` to end a run early (the question is about the giant's phase)."""


class Probe(Transform):
    """Evaluates ``giant`` and ``linearised`` (module docstring) at the start of the chosen steps."""

    def __init__(self, config: TrainConfig, every: float, calib_batches: int, stop_at: float = 1.0) -> None:
        splits = data.get_dataset(config.dataset, root=config.data_dir, seed=config.seed)
        shape = tuple(splits.train.tensors[0].shape[1:])
        self.adapter = data.Adapter(shape, models.input_shape(config.model, shape))
        self.val = splits.val
        # fixed batches (no RNG drawn, so the run's trajectory is the unprobed one)
        self.calib = splits.train.tensors[0][: calib_batches * config.batch_size].split(config.batch_size)
        self.every, self.stop_at, self.rows = every, stop_at, []
        self.slope: float | None = None

    def _acc(self, model: nn.Module) -> float:
        return evaluate(model, self.val, self.adapter, 1000, torch.device("cpu"))["acc"]

    @torch.no_grad()
    def _linearised(self, giant: nn.Module) -> float:
        lin = copy.deepcopy(giant)
        set_slope(lin, 1.0)
        reestimate_bn(lin, (self.adapter(x) for x in self.calib))  # cumulative averages over the fixed batches
        return self._acc(lin)

    def on_step_start(self, model: nn.Module, step: int, total_steps: int) -> nn.Module:
        marks = {round(k * self.every * total_steps) for k in range(round(1 / self.every) + 1)}
        if step in marks or step == total_steps - 1:
            giant = is_giant(model)
            acc = self._acc(model)
            lin = self._linearised(model) if giant else acc
            slope = min((m.negative_slope for m in model.modules() if hasattr(m, "negative_slope")), default=None)
            self.rows.append({"step": step, "fraction": step / total_steps, "giant": giant, "slope": slope,
                              "acc": acc, "linearised": lin})
            if step >= self.stop_at * total_steps:
                raise _Stop
        return model


def run(config: TrainConfig, method: str, args: argparse.Namespace) -> dict[str, Any]:
    probe = Probe(config, args.every, args.calib_batches, args.stop_at)
    transforms: list[Any] = []
    if method != "vanilla":
        transforms.append(BoostTransform(ratio=4.0, depth=1, layers=LAYERS[args.layers], plt_start=args.plt_start,
                                         plt_end=args.plt_end, linear=method == "linear", verbose=False))
    gradients = base_supervision(1.0) if method == "netbooster_base" else AutogradGradients
    try:
        result = fit(config, Hooks(gradients=gradients, transforms=[*transforms, probe]))
    except _Stop:
        return {"method": method, "seed": config.seed, "stopped_at": args.stop_at, "probe": probe.rows}
    return {"method": method, "seed": config.seed, "val_acc": result.metrics["val_acc"],
            "test_acc": result.metrics["test_acc"], "probe": probe.rows}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinycnn")
    p.add_argument("--methods", nargs="+", default=["vanilla", "netbooster", "linear", "netbooster_base"],
                   choices=["vanilla", "netbooster", "linear", "netbooster_base"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=429)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--plt-start", type=float, default=0.2)
    p.add_argument("--plt-end", type=float, default=0.5)
    p.add_argument("--layers", default="narrow", choices=sorted(LAYERS))
    p.add_argument("--every", type=float, default=0.1)
    p.add_argument("--calib-batches", type=int, default=20)
    p.add_argument("--stop-at", type=float, default=1.0, help="end each run at this fraction (after probing it)")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--tag", default="_probe")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    log = Path(args.results) / f"boost{args.tag}.jsonl"
    done = {(r["method"], r["seed"]) for r in map(json.loads, log.read_text().splitlines())} if log.exists() else set()
    base = TrainConfig(model=args.model, dataset="fashion-mnist", epochs=args.epochs, batch_size=128, lr=2e-3,
                       device="cpu", max_steps_per_epoch=args.steps, progress=False, overwrite=True)
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in done:
                continue
            row = run(replace(base, seed=seed, out=f"runs/bench_boost/probe-{method}-{seed}"), method, args)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "probe"}), flush=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    lines = ["| method | seed | " + " | ".join(f"{r['fraction']:.2f}" for r in rows[0]["probe"]) + " |",
             "| --- | --- |" + " --- |" * len(rows[0]["probe"])]
    for r in rows:
        lines.append(f"| {r['method']} (as trained) | {r['seed']} | "
                     + " | ".join(f"{100 * q['acc']:.1f}" for q in r["probe"]) + " |")
        if r["method"] in ("netbooster", "netbooster_base"):
            lines.append(f"| {r['method']} (linearised) | {r['seed']} | "
                         + " | ".join(f"{100 * q['linearised']:.1f}" for q in r["probe"]) + " |")
    text = "Validation accuracy (%) at fractions of the run.\nCommand: python benchmarks/boost_probe.py " + \
        " ".join(argv) + "\n\n" + "\n".join(lines)
    print(text)
    (Path(args.results) / f"boost{args.tag}.md").write_text(text + "\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
