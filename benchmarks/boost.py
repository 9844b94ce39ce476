"""NetBooster on MCU-scale networks: fair baselines at a fixed step budget, downstream transfer, schedule
study and the giant's step cost. CPU, one thread, contenders timed in turns in one process.

For each model and seed, in this order (so load on the machine hits the contenders alike):

* ``vanilla``: the tiny network for ``--steps`` optimizer steps (equal epochs);
* ``netbooster``: :class:`quicktrain.boost.BoostTransform`, the same steps: giant, PLT window, exact
  contraction, fine-tuning of the tiny network;
* ``vanilla_wall``: the tiny network for as many steps as fit in this seed's NetBooster training time (equal
  wall-clock: ``steps x netbooster time / vanilla time``). The time is the thread's CPU time of the training
  steps (:class:`StepCPUTime`), which is the wall time of a quiet one-thread machine: on the shared machine
  the wall time of runs in sequence varied ±70% with other jobs' load, and so did this ratio;
* ``kd``: a teacher with the giant's architecture (the same expansion, trained normally, no PLT) for
  ``--steps`` steps, then the tiny network distilled from it (Hinton et al., 2015) for ``--steps`` steps:
  twice NetBooster's steps, a budget that favours KD;
* ``linear``: the same giant with PLT slope 1 from the first step (linear over-parameterisation as in
  ExpandNets / RepVGG re-parameterisation), contracted at the same step as NetBooster;
* ``netbooster_base``: NetBooster with NetAug's base supervision (:func:`quicktrain.boost.base_supervision`):
  until contraction every step also trains the giant at slope 1, the network it contracts to, with weight 1
  and the giant at the current slope with weight ``--base-weight``: two giant passes per step until then;
* ``reference``: the large ``--reference`` model (vanilla), to show how far below it the tiny one fits.

Each pre-trained tiny model (and one from scratch) is then fine-tuned on ``--transfer`` (all weights but the
classifier loaded), and, as a second protocol, on only ``--transfer-labels`` training examples per class of it
(the same test set; as many fine-tuning steps as the full protocol, so only the labels are fewer).
``--transfer-repeats R`` fine-tunes each pre-trained model R times (fine-tuning seeds ``s, s + 100, ...``: the
classifier's initialisation, the data order, the validation split and the labelled examples change, the
pre-trained weights and the test set do not) and the downstream tables pair the per-seed means: R > 1 averages
out the fine-tuning's own noise, which a single fine-tuning per seed leaves in the paired differences.
``--study`` runs NetBooster schedule variants instead; ``--cost`` times the giant's and the tiny network's
training step in turns and profiles where the giant's time goes.

Every finished run is appended to ``benchmarks/results/boost{tag}.jsonl``; a rerun skips the runs already
there (resumable). The tables (mean ± std and paired differences with a 95% t-interval) go to
``boost{tag}.md``.

    python benchmarks/boost.py --models tinycnn                        # main table + downstream
    python benchmarks/boost.py --models tinycnn --steps 429 --epochs 4 --seeds 0 1 2 --tag _long  # 4 full epochs
    python benchmarks/boost.py --models mobilenetv2_mcu --methods vanilla netbooster --tag _mcu
    python benchmarks/boost.py --study --models tinycnn --seeds 0 1 2 --tag _study
    python benchmarks/boost.py --cost --tag _cost
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from scipy import stats
from torch import nn

from quicktrain import data, models
from quicktrain.boost import BoostTransform, base_supervision, count_macs, count_params, distillation, expand
from quicktrain.train import AutogradGradients, Hooks, TrainConfig, Transform, evaluate, fit, load_checkpoint

METHODS = ("vanilla", "netbooster", "vanilla_wall", "kd", "linear", "netbooster_base", "reference")
PRETRAINED = ("vanilla", "netbooster", "vanilla_wall", "kd", "linear", "netbooster_base")
# One epoch of --steps steps (each run evaluates once, at its end: evaluations cost as much as training here);
# the longer equal-wall-clock runs take as many epochs of at most a pass over the data as they need.
FULL_EPOCH = 55_000  # Fashion-MNIST training examples
TRAIN_EVAL = 10_000  # training examples on which the final train accuracy is measured (eval mode)


def _narrow(name: str, module: nn.Module) -> bool:
    if not isinstance(module, nn.Conv2d):
        return True
    widening = module.kernel_size == (1, 1) and module.out_channels > module.in_channels
    return module.groups == 1 and not widening


# Which layers get blocks. "narrow" leaves out 1x1 convolutions that widen (MobileNetV2's expansion layers
# and its last layer: blocks after them act on 6x wider maps and cost most of the giant's MACs) and grouped
# or depthwise convolutions (their blocks are per-channel MLPs, bound by memory traffic: on CPU such a block
# takes about as long as a dense one with 48x its MACs, so the giant's time would be far above its MAC ratio).
# The tiny CNN has neither kind, so there "narrow" is every layer.
LAYERS: dict[str, Callable[[str, nn.Module], bool] | None] = {
    "all": None,
    "conv": lambda name, module: isinstance(module, nn.Conv2d),
    "narrow": _narrow,
}

# Schedule study: NetBooster variants, each changing one thing from the defaults of the main table.
# The "default" rows are the main table's netbooster runs of the same seeds and PLT window when boost.jsonl has
# them (the runs are deterministic: same config, same seed, same numbers), else they are run here.
STUDY: dict[str, dict[str, Any]] = {
    "default": {},
    "late PLT (0.5-0.8, the default before the 4-epoch study)": {"plt_start": 0.5, "plt_end": 0.8},
    "long giant (PLT 0.7-0.95)": {"plt_start": 0.7, "plt_end": 0.95},
    "ratio 2": {"ratio": 2.0},
    "conv layers only": {"layers": "conv"},
    "abrupt PLT (0.75-0.8)": {"plt_start": 0.75, "plt_end": 0.8},
    "depth 2": {"depth": 2},
}


class StepCPUTime(Transform):
    """Measures the CPU time of this thread's training steps, evaluations left out: a model transform that
    changes nothing and reads ``time.thread_time()`` at each step's start. An interval that spans an epoch's
    end (it holds the evaluation) is not counted, so ``seconds`` is the mean counted step times the steps."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.last: float | None = None
        self.counted: list[float] = []
        self.total_steps = 0

    def on_step_start(self, model: nn.Module, step: int, total_steps: int) -> nn.Module:
        now = time.thread_time()
        if self.last is not None and step % self.steps_per_epoch:
            self.counted.append(now - self.last)
        self.last, self.total_steps = now, total_steps
        return model

    @property
    def seconds(self) -> float:
        return statistics.mean(self.counted) * self.total_steps


class ExpandOnly(Transform):
    """A model transform that only expands: the KD teacher is the giant trained normally."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def before_training(self, model: nn.Module) -> nn.Module:
        return expand(model, **self.kwargs)


_TRAIN_SUBSETS: dict[str, torch.utils.data.TensorDataset] = {}


def train_accuracy(model: nn.Module, config: TrainConfig) -> float:
    """Accuracy in eval mode on the first ``TRAIN_EVAL`` training examples (how well the model fits)."""
    if config.dataset not in _TRAIN_SUBSETS:
        images, labels = data.get_dataset(config.dataset, root=config.data_dir, seed=config.seed).train.tensors
        _TRAIN_SUBSETS[config.dataset] = torch.utils.data.TensorDataset(images[:TRAIN_EVAL], labels[:TRAIN_EVAL])
    subset = _TRAIN_SUBSETS[config.dataset]
    shape = tuple(subset.tensors[0].shape[1:])
    adapter = data.Adapter(shape, models.input_shape(config.model, shape))
    device = next(model.parameters()).device
    return evaluate(model, subset, adapter, 1000, device)["acc"]


def boost_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Expansion arguments (ratio, depth, layers) of a settings dict."""
    return {"ratio": settings["ratio"], "depth": settings["depth"], "layers": LAYERS[settings["layers"]]}


def run_one(config: TrainConfig, method: str, settings: dict[str, Any], done: dict[tuple, dict]) -> dict[str, Any]:
    """One pre-training run; returns its metrics, training wall time (without evaluations) and cost."""
    in_shape = tuple(models.input_shape(config.model, (1, 28, 28)))
    extra: dict[str, Any] = {}
    clock = StepCPUTime(config.max_steps_per_epoch)
    if method in ("vanilla", "reference"):
        result = fit(config, Hooks(transforms=[clock]))
        wall, cpu = result.metrics["wall"], clock.seconds
    elif method in ("netbooster", "linear", "netbooster_base"):
        transform = BoostTransform(**boost_kwargs(settings), plt_start=settings["plt_start"],
                                   plt_end=settings["plt_end"], linear=method == "linear", verbose=False)
        gradients = base_supervision(settings["base_weight"]) if method == "netbooster_base" else AutogradGradients
        # the clock also counts the contraction
        result = fit(config, Hooks(gradients=gradients, transforms=[transform, clock]))
        wall, cpu = result.metrics["wall"], clock.seconds
        giant = expand(models.get_model(config.model, num_classes=10, in_shape=in_shape), **boost_kwargs(settings))
        extra.update(contracted_at_step=transform.contracted_at, giant_macs=count_macs(giant, in_shape),
                     giant_params=count_params(giant), plt=[settings["plt_start"], settings["plt_end"]])
        if method == "netbooster_base":
            extra["base_weight"] = settings["base_weight"]
    elif method == "vanilla_wall":
        vanilla, boosted = done[(config.model, "vanilla", config.seed)], done[(config.model, "netbooster", config.seed)]
        scale = boosted["train_cpu_s"] / vanilla["train_cpu_s"]
        total = round(config.epochs * config.max_steps_per_epoch * scale)
        epochs = math.ceil(total / (FULL_EPOCH // config.batch_size))
        config = replace(config, epochs=epochs, max_steps_per_epoch=round(total / epochs))
        clock = StepCPUTime(config.max_steps_per_epoch)
        result = fit(config, Hooks(transforms=[clock]))
        wall, cpu = result.metrics["wall"], clock.seconds
        extra["wall_scale"] = scale
    elif method == "kd":
        teacher_clock = StepCPUTime(config.max_steps_per_epoch)
        teacher = fit(replace(config, out=str(Path(config.out) / "teacher")),
                      Hooks(transforms=[ExpandOnly(**boost_kwargs(settings)), teacher_clock]))
        result = fit(config, Hooks(transforms=[clock], gradients=distillation(
            teacher.model, temperature=settings["kd_temperature"], alpha=settings["kd_alpha"])))
        wall, cpu = teacher.metrics["wall"] + result.metrics["wall"], teacher_clock.seconds + clock.seconds
        extra.update(teacher_test_acc=teacher.metrics["test_acc"],
                     teacher_train_acc=train_accuracy(teacher.model, config))
    else:
        raise ValueError(f"Unknown method {method!r}; choose from {list(METHODS)}")
    model = result.model
    return {
        "model": config.model, "method": method, "seed": config.seed, "test_acc": result.metrics["test_acc"],
        "val_acc": result.metrics["val_acc"], "train_acc": train_accuracy(model, config), "train_wall_s": wall,
        "train_cpu_s": cpu, "lr": config.lr,
        "steps": config.epochs * config.max_steps_per_epoch, "params": count_params(model),
        "macs": count_macs(model, in_shape), "out": config.out, **extra,
    }


def labelled_subset(name: str, per_class: int) -> str:
    """Register (once) dataset ``name`` with only ``per_class`` training examples of each class, drawn with the
    split's seed (so every method of a seed fine-tunes on the same examples); val and test are unchanged.
    Returns the registered name, ``{name}-{per_class}pc``."""
    subset = f"{name}-{per_class}pc"
    if subset in data.list_datasets():
        return subset

    def loader(*, root: str | None = None, download: bool = False, seed: int = 0) -> data.Splits:
        splits = data.get_dataset(name, root=root, download=download, seed=seed)
        images, labels = splits.train.tensors
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        picks = [order[labels[order] == c][:per_class] for c in range(splits.num_classes)]
        short = [c for c, p in enumerate(picks) if len(p) < per_class]
        if short:
            raise ValueError(f"{name} has fewer than {per_class} training examples of classes {short}; "
                             "lower --transfer-labels")
        keep = torch.cat(picks)
        return replace(splits, name=subset, train=torch.utils.data.TensorDataset(images[keep], labels[keep]))

    data.register_dataset(subset)(loader)
    return subset


def _head_prefix(model: nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + "."


def _convs_before_batchnorm(model: nn.Module) -> list[nn.Conv2d]:
    """Convolutions whose next module (in definition order) is a BatchNorm: their output's scale does not matter."""
    modules = list(model.modules())
    return [m for m, after in itertools.pairwise(modules)
            if isinstance(m, nn.Conv2d) and isinstance(after, nn.BatchNorm2d)]


@torch.no_grad()
def rescale_filters(model: nn.Module, norms: list[torch.Tensor]) -> None:
    """Scale each convolution that feeds a BatchNorm (weight and bias alike) to the matching norm of ``norms``."""
    for conv, norm in zip(_convs_before_batchnorm(model), norms, strict=True):
        factor = norm / conv.weight.norm()
        conv.weight.mul_(factor)
        if conv.bias is not None:
            conv.bias.mul_(factor)


def run_transfer(config: TrainConfig, source: str | None, rescale: bool = False) -> dict[str, Any]:
    """Fine-tune a pre-trained tiny model (all weights but the classifier) or one from scratch.

    ``rescale``: scale each pre-trained convolution that feeds a BatchNorm back to the norm of its fresh
    initialisation. Train-mode BatchNorm makes this exact for the network's function (``BN(a W x) = BN(W x)``,
    a > 0), but it undoes what pre-training did to the filters' effective learning rate: an AdamW step turns a
    filter by about ``lr sqrt(numel) / ||W||``, so a filter that grew k-fold fine-tunes as if at ``lr / k``
    (``benchmarks/boost_finetune_probe.py`` measures the growth)."""
    init = None
    if source is not None:
        state = load_checkpoint(Path(source) / "model.pt")["model"]

        def init(model: nn.Module, _: torch.Tensor) -> None:
            head = _head_prefix(model)
            fresh = [conv.weight.detach().norm() for conv in _convs_before_batchnorm(model)] if rescale else []
            missing, unexpected = model.load_state_dict(
                {k: v for k, v in state.items() if not k.startswith(head)}, strict=False)
            if unexpected or any(not k.startswith(head) for k in missing):
                raise RuntimeError(f"pre-trained weights do not fit: missing {missing}, unexpected {unexpected}")
            if rescale:
                rescale_filters(model, fresh)

    result = fit(config, Hooks(init=init))
    return {"test_acc": result.metrics["test_acc"], "val_acc": result.metrics["val_acc"],
            "train_wall_s": result.metrics["wall"], "lr": config.lr, "rescaled": rescale and source is not None}


# ---- statistics and tables ---------------------------------------------------------------------------------
def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """Mean of ``a[s] - b[s]`` over common seeds (in points) and its 95% t-interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [100 * (a[s] - b[s]) for s in seeds]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan, math.nan, len(diffs)
    mean = statistics.mean(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half, len(diffs)


def _by_seed(rows: list[dict[str, Any]], key: str = "test_acc") -> dict[int, float]:
    """``key`` per seed: the mean over a seed's rows (its fine-tuning repeats; a pre-training has one row)."""
    seeds = dict.fromkeys(r["seed"] for r in rows)
    return {s: statistics.mean(r[key] for r in rows if r["seed"] == s) for s in seeds}


def _group(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["model"], row["method"], row.get("variant", "")


def tables(records: list[dict[str, Any]], header: str) -> str:
    pre = [r for r in records if r.get("kind") == "pretrain"]
    lines = [header, "", "| model | method | test acc (%) | val acc (%) | train acc (%) | steps | train wall (s) | "
             "train CPU (s) | params | MACs |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups = dict.fromkeys(_group(r) for r in pre)
    for model, method, variant in groups:
        rows = [r for r in pre if _group(r) == (model, method, variant)]
        name = f"{method}{' ' + variant if variant else ''}"
        test, train = mean_std([r["test_acc"] for r in rows], 100), mean_std([r["train_acc"] for r in rows], 100)
        val = mean_std([r["val_acc"] for r in rows], 100)
        steps, wall = statistics.mean(r["steps"] for r in rows), mean_std([r["train_wall_s"] for r in rows], digits=1)
        cpu = mean_std([r["train_cpu_s"] for r in rows], digits=1) if all("train_cpu_s" in r for r in rows) else "-"
        lines.append(f"| {model} | {name} | {test} | {val} | {train} | {steps:.0f} | {wall} | {cpu} | "
                     f"{rows[0]['params']:,} | {rows[0]['macs']:,} |")
    lines += ["", "Paired differences in test accuracy (points, mean and 95% t-interval over seeds):", "",
              "| model | comparison | difference | 95% interval | seeds |", "| --- | --- | --- | --- | --- |"]
    for model, method, variant in groups:
        if method == "vanilla" and not variant:
            continue
        base = "vanilla" if method != "vanilla" else None
        comparisons = [(base, "")] if base else []
        if method in ("vanilla_wall", "kd", "linear", "netbooster_base"):
            comparisons.append(("netbooster", ""))
        if method == "netbooster_base":  # and the equal-wall-clock vanilla and KD, where they ran
            comparisons += [(m, "") for m in ("linear", "vanilla_wall", "kd") if (model, m, "") in groups]
        if variant.endswith(" epochs"):  # learning curve: each budget against NetBooster at --epochs
            comparisons = [("netbooster", "")]
        elif variant:  # schedule study: each variant against the default schedule
            comparisons = [] if variant == "default" else [("netbooster", "default")]
        for other, other_variant in comparisons:
            mine = _by_seed([r for r in pre if _group(r) == (model, method, variant)])
            theirs = _by_seed([r for r in pre if _group(r) == (model, other, other_variant)])
            mean, low, high, n = paired(mine, theirs)
            name = f"{method}{' ' + variant if variant else ''}"
            other_name = f"{other}{' ' + other_variant if other_variant else ''}"
            lines.append(f"| {model} | {name} − {other_name} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {n} |")
    for kind, title in (("transfer", "fine-tuned on the transfer set"),
                        ("transfer_low", "fine-tuned on a few labels per class of the transfer set")):
        transfer = [r for r in records if r.get("kind") == kind]
        if not transfer:
            continue
        labels = f" ({transfer[0]['labels_per_class']} per class)" if kind == "transfer_low" else ""
        lines += ["", f"Downstream: {title}{labels} (pre-training method as rows):", "",
                  "| model | pre-training | test acc (%) | − vanilla pre-training (points, 95% interval) |",
                  "| --- | --- | --- | --- |"]
        for model in dict.fromkeys(r["model"] for r in transfer):
                rows_of = {m: [r for r in transfer if r["model"] == model and r["method"] == m]
                           for m in ("scratch", *PRETRAINED)}
                for method, rows in rows_of.items():
                    if not rows:
                        continue
                    per_seed = _by_seed(rows)
                    mean, low, high, n = paired(per_seed, _by_seed(rows_of["vanilla"]))
                    repeats = min(sum(r["seed"] == s for r in rows) for s in per_seed)
                    times = f" × {repeats} fine-tunings" if repeats > 1 else ""
                    diff = "" if method == "vanilla" else f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] ({n} seeds{times})"
                    lines.append(f"| {model} | {method} | {mean_std(list(per_seed.values()), 100)} | {diff} |")
    return "\n".join(lines)


# ---- cost: giant vs tiny step time, in turns -----------------------------------------------------------
def measure_cost(model_names: list[str], settings: dict[str, Any], batch: int, rounds: int) -> list[dict[str, Any]]:
    """Median training-step time (forward, backward, AdamW; the thread's CPU time, which other jobs' load does not
    inflate as it does wall time) of tiny and giant, timed in turns, and the giant's
    CPU time by operator (``torch.profiler``)."""
    rows = []
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for name in model_names:
        shape = models.input_shape(name, (1, 28, 28))
        tiny = models.get_model(name, num_classes=10, in_shape=shape)
        giant = expand(tiny, **boost_kwargs(settings))
        contenders = {"tiny": tiny, "giant": giant,
                      "tiny channels_last": copy.deepcopy(tiny).to(memory_format=torch.channels_last),
                      "giant channels_last": copy.deepcopy(giant).to(memory_format=torch.channels_last)}
        optimizers = {k: torch.optim.AdamW(m.parameters()) for k, m in contenders.items()}

        def step(key: str, contenders: dict[str, nn.Module] = contenders,
                 optimizers: dict[str, torch.optim.Optimizer] = optimizers) -> None:
            inputs = x.contiguous(memory_format=torch.channels_last) if "channels_last" in key else x
            loss = nn.functional.cross_entropy(contenders[key](inputs), y)
            optimizers[key].zero_grad()
            loss.backward()
            optimizers[key].step()

        times: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(rounds + 1):  # the first round warms up
            for key in contenders:
                start = time.thread_time()
                for _ in range(3):
                    step(key)
                if r:
                    times[key].append((time.thread_time() - start) / 3)
        with torch.profiler.profile() as prof:
            for _ in range(3):
                step("giant")
        by_op: dict[str, float] = {}
        for event in prof.key_averages():
            by_op[event.key] = by_op.get(event.key, 0.0) + event.self_cpu_time_total
        total = sum(by_op.values())
        top = {k: v / total for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:6]}
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        mac_ratio = count_macs(giant, shape) / count_macs(tiny, shape)
        rows.append({"model": name, "ms": ms, "mac_ratio": mac_ratio, "time_ratio": ms["giant"] / ms["tiny"],
                     "time_ratio_channels_last": ms["giant channels_last"] / ms["tiny channels_last"],
                     "giant_cpu_share_by_op": top, "batch": batch, "rounds": rounds, "ratio": settings["ratio"],
                     "depth": settings["depth"], "layers": settings["layers"]})
    return rows


def cost_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | tiny ms/step | giant ms/step | giant/tiny | MAC ratio | (giant/tiny) / MAC ratio | "
             "channels_last giant/tiny | giant CPU time by op |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ops = ", ".join(f"{k.removeprefix('aten::')} {100 * v:.0f}%" for k, v in r["giant_cpu_share_by_op"].items())
        lines.append(f"| {r['model']} | {r['ms']['tiny']:.1f} | {r['ms']['giant']:.1f} | {r['time_ratio']:.2f} | "
                     f"{r['mac_ratio']:.2f} | {r['time_ratio'] / r['mac_ratio']:.2f} | "
                     f"{r['time_ratio_channels_last']:.2f} | {ops} |")
    return "\n".join(lines)


# ---- driver --------------------------------------------------------------------------------------------
def log_rows(results: Path, tag: str) -> list[dict[str, Any]]:
    """The rows of ``boost{tag}.jsonl`` in ``results``, one finished run each."""
    return [json.loads(line) for line in (results / f"boost{tag}.jsonl").read_text().splitlines()]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tinycnn"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reference", default="cnn", help="the large model of the 'reference' rows")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--transfer", default="digits", help="fine-tuning data set ('' to skip)")
    p.add_argument("--transfer-epochs", type=int, default=10)
    p.add_argument("--transfer-rescale", action="store_true",
                   help="scale pre-trained convolutions that feed a BatchNorm back to their initial norm first")
    p.add_argument("--pretrained", default=None, metavar="TAG",
                   help="fine-tune the pre-trained networks of tag TAG (same --runs) instead of pre-training anew")
    p.add_argument("--transfer-lr", type=float, default=None,
                   help="fine-tuning learning rate (default: --lr); pre-training at a tuned rate needs its own")
    p.add_argument("--transfer-batch-size", type=int, default=64)
    p.add_argument("--transfer-labels", type=int, default=10,
                   help="labels per class of the low-label fine-tuning protocol (0 to skip it)")
    p.add_argument("--transfer-labels-batch-size", type=int, default=32)
    p.add_argument("--transfer-repeats", type=int, default=1,
                   help="fine-tunings of each pre-trained model (seeds s, s+100, ...), averaged per seed")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of an epoch (at most one pass)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of a run (--steps each)")
    p.add_argument("--curve", nargs="*", type=int, default=[],
                   help="also train vanilla for these numbers of epochs (a learning curve: where it plateaus)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--layers", default="narrow", choices=sorted(LAYERS))
    p.add_argument("--plt-start", type=float, default=0.2)
    p.add_argument("--plt-end", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--kd-alpha", type=float, default=0.9)
    p.add_argument("--base-weight", type=float, default=1.0,
                   help="netbooster_base: weight of the giant's loss at the current PLT slope")
    p.add_argument("--study", action="store_true", help="NetBooster schedule variants instead of the baselines")
    p.add_argument("--cost", action="store_true", help="only time the giant's step against the tiny one's")
    p.add_argument("--cost-rounds", type=int, default=10)
    p.add_argument("--runs", default="runs/bench_boost", help="folder for the runs' checkpoints")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--include", nargs="*", default=[],
                   help="also count and tabulate the runs of these tags' logs (a vanilla run of another budget "
                        "becomes the learning-curve row 'N epochs')")
    p.add_argument("--tag", default="", help="suffix of the result files (boost{tag}.jsonl/.md/.json)")
    return p


def main(argv: list[str]) -> None:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("ratio", "depth", "layers", "plt_start", "plt_end",
                                               "kd_temperature", "kd_alpha", "base_weight")}
    command = "python benchmarks/boost.py " + " ".join(argv)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu, 1 thread"}
    if args.cost:
        rows = measure_cost(args.models, settings, args.batch_size, args.cost_rounds)
        text = (f"Giant vs tiny training step (thread CPU time), batch {args.batch_size}, CPU 1 thread, in turns.\n"
                f"Command: {command}\n\n")
        text += cost_table(rows)
        print(text)
        (out / f"boost{args.tag}.md").write_text(text + "\n")
        (out / f"boost{args.tag}.json").write_text(
            json.dumps({"command": command, "environment": env, "rows": rows}, indent=1))
        return
    log = out / f"boost{args.tag}.jsonl"
    records = log_rows(out, args.tag) if log.exists() else []
    if args.pretrained is not None:  # another tag's pre-trained networks (same --runs), not their fine-tunings
        records += [row for row in log_rows(out, args.pretrained) if row["kind"] == "pretrain"]
    for tag in args.include:  # e.g. per-seed logs run in parallel: their runs count as done here
        for row in log_rows(out, tag):
            if (row["kind"] == "pretrain" and row["method"] == "vanilla" and not row["variant"]
                    and row["steps"] != args.steps * args.epochs):  # another budget: a learning-curve row
                row["variant"] = f"{row['steps'] // args.steps} epochs"
            records.append(row)
    seen = {(r["kind"], r["model"], r["method"], r.get("variant", ""), r["seed"], r.get("repeat", 0))
            for r in records}
    done = {(r["model"], r["method"], r["seed"]): r for r in records
            if r["kind"] == "pretrain" and not r.get("variant")}

    main_log = out / "boost.jsonl"
    main_boost = {(r["model"], r["seed"]): r for r in log_rows(out, "")
                  if r["kind"] == "pretrain" and r["method"] == "netbooster" and not r["variant"]
                  and r["steps"] == args.steps * args.epochs and r.get("plt") == [args.plt_start, args.plt_end]
                  } if args.study and main_log.exists() else {}

    def record(row: dict[str, Any]) -> None:
        records.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "out"}), flush=True)

    if args.steps > FULL_EPOCH // args.batch_size:
        raise SystemExit(f"--steps {args.steps} exceeds one pass over the data ({FULL_EPOCH // args.batch_size} "
                         f"steps of batch {args.batch_size}); lower --steps or --batch-size")
    if args.transfer_repeats < 1 or (args.transfer_repeats > 1 and max(args.seeds) >= 100):
        raise SystemExit(f"--transfer-repeats {args.transfer_repeats} with seeds {args.seeds}: repeats must be >= 1, "
                         "and with more than one the seeds must be below 100 (repeat r fine-tunes with seed s + 100 r)")
    steps_per_epoch = args.steps
    base = TrainConfig(dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device="cpu",
                       data_dir=args.data_dir, max_steps_per_epoch=steps_per_epoch, progress=False,
                       overwrite=True)  # a run killed before its record was appended is redone
    tbase = replace(base, dataset=args.transfer or "digits", epochs=args.transfer_epochs, max_steps_per_epoch=None,
                    data_dir=None, batch_size=args.transfer_batch_size,
                    lr=args.lr if args.transfer_lr is None else args.transfer_lr)
    protocols = [("transfer", tbase)] if args.transfer else []
    if args.transfer and args.transfer_labels:
        # as many steps as the full protocol: the comparison changes the labels, not the fine-tuning length
        full_steps = args.transfer_epochs * (len(data.get_dataset(args.transfer).train) // args.transfer_batch_size)
        low = labelled_subset(args.transfer, args.transfer_labels)
        low_steps = len(data.get_dataset(low).train) // args.transfer_labels_batch_size
        if low_steps == 0:
            raise SystemExit(f"--transfer-labels-batch-size {args.transfer_labels_batch_size} exceeds the "
                             f"{args.transfer_labels} x classes examples; lower it")
        protocols.append(("transfer_low", replace(tbase, dataset=low, batch_size=args.transfer_labels_batch_size,
                                                  epochs=math.ceil(full_steps / low_steps))))
    runs = Path(args.runs)
    for seed in args.seeds:
        for model in args.models:
            if args.study:
                plan = [("netbooster", name, variant) for name, variant in STUDY.items()]
            else:
                plan = [(m, "", {}) for m in args.methods]
                # learning curve: vanilla at other budgets (e.g. to find where it plateaus), variant "N epochs"
                plan += [("vanilla", f"{e} epochs", {"epochs": e}) for e in args.curve if e != args.epochs]
            for method, variant, change in plan:
                name = args.reference if method == "reference" else model
                if ("pretrain", name, method, variant, seed, 0) in seen:
                    continue
                if variant == "default" and (model, seed) in main_boost:
                    record({**main_boost[(model, seed)], "variant": variant})
                    continue
                short = "-".join(variant.split(" ")[:2 if "epochs" in change else 1]) if variant else ""
                folder = runs / f"{args.tag or 'main'}-{name}-{method}-{short}-{seed}"
                config = replace(base, model=name, seed=seed, out=str(folder), epochs=change.get("epochs", base.epochs))
                row = run_one(config, method, {**settings, **change}, done)
                row.update(kind="pretrain", variant=variant)
                record(row)
                if not variant:
                    done[(name, method, seed)] = row
            for (kind, tconfig), repeat in itertools.product([] if args.study else protocols,
                                                            range(args.transfer_repeats)):
                for method in ("scratch", *PRETRAINED):
                    source = None if method == "scratch" else done.get((model, method, seed), {}).get("out")
                    if (kind, model, method, "", seed, repeat) in seen or (method != "scratch" and source is None):
                        continue
                    row = run_transfer(replace(tconfig, model=model, seed=seed + 100 * repeat), source,
                                       rescale=args.transfer_rescale)
                    if kind == "transfer_low":
                        row.update(labels_per_class=args.transfer_labels, epochs=tconfig.epochs)
                    record({"kind": kind, "model": model, "method": method, "variant": "", "seed": seed,
                            "repeat": repeat, **row})
    header = (
        f"NetBooster on {args.dataset}: {args.epochs} epoch(s) of {args.steps} steps, batch "
        f"{args.batch_size}, AdamW lr {args.lr} cosine, seeds {args.seeds}; ratio {args.ratio}, depth {args.depth}, "
        f"layers '{args.layers}', PLT {args.plt_start}-{args.plt_end}; KD T={args.kd_temperature}, "
        f"alpha={args.kd_alpha}; transfer: {args.transfer or 'none'} ({args.transfer_epochs} epochs, lr {tbase.lr}, "
        f"batch {args.transfer_batch_size}; low-label: {args.transfer_labels} per class, batch "
        f"{args.transfer_labels_batch_size}, as many steps; {args.transfer_repeats} fine-tuning(s) per pre-trained "
        f"model{'; convolutions rescaled to their initial norm first' if args.transfer_rescale else ''}"
        f"{'; pre-trained networks of tag ' + args.pretrained if args.pretrained is not None else ''}). "
        f"CPU, one thread; training wall of all runs "
        f"{sum(r['train_wall_s'] for r in records):.0f}s.\n"
        f"Command: {command}"
    )
    text = tables(records, header)
    print(text)
    (out / f"boost{args.tag}.md").write_text(text + "\n")
    (out / f"boost{args.tag}.json").write_text(json.dumps(
        {"command": command, "args": vars(args), "environment": env, "records": records}, indent=1))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
