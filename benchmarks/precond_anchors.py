"""Benchmark: time to accuracy of quicktrain's preconditioners against the optimizers users would pick instead.

Contenders, on fashion-mnist at batch 128, one torch thread:

* ``kfac`` — ``quicktrain.precond.make("kfac", ...)`` (damping 0.1, curvature every 5 steps, inverses every 20)
  with SGD momentum 0.9 applying the preconditioned gradient ``F̂⁻¹g``;
* ``kfac_graft`` — the same K-FAC with layer-wise Adam grafting (``grafting="adam"``: each layer's K-FAC
  direction with the norm of RMSprop's step on that layer), and ``shampoo`` — ``make("shampoo", ...)`` as
  Distributed Shampoo runs it (Adam grafting, ε = 1e-12, statistics every step, roots every 20, blocks of 1024),
  both under SGD momentum 0.9. Their grafted step has Adam's per-coordinate scale and SGD momentum 0.9 adds up
  about ``1/(1-0.9) = 10`` of them, so their default rate is SOAP's ``3e-3`` over 10; ``kfac_graft_d1e-3`` is
  ``kfac_graft`` at damping 1e-3 (with grafting the damping no longer sets the step size);
* ``kfac_soap_graft`` — ``make("kfac_soap", ..., grafting="adam")``: Adam's second-moment normalisation in the
  eigenbasis of the K-FAC factors (SOAP's solver on K-FAC's curvature; curvature every 5 steps, eigenbases every
  20, β₂ = 0.95, ε = 1e-8) under SGD momentum 0.9; its step has Adam's per-coordinate scale, so its default
  rate is the grafted ones' ``3e-4``. Adam grafting gives the class token and positional embedding, which no
  representation covers, RMSprop's step size instead of the plain gradient's (chosen on ``vit_tiny`` seed 3,
  which the anchors do not use: ``precond_anchors_ablate.py --seed 3``);
* ``muon`` — ``torch.optim.Muon`` (torch 2.14.1) on the 2-D hidden weights, ``torch.optim.AdamW`` on the rest
  (convolutions, biases, norms, embeddings and the classifier head), as its documentation recommends; with
  ``adjust_lr_fn="match_rms_adamw"`` (update RMS matched to AdamW's, ``γ ← 0.2·γ·√max(A, B)``; Liu et al. 2025)
  both groups share one learning rate and weight decay, so Muon gets the same grid as AdamW;
* ``soap`` and ``psgd`` — ``heavyball.SOAP`` and ``heavyball.PSGDKron`` (heavyball 3.2.1) with their defaults,
  run eagerly: ``heavyball.utils.compile_mode = None`` turns its ``torch.compile`` fusion off (no compiler
  toolchain is assumed on the CPU box; on CUDA with compile heavyball's steps would be cheaper);
* ``adamw`` (torch defaults, weight decay 0.01) and ``sgd`` (momentum 0.9, weight decay 5e-4, quicktrain's
  ``train`` defaults).

Protocol, the same for every contender: a grid of three learning rates ``d·{1/3, 1, 3}`` around the
contender's usual default ``d`` (:data:`CONTENDERS`), each trained on seed 0; the fastest to the target in
training seconds is selected (none reaching it: the highest last accuracy), and the selected learning rate also
trains on seeds 1 and 2. The table reports the median and range over seeds 0, 1, 2 of the seconds and steps to
the target test accuracy (:data:`TARGETS`), the grid's seed-0 seconds per learning rate, and whether the
selected rate sits on the grid's edge. A seed fixes the initial weights and the batch order, so every
contender sees the same ones. To fit a shared 2-core CPU every run **stops at the target** (or at its budget),
so ``test_acc_at_stop`` is the full test set's accuracy at that point, not after a common training length.
That is a separate mode: ``--final-steps N --lrs c=lr ...`` trains each contender at the given learning rate
(the one selected by an earlier time-to-target run) on seeds 0, 1, 2 for exactly ``N`` steps, in turns, and
reports the full test set's accuracy and the CPU seconds at ``N`` (``precond_anchors{tag}_final.*``).

Timing: all runs of a phase advance in turns, one optimisation step each (run A step, run B step, ...), in
one process. The training clock is the CPU time of the (single) torch thread during forward, backward and
optimizer step, so that other jobs on a shared machine, which stretch wall time several-fold and unevenly, do
not enter it; on an idle machine with one thread it equals wall time, and the wall seconds are reported beside
it. Every ``--eval-every`` steps the model is evaluated on a fixed test subset (``--eval-n`` images, the same
for all) with the clock stopped; the target counts as reached at the first such evaluation at or above it.
A run stops at the target, at ``--steps`` steps or at ``--cap-s`` clock seconds, and in the grid also once its
clock passes the time another learning rate of the same contender took to the target (it can no longer be
selected). A non-finite loss ends a run as diverged.

Install heavyball into the benchmark's own folder (not the project venv; ``--no-deps`` keeps the pinned torch;
numpy is already there, opt-einsum is needed by heavyball's PSGD einsum contractions), once::

    .venv/bin/pip install --target benchmarks/.venv-heavyball --no-deps heavyball==3.2.1 opt-einsum==3.4.0

Usage::

    .venv/bin/python benchmarks/precond_anchors.py --models cnn vit_tiny       # every contender, both models
    .venv/bin/python benchmarks/precond_anchors.py --models cnn --contenders kfac muon soap adamw   # one model
    .venv/bin/python benchmarks/precond_anchors.py --models cnn --steps 4 --eval-every 2 --seeds   # smoke run
    .venv/bin/python benchmarks/precond_anchors.py --models cnn --final-steps 300 --lrs soap=0.009 muon=0.003

Separate invocations for separate models (e.g. one process per model) fill the same result files: a write
keeps the rows of the models it did not run. Contenders are compared only within one invocation's turns.

Prints a Markdown table; writes ``benchmarks/results/precond_anchors{tag}.{csv,json,md}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
HEAVYBALL = ROOT / ".venv-heavyball"
# Before torch is imported: torch.backends.opt_einsum picks up opt_einsum only at torch's import, and without it
# heavyball's PSGD contracts its einsums left to right (a 64 GB intermediate on the cnn).
sys.path.insert(0, str(HEAVYBALL))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from quicktrain import precond  # noqa: E402
from quicktrain.data import adapt, get_dataset  # noqa: E402
from quicktrain.models import get_model, input_shape  # noqa: E402
from quicktrain.report import records_markdown, write_records_csv  # noqa: E402

# model -> target test accuracy: the 85% for cnn; vit_tiny learns slower (AdamW at lr 3e-3 was at 68% after
# 125 steps in a probe), 70% is reachable in the step budget
TARGETS = {"cnn": 0.85, "vit_tiny": 0.70, "resnet20": 0.85}
GRID_FACTORS = (1 / 3, 1.0, 3.0)
Step = Callable[[Tensor, Tensor], Tensor]  # one optimisation step on a batch; returns the loss


def _heavyball():
    if not (HEAVYBALL / "heavyball").is_dir():
        raise SystemExit(
            f"heavyball not found in {HEAVYBALL}; install it with\n  .venv/bin/pip install --target "
            "benchmarks/.venv-heavyball --no-deps heavyball==3.2.1 opt-einsum==3.4.0"
        )
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None  # eager: heavyball's torch.compile fusion needs a compiler toolchain
    return heavyball


def _plain(model: nn.Module, optimizers: list[torch.optim.Optimizer],
           before_step: Callable[[], None] | None = None) -> Step:
    loss_fn = nn.CrossEntropyLoss()

    def step(x: Tensor, y: Tensor) -> Tensor:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if before_step is not None:
            before_step()
        for opt in optimizers:
            opt.step()
        return loss.detach()

    return step


def _preconditioned(method: str, **config: float | str) -> Callable[[nn.Module, float], Step]:
    def build(model: nn.Module, lr: float) -> Step:
        # SGD with momentum applies the preconditioned gradient as given; AdamW would rescale it per coordinate
        maker = precond.make(method, model, nn.CrossEntropyLoss(), **config)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

        def step(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad(set_to_none=True)
            try:
                loss, _ = maker.forward_backward(x, y)
            except FloatingPointError:  # the maker refuses a non-finite loss or update: the run diverged
                return torch.tensor(float("nan"))
            opt.step()
            return loss

        return step

    return build


def _muon(model: nn.Module, lr: float) -> Step:
    """Muon on the 2-D weights of hidden layers, AdamW on everything else (torch.optim.Muon's documentation)."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight  # the classifier is not hidden
    hidden = [p for p in model.parameters() if p.ndim == 2 and p is not head]
    rest = [p for p in model.parameters() if p.ndim != 2 or p is head]
    return _plain(
        model,
        [
            torch.optim.Muon(hidden, lr=lr, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(rest, lr=lr, weight_decay=0.01),
        ],
    )


def _muon_conv(model: nn.Module, lr: float) -> Step:
    """Muon on every hidden weight, conv filters included as ``[out, in·kh·kw]`` matrices (Jordan's CIFAR-10
    speedrun recipe); AdamW on the first layer, the classifier, biases and norms.

    ``torch.optim.Muon`` takes 2-D parameters only, so each conv filter gets a 2-D parameter that shares its
    storage: Muon's in-place update of the view is the update of the filter.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    first, head = weights[0], weights[-1]
    hidden = [p for p in weights if p is not first and p is not head]
    views = [nn.Parameter(p.detach().view(p.shape[0], -1)) for p in hidden]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]

    def hand_over_grads() -> None:  # the filters are in no optimizer, so nothing else would clear their .grad
        for view, p in zip(views, hidden, strict=True):
            view.grad, p.grad = p.grad.view_as(view), None

    return _plain(
        model,
        [
            torch.optim.Muon(views, lr=lr, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(rest, lr=lr, weight_decay=0.01),
        ],
        hand_over_grads,
    )


def _heavy(name: str, **options: float) -> Callable[[nn.Module, float], Step]:
    """heavyball's optimizer ``name`` with its defaults, or ``options`` (the ablation's variants)."""

    def build(model: nn.Module, lr: float) -> Step:
        return _plain(model, [getattr(_heavyball(), name)(model.parameters(), lr=lr, **options)])

    return build


# name -> (builder(model, lr) -> step, usual default learning rate d; the grid is d·GRID_FACTORS)
CONTENDERS: dict[str, tuple[Callable[[nn.Module, float], Step], float]] = {
    "kfac": (_preconditioned("kfac", damping=0.1, curvature_interval=5, inverse_interval=20), 0.01),
    "kfac_graft": (_preconditioned("kfac", damping=0.1, curvature_interval=5, inverse_interval=20,
                                   grafting="adam"), 3e-4),
    # grafting fixes each layer's step size, so the damping no longer has to: 1e-3 lets the curvature into the
    # direction (at 0.1 the factors' damping is 3-21x their mean eigenvalue); chosen from the vit_tiny ablation
    "kfac_graft_d1e-3": (_preconditioned("kfac", damping=1e-3, curvature_interval=5, inverse_interval=20,
                                         grafting="adam"), 3e-4),
    "kfac_soap_graft": (_preconditioned("kfac_soap", curvature_interval=5, inverse_interval=20, grafting="adam"),
                        3e-4),
    "shampoo": (_preconditioned("shampoo", damping=1e-12, curvature_interval=1, inverse_interval=20,
                                grafting="adam"), 3e-4),
    "muon": (_muon, 1e-3),
    "muon_conv": (_muon_conv, 1e-3),
    "soap": (_heavy("SOAP"), 3e-3),
    "psgd": (_heavy("PSGDKron"), 1e-3),
    "adamw": (lambda model, lr: _plain(model, [torch.optim.AdamW(model.parameters(), lr=lr)]), 1e-3),
    "sgd": (
        lambda model, lr: _plain(
            model, [torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)]
        ),
        0.1,
    ),
}
# the quicktrain methods; the rest are the anchors
QUICKTRAIN = ("kfac", "kfac_graft", "kfac_graft_d1e-3", "kfac_soap_graft", "shampoo")
# the bar: best quicktrain ≥ 1.25× sooner than the best of these
ANCHORS_JUDGED = ("adamw", "muon", "muon_conv", "soap")


@dataclass
class Data:
    """Training tensors, the fixed evaluation subset and the full test set, already in the model's shape."""

    x: Tensor
    y: Tensor
    x_eval: Tensor
    y_eval: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


@dataclass
class Run:
    """One contender at one learning rate and seed, advanced one step at a time by :func:`in_turns`."""

    contender: str
    lr: float
    seed: int
    model: nn.Module
    step_fn: Step
    order: Tensor  # the seed's batch order: indices into the training set, reshuffled each epoch
    steps: int = 0
    seconds: float = 0.0  # training clock (thread CPU time): forward, backward and optimizer step only
    wall: float = 0.0  # the same steps in wall time
    evals: list[tuple[int, float, float, float]] = field(default_factory=list)  # (step, CPU s, wall s, subset acc)
    reached: tuple[int, float, float] | None = None  # (steps, CPU s, wall s) at the first eval at/above target
    diverged: bool = False
    pruned: bool = False
    final_acc: float | None = None


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` in eval mode (BatchNorm running statistics, no dropout)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hits = [(model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum() for i in range(0, len(y), batch)]
        correct = int(sum(hits))
    model.train(was_training)
    return correct / len(y)


def load(model_name: str, eval_n: int) -> Data:
    """Fashion-mnist adapted to ``model_name``'s input; the evaluation subset is a fixed draw of the test set."""
    splits = get_dataset("fashion-mnist")
    shape = input_shape(model_name, splits.in_shape)
    (x, y), (xt, yt) = splits.train.tensors, splits.test.tensors
    if tuple(x.shape[1:]) != shape:
        x, xt = adapt(x, shape), adapt(xt, shape)
    pick = torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))[:eval_n]
    return Data(x, y, xt[pick], yt[pick], xt, yt, splits.num_classes)


def new_run(model_name: str, data: Data, contender: str, lr: float, seed: int, steps: int, batch: int) -> Run:
    torch.manual_seed(seed)  # the same initial weights for every contender on a seed
    model = get_model(model_name, num_classes=data.num_classes, in_shape=tuple(data.x.shape[1:]))
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch / len(data.y))
    order = torch.cat([torch.randperm(len(data.y), generator=gen) for _ in range(epochs)])
    return Run(contender, lr, seed, model, CONTENDERS[contender][0](model, lr), order)


def in_turns(
    runs: list[Run], data: Data, *, target: float, steps: int, cap_s: float, batch: int, eval_every: int,
    prune: bool = False,
) -> None:
    """Advance every run by one step in turns until it reaches the target or its budget.

    The clock is the CPU time of this (single torch) thread during forward, backward and optimizer step: on a
    shared machine other processes stretch wall time but not it (wall seconds are kept beside it). Evaluations
    (every ``eval_every`` steps on the fixed subset, on the full test set when a run stops) are off the clock.
    ``prune`` (the grid): a run whose clock passes the time another learning rate of its contender needed to reach
    the target stops, since it can no longer be selected.
    """
    active = list(runs)
    while active:
        for run in list(active):
            idx = run.order[run.steps * batch : (run.steps + 1) * batch]
            x, y = data.x[idx], data.y[idx]
            cpu, wall = time.thread_time(), time.perf_counter()
            loss = run.step_fn(x, y)
            run.seconds += time.thread_time() - cpu
            run.wall += time.perf_counter() - wall
            run.steps += 1
            if not torch.isfinite(loss):
                run.diverged = True
            elif run.steps % eval_every == 0 or run.steps >= steps or run.seconds >= cap_s:
                acc = accuracy(run.model, data.x_eval, data.y_eval)
                run.evals.append((run.steps, round(run.seconds, 2), round(run.wall, 2), acc))
                if run.reached is None and acc >= target:
                    run.reached = (run.steps, run.seconds, run.wall)
            rivals = [r.reached[1] for r in runs if prune and r.contender == run.contender and r.reached]
            run.pruned = not run.reached and bool(rivals) and run.seconds > min(rivals)
            if run.diverged or run.pruned or run.steps >= steps or run.seconds >= cap_s or run.reached:
                if not (run.diverged or run.pruned):
                    run.final_acc = accuracy(run.model, data.x_test, data.y_test)
                active.remove(run)
                print(f"    {_describe(run)}", flush=True)


def _describe(run: Run) -> str:
    to = f"target at {run.reached[0]} steps / {run.reached[1]:.1f} s" if run.reached else "target not reached"
    end = "diverged" if run.diverged else "pruned" if run.pruned else f"test acc {run.final_acc:.4f}"
    last = f", last eval {run.evals[-1][3]:.3f}" if run.evals else ""
    return (f"{run.contender:8s} lr {run.lr:<8.3g} seed {run.seed}: {to}; {run.steps} steps, {run.seconds:.1f} s "
            f"CPU, {run.wall:.1f} s wall{last}; {end}")


def _selection_key(run: Run) -> tuple:
    """Fastest to the target first; among those that never reached it, the best last evaluation."""
    if run.diverged:
        return (2, 0.0)
    if run.reached:
        return (0, run.reached[1])
    return (1, -run.evals[-1][3] if run.evals else 0.0)


def _median_range(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def summarise(model_name: str, contenders: list[str], grid: list[Run], seeds: list[Run]) -> list[dict]:
    """One row per contender: its grid on seed 0 and the selected learning rate over seeds 0, 1, 2."""
    rows = []
    for c in contenders:
        grid_c = [r for r in grid if r.contender == c]
        best = min(grid_c, key=_selection_key)
        runs = [best] + [r for r in seeds if r.contender == c]
        reached = [r for r in runs if r.reached]
        accs = [r.final_acc for r in runs if r.final_acc is not None]
        lrs = [r.lr for r in grid_c]
        rows.append(
            {
                "model": model_name,
                "contender": c,
                "target": TARGETS[model_name],
                "lr_grid": " ".join(f"{lr:.3g}" for lr in lrs),
                "best_lr": f"{best.lr:.3g}" + (" (edge)" if best.lr in (lrs[0], lrs[-1]) else ""),
                "grid_s_to_target": " ".join(f"{r.reached[1]:.1f}" if r.reached else "-" for r in grid_c),
                "seeds": " ".join(str(r.seed) for r in runs),
                "reached": f"{len(reached)}/{len(runs)}",
                "s_to_target": _median_range([r.reached[1] for r in reached], 1) if reached else "never",
                "wall_s_to_target": _median_range([r.reached[2] for r in reached], 1) if reached else "never",
                "steps_to_target": _median_range([r.reached[0] for r in reached], 0) if reached else "never",
                "median_s": statistics.median([r.reached[1] for r in reached]) if len(reached) == len(runs) else None,
                "test_acc_at_stop": _median_range(accs, 4) if accs else "diverged",
                "ms_per_step": round(1000 * statistics.median([r.seconds / r.steps for r in runs]), 1),
                "diverged": sum(r.diverged for r in grid_c + runs[1:]),
                "evals": {f"lr{r.lr:.3g}_seed{r.seed}": r.evals for r in grid_c + runs[1:]},
            }
        )
    return rows


def benchmark(
    model_name: str, contenders: list[str], args: argparse.Namespace, write: Callable[[list[dict]], None]
) -> list[dict]:
    """Grid on seed 0, then the selected learning rate on seeds 1 and 2; every run stops at the target."""
    target = TARGETS[model_name]
    data = load(model_name, args.eval_n)
    budget = {"target": target, "steps": args.steps, "cap_s": args.cap_s, "batch": args.batch,
              "eval_every": args.eval_every}
    print(f"\n## {model_name}: target {target:.0%} on {args.eval_n} test images; grid on seed 0", flush=True)
    grid = [
        new_run(model_name, data, c, CONTENDERS[c][1] * f, 0, args.steps, args.batch)
        for c in contenders
        for f in GRID_FACTORS
    ]
    in_turns(grid, data, prune=True, **budget)
    write(summarise(model_name, contenders, grid, []))  # seed 0 alone, in case the seeds do not finish
    best_lr = {c: min((r for r in grid if r.contender == c), key=_selection_key).lr for c in contenders}
    print(f"## {model_name}: selected lrs { {c: f'{lr:.3g}' for c, lr in best_lr.items()} }; seeds {args.seeds}")
    seeds = [new_run(model_name, data, c, best_lr[c], s, args.steps, args.batch) for s in args.seeds
             for c in contenders]
    in_turns(seeds, data, **budget)
    return summarise(model_name, contenders, grid, seeds)


def fixed_length(model_name: str, lrs: dict[str, float], args: argparse.Namespace) -> list[dict]:
    """Each contender at its given learning rate on seeds 0, 1, 2 for exactly ``args.final_steps`` steps, in turns:
    the full test set's accuracy after a common training length, and the CPU seconds it took."""
    data = load(model_name, args.eval_n)
    steps = args.final_steps
    print(f"\n## {model_name}: {steps} steps at lrs { {c: f'{lr:.3g}' for c, lr in lrs.items()} }", flush=True)
    runs = [new_run(model_name, data, c, lr, s, steps, args.batch) for s in (0, *args.seeds) for c, lr in lrs.items()]
    # a target above any accuracy: no run stops before its last step
    in_turns(runs, data, target=math.inf, steps=steps, cap_s=math.inf, batch=args.batch, eval_every=args.eval_every)
    rows = []
    for c, lr in lrs.items():
        mine = [r for r in runs if r.contender == c]
        accs = [r.final_acc for r in mine if r.final_acc is not None]
        rows.append({
            "model": model_name, "contender": c, "lr": f"{lr:.3g}", "steps": steps,
            "seeds": " ".join(str(r.seed) for r in mine),
            "test_acc": _median_range(accs, 4) if accs else "diverged",
            "cpu_s": _median_range([r.seconds for r in mine], 1),
            "ms_per_step": round(1000 * statistics.median([r.seconds / r.steps for r in mine]), 1),
            "diverged": sum(r.diverged for r in mine),
            "evals": {f"seed{r.seed}": r.evals for r in mine},
        })
    return rows


FINAL_COLUMNS = ["model", "contender", "lr", "steps", "seeds", "test_acc", "cpu_s", "ms_per_step", "diverged"]


def _parse_lrs(pairs: list[str]) -> dict[str, float]:
    lrs = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in CONTENDERS or not value:
            raise SystemExit(f"--lrs {pair!r}: expected CONTENDER=LR with CONTENDER one of {sorted(CONTENDERS)}")
        lrs[name] = float(value)
    return lrs


def verdict(rows: list[dict]) -> list[str]:
    """The issue's bar per model: best quicktrain median seconds to target ≥ 1.25× sooner than the best anchor."""
    lines = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        by = {r["contender"]: r for r in rows if r["model"] == model_name}
        ours = [(by[c]["median_s"], c) for c in QUICKTRAIN if c in by and by[c]["median_s"] is not None]
        theirs = [(by[c]["median_s"], c) for c in ANCHORS_JUDGED if c in by and by[c]["median_s"] is not None]
        if not ours or not theirs:
            lines.append(f"{model_name}: not decided (a side did not reach the target on all three seeds)")
            continue
        (s_ours, c_ours), (s_theirs, c_theirs) = min(ours), min(theirs)
        ratio = s_theirs / s_ours
        met = "met" if ratio >= 1.25 else "NOT met"
        lines.append(
            f"{model_name}: {c_ours} {s_ours:.1f} s vs {c_theirs} {s_theirs:.1f} s -> {ratio:.2f}x ({met}, bar 1.25x)"
        )
    return lines


COLUMNS = ["model", "contender", "target", "lr_grid", "best_lr", "grid_s_to_target", "seeds", "reached",
           "s_to_target", "steps_to_target", "test_acc_at_stop", "wall_s_to_target", "ms_per_step", "diverged"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "vit_tiny"], choices=list(TARGETS))
    ap.add_argument("--contenders", nargs="+",
                    default=["kfac", "kfac_graft", "shampoo", "muon", "soap", "psgd", "adamw", "sgd"],
                    choices=list(CONTENDERS))
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2], help="seeds after the grid's seed 0")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300, help="step budget of a run")
    ap.add_argument("--cap-s", type=float, default=90.0, help="training-clock budget of a run, CPU seconds")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-n", type=int, default=1000, help="size of the fixed test subset evaluated every N steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--final-steps", type=int, default=0,
                    help="instead of time to target: train --lrs' contenders for exactly this many steps")
    ap.add_argument("--lrs", nargs="+", default=[], metavar="CONTENDER=LR", help="learning rates for --final-steps")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    if bool(args.final_steps) != bool(args.lrs):
        raise SystemExit("--final-steps and --lrs go together: the common length and each contender's rate")
    lrs = _parse_lrs(args.lrs)
    if args.final_steps:
        args.contenders = list(lrs)
    torch.set_num_threads(args.threads)
    if {"soap", "psgd"} & set(args.contenders):
        _heavyball()  # fail before any training if the side folder is missing
    env = (f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()} CPU, "
           f"threads {torch.get_num_threads()}, heavyball eager (compile off)")
    print(env, flush=True)
    stem = args.out_dir / f"precond_anchors{args.tag}"
    done: list[dict] = []

    def write(rows: list[dict]) -> None:
        # keep the rows of models this invocation does not run, so that models can run as separate processes
        path = stem.with_suffix(".json")
        old = json.loads(path.read_text())["rows"] if path.exists() else []
        ran = [r["model"] for r in done + rows]
        rows = [r for r in old if r["model"] not in ran] + done + rows
        table, lines = records_markdown(rows, COLUMNS), verdict(rows)
        print(table + "\n" + "\n".join(lines), flush=True)
        write_records_csv([{k: r[k] for k in COLUMNS} for r in rows], stem.with_suffix(".csv"))
        record = {"env": env, "args": vars(args) | {"out_dir": str(args.out_dir)}, "rows": rows, "verdict": lines}
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
        stem.with_suffix(".md").write_text(f"{env}\n\n{table}\n\n" + "\n".join(f"- {v}" for v in lines) + "\n")

    if args.final_steps:
        final = args.out_dir / f"precond_anchors{args.tag}_final"
        rows = [row for model_name in args.models for row in fixed_length(model_name, lrs, args)]
        table = records_markdown(rows, FINAL_COLUMNS)
        print(table, flush=True)
        write_records_csv([{k: r[k] for k in FINAL_COLUMNS} for r in rows], final.with_suffix(".csv"))
        record = {"env": env, "args": vars(args) | {"out_dir": str(args.out_dir)}, "rows": rows}
        final.with_suffix(".json").write_text(json.dumps(record, indent=1))
        final.with_suffix(".md").write_text(f"{env}\n\n{table}\n")
        return
    for model_name in args.models:
        rows = benchmark(model_name, args.contenders, args, write)
        write(rows)
        done += rows


if __name__ == "__main__":
    main()
