"""The one training loop: data, model, hooks, optimizer, logging, evaluation, checkpoints, resume."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import data, models
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, lr_at
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    check_divisible,
    init_distributed,
    rank_range,
    shard,
)
from .hooks import GradientMaker, Hooks, unwrap
from .run_folder import MetricsLog, check_fresh_start, clear_run_files
from .syncbn import synchronised_view


class NonFiniteLossError(FloatingPointError):
    """The training loss (or an evaluation) became NaN or infinite."""


@dataclass
class RunResult:
    """What :func:`fit` returns: the final model and its metrics (``is_main``: this is rank 0)."""

    model: nn.Module
    metrics: dict[str, float]
    out: Path | None
    is_main: bool = True


def pick_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer named by ``config.optimizer`` over all of ``model``'s parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: torch.utils.data.TensorDataset,
    adapter: nn.Module,
    batch_size: int,
    device: torch.device,
    *,
    dist: DistInfo | None = None,
    bar: tqdm | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``dataset``.

    With ``dist`` (inside ``torchrun``) every rank evaluates its share of the examples and the sums are
    all-reduced, so all ranks return the metrics of the whole set. ``bar`` is advanced once per example.
    """
    was_training = model.training
    model.eval()
    images, labels = dataset.tensors
    share = rank_range(len(labels), dist) if dist is not None and dist.enabled else range(len(labels))
    loss_sum, correct = 0.0, 0
    for start in range(share.start, share.stop, batch_size):
        stop = min(start + batch_size, share.stop)
        x = adapter(images[start:stop].to(device))
        y = labels[start:stop].to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        if bar is not None:
            bar.update(len(y))
    model.train(was_training)
    if dist is not None and dist.enabled:
        loss_sum, correct = all_reduce_sum([loss_sum, correct], device)
    return {"loss": loss_sum / len(labels), "acc": correct / len(labels)}


class _Run:
    """Mutable state of one run: the model may be replaced by a transform, which rebuilds what depends on it."""

    def __init__(self, config: TrainConfig, hooks: Hooks, device: torch.device, dist: DistInfo) -> None:
        self.config, self.hooks, self.device, self.dist = config, hooks, device, dist
        self.loss_fn = nn.CrossEntropyLoss()
        self.model: nn.Module = nn.Identity()
        self.wrapped: nn.Module = self.model
        self.optimizer: torch.optim.Optimizer | None = None
        self.maker: GradientMaker | None = None

    def attach(self, model: nn.Module) -> None:
        """Train ``model`` from now on: wrap it for DDP (with synchronised BatchNorm unless turned off) and
        ``torch.compile``, build a fresh optimizer and gradient maker."""
        self.model = model.to(self.device)
        self.wrapped = self.model
        if self.dist.enabled:
            trained = synchronised_view(self.model, self.device) if self.config.sync_batchnorm else self.model
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(trained, device_ids=device_ids)
        if self.config.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.optimizer = make_optimizer(self.config, self.model)
        self.maker = self.hooks.gradients(self.wrapped, self.loss_fn)

    def replace_if_changed(self, model: nn.Module) -> None:
        if model is not self.model:
            self.attach(model)

    def train_mode(self) -> None:
        self.model.train()
        self.wrapped.train()


@dataclass
class _Progress:
    """Where the run is: completed epochs, global step, batches done in the current epoch and its sums."""

    epoch: int = 0
    step: int = 0
    batch: int = 0
    elapsed: float = 0.0
    loss: float = math.nan
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss * n, correct, n


class _Display:
    """What the user sees: nothing (``progress=False``), one bar for the whole run (``one_line``, as in
    ``demo`` and ``bench``), or the start-up summary, a bar per epoch and evaluation, and a line per epoch."""

    def __init__(self, config: TrainConfig, dist: DistInfo, one_line: str | None) -> None:
        self.enabled = config.progress and dist.is_main
        self.one_line = one_line
        self.run_bar: tqdm | None = None

    def say(self, text: str) -> None:
        if self.enabled and self.one_line is None:
            tqdm.write(text)

    def start_run(self, total_steps: int, done: int) -> None:
        if self.enabled and self.one_line is not None:
            self.run_bar = tqdm(total=total_steps, initial=done, desc=self.one_line, unit="step", dynamic_ncols=True)

    def epoch_bar(self, epoch: int, epochs: int, steps: int, done: int) -> tqdm:
        if self.run_bar is not None:
            return self.run_bar
        return tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
                    disable=not self.enabled, dynamic_ncols=True)

    def end_epoch_bar(self, bar: tqdm) -> None:
        if bar is not self.run_bar:
            bar.close()

    def eval_bar(self, total: int) -> tqdm:
        return tqdm(total=total, desc="evaluate", unit="img", leave=False,
                    disable=not self.enabled or self.one_line is not None, dynamic_ncols=True)

    def close(self, metrics: dict[str, float]) -> None:
        if self.run_bar is not None:
            self.run_bar.set_postfix(test_acc=f"{metrics.get('test_acc', math.nan):.4f}", refresh=False)
            self.run_bar.close()


def fit(config: TrainConfig, hooks: Hooks | None = None, *, one_line: str | None = None) -> RunResult:
    """Train ``config.model`` on ``config.dataset`` and return the final model and its metrics.

    Writes ``metrics.jsonl`` (a ``config`` record, then one JSON record per step and per epoch, with wall
    time), ``last.pt`` (an atomic checkpoint after every epoch and every ``save_every_steps`` steps, the resume
    point; only when the run's evaluation is finite) and ``model.pt`` (the final model) into ``config.out``
    when it is set. A used ``config.out`` is refused unless ``config.resume`` or ``config.overwrite``.

    Args:
        config: the run.
        hooks: the parts attached to the loop (plain training if None).
        one_line: show a single progress bar with this label for the whole run (no summary, no epoch lines).
    """
    hooks = hooks or Hooks()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    if config.amp and device.type != "cuda":
        raise ValueError("--amp (bfloat16 mixed precision) needs a CUDA device; drop --amp on CPU")
    dist = init_distributed(device)
    check_divisible(config.batch_size, dist)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    out = Path(config.out) if config.out else None
    checkpoint_path = out / "last.pt" if out else None
    if config.tensorboard and out is None:
        raise ValueError("--tensorboard writes its events into the run folder: add --out DIR")
    resuming = _resuming(config, checkpoint_path)
    if out is not None and not resuming:
        check_fresh_start(out, overwrite=config.overwrite or config.auto_resume)
        barrier()  # every rank has looked at the folder before rank 0 clears it
        if dist.is_main:
            clear_run_files(out)
    barrier()
    display = _Display(config, dist, one_line)

    # data and model
    display.say(f"loading {config.dataset} ...")
    load_start = time.perf_counter()
    splits = data.get_dataset(config.dataset, root=config.data_dir, download=config.download, seed=config.seed,
                              progress=display.enabled)
    if config.classes:
        splits = data.select_classes(splits, data.parse_classes(config.classes))
    load_seconds = time.perf_counter() - load_start
    model_shape = models.input_shape(config.model, splits.in_shape)
    adapter = data.Adapter(splits.in_shape, model_shape)
    train_x, train_y = (t.to(device) for t in splits.train.tensors)
    steps_per_epoch = len(train_y) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch size {config.batch_size} exceeds the {len(train_y)} training examples; lower --batch-size"
        )
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    model = models.get_model(config.model, num_classes=splits.num_classes, in_shape=model_shape).to(device)
    example = adapter(train_x[: config.batch_size])
    if hooks.init is not None:
        display.say("initialising the model's parameters ...")
        hooks.init(model, example)
    for transform in hooks.transforms:
        transformed = transform.before_training(model)
        if transformed is not model and hooks.init is not None:
            hooks.init(transformed.to(device), example)  # a new architecture (e.g. a boosted giant) gets its own
        model = transformed
    run = _Run(config, hooks, device, dist)
    run.attach(model)

    # resume, or start a fresh log
    at = _Progress()
    log = MetricsLog(out / "metrics.jsonl" if out and dist.is_main else None, tensorboard=config.tensorboard)
    if resuming:
        state = load_checkpoint(checkpoint_path, map_location=device)
        changed = _check_compatible(state, config, checkpoint_path)
        for transform, t_state in zip(hooks.transforms, state["transforms"], strict=True):
            transform.load_state_dict(t_state)
            run.replace_if_changed(transform.rebuild(run.model))
        _load_states(run, state, checkpoint_path)
        at = _Progress(state["epoch"], state["step"], state.get("batch", 0), state["elapsed"], state["loss"],
                       list(state.get("sums", [0.0, 0.0, 0.0])))
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
        log.truncate(at.step, at.epoch)
        log.write(kind="resume", step=at.step, epoch=at.epoch, changed=changed)
        display.say(f"resuming {out} at step {at.step} (epoch {at.epoch + 1}, batch {at.batch})"
                    + (f"; changed: {_describe_changes(changed)}" if changed else ""))
    else:
        log.write(kind="config", step=0, epoch=0, config=asdict(config))
    display.say(_summary(config, hooks, splits, run, device, dist, steps_per_epoch, total_steps, load_seconds))
    display.start_run(total_steps, at.step)

    metrics: dict[str, float] = {}
    last_good = f"{checkpoint_path} (epoch {at.epoch}, step {at.step})" if resuming else "none yet"
    try:
        for epoch in range(at.epoch, config.epochs):
            base, epoch_start = at.elapsed, time.perf_counter()  # wall time counts training steps only
            order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(config.seed * 10007 + epoch))
            run.train_mode()
            bar = display.epoch_bar(epoch + 1, config.epochs, steps_per_epoch, at.batch)
            for i in range(at.batch, steps_per_epoch):
                step_start = time.perf_counter()
                for transform in hooks.transforms:
                    run.replace_if_changed(transform.on_step_start(run.model, at.step, total_steps))
                lr = lr_at(at.step, total_steps, base_lr=config.lr, warmup_steps=config.warmup_steps,
                           schedule=config.schedule)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                # forward, backward (plain or preconditioned), step
                index = shard(order[i * config.batch_size : (i + 1) * config.batch_size], dist).to(device)
                x, y = adapter(train_x[index]), train_y[index]
                run.optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                    loss, logits = run.maker.forward_backward(x, y)
                loss_value = loss.item()
                if dist.enabled:  # the global batch's loss: a NaN on one rank stops every rank, none waits alone
                    loss_total, count = all_reduce_sum([loss_value * len(y), float(len(y))], device)
                    loss_value = loss_total / count
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss became {loss_value} at step {at.step} (epoch {epoch + 1}); last finite loss was "
                        f"{at.loss:.4g}; the kept checkpoint is {last_good}: "
                        + _nan_fix(config, out)
                    )
                run.optimizer.step()
                # log
                at.loss = loss_value
                at.sums[0] += loss_value * len(y)
                at.sums[1] += (logits.argmax(1) == y).sum().item()
                at.sums[2] += len(y)
                step_time = time.perf_counter() - step_start
                log.write(kind="step", step=at.step, epoch=epoch + 1, loss=loss_value, lr=lr,
                          ms_per_step=1e3 * step_time, wall=base + time.perf_counter() - epoch_start)
                at.step += 1
                at.batch = i + 1
                bar.update()
                bar.set_postfix(loss=f"{at.sums[0] / at.sums[2]:.4f}", acc=f"{at.sums[1] / at.sums[2]:.3f}",
                                img_s=f"{len(y) * dist.world_size / step_time:.0f}", refresh=False)
                if (config.save_every_steps and at.step % config.save_every_steps == 0
                        and at.batch < steps_per_epoch and checkpoint_path is not None):
                    at.elapsed = base + time.perf_counter() - epoch_start
                    check_start = time.perf_counter()
                    val = evaluate(run.model, splits.val, adapter, config.eval_batch_size, device, dist=dist)
                    if _finite(val.values()):
                        last_good = _save(run, at, checkpoint_path, dist, f"step {at.step}, val acc {val['acc']:.4f}")
                    epoch_start += time.perf_counter() - check_start
            display.end_epoch_bar(bar)

            # eval, log, checkpoint
            at.elapsed = base + time.perf_counter() - epoch_start
            loss_sum, correct, seen = all_reduce_sum(at.sums, device)
            metrics = _epoch_metrics(run, splits, adapter, loss_sum / seen, correct / seen, display)
            metrics.update(epoch=epoch + 1, step=at.step, wall=at.elapsed)
            log.write(kind="epoch", **metrics)
            display.say(_epoch_line(metrics, config.epochs))
            if not _finite(metrics.values()):
                raise NonFiniteLossError(
                    f"evaluation after epoch {epoch + 1} is not finite (val loss {metrics['val_loss']:.4g}); the "
                    f"kept checkpoint is {last_good}: " + _nan_fix(config, out)
                )
            at.epoch, at.batch, at.sums = epoch + 1, 0, [0.0, 0.0, 0.0]
            if checkpoint_path is not None:
                last_good = _save(run, at, checkpoint_path, dist, f"epoch {at.epoch}, val acc {metrics['val_acc']:.4f}")
            if bar is display.run_bar:
                bar.set_postfix(val_acc=f"{metrics['val_acc']:.3f}", refresh=False)

        # transforms that finish the model (e.g. contract a boosted giant), then the final model
        final = run.model
        for transform in hooks.transforms:
            final = transform.after_training(final)
        if final is not run.model or not metrics:
            run.replace_if_changed(final)
            metrics = {**metrics, **_epoch_metrics(run, splits, adapter, math.nan, math.nan, display)}
    finally:
        log.close()
    display.close(metrics)
    if out is not None and dist.is_main:
        save_checkpoint(
            {
                "model": unwrap(run.model).state_dict(),
                "model_name": config.model,
                "dataset": splits.name,
                "num_classes": splits.num_classes,
                "in_shape": list(model_shape),
                "config": asdict(config),
                "metrics": metrics,
            },
            out / "model.pt",
        )
        (out / "summary.json").write_text(json.dumps({"config": asdict(config), "metrics": metrics}, indent=2))
    return RunResult(unwrap(run.model), metrics, out, dist.is_main)


def _resuming(config: TrainConfig, checkpoint_path: Path | None) -> bool:
    if config.resume:
        if checkpoint_path is None:
            raise ValueError("--resume needs --out DIR, the folder of the run to continue")
        return True
    return config.auto_resume and checkpoint_path is not None and checkpoint_path.exists()


def _finite(values: Any) -> bool:
    return all(math.isfinite(v) for v in values if isinstance(v, float))


def _nan_fix(config: TrainConfig, out: Path | None) -> str:
    if out is None:
        return f"lower --lr (now {config.lr:g}) or raise --damping"
    return f"continue with a lower learning rate: quicktrain train --resume --out {out} --lr {config.lr / 10:g}"


def _save(run: _Run, at: _Progress, path: Path, dist: DistInfo, what: str) -> str:
    if dist.is_main:
        save_checkpoint(_checkpoint(run, at), path)
    return f"{path} ({what})"


def _summary(
    config: TrainConfig,
    hooks: Hooks,
    splits: data.Splits,
    run: _Run,
    device: torch.device,
    dist: DistInfo,
    steps_per_epoch: int,
    total_steps: int,
    load_seconds: float,
) -> str:
    params = sum(p.numel() for p in run.model.parameters())
    sizes = f"train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}"
    processes = f", {dist.world_size} processes" if dist.enabled else ""
    lines = [
        f"device {device}{processes}, {torch.get_num_threads()} CPU thread(s)",
        f"data   {splits.name}: {sizes} images of {'x'.join(map(str, splits.in_shape))}, "
        f"{splits.num_classes} classes (loaded in {load_seconds:.1f}s)",
        f"model  {config.model}: {params:,} parameters",
        f"steps  {config.epochs} epochs x {steps_per_epoch} steps = {total_steps} at batch {config.batch_size}; "
        f"{config.optimizer} lr {config.lr:g} ({config.schedule}, warm-up {config.warmup_steps})",
        *(f"part   {note}" for note in hooks.notes),
        f"out    {config.out or '(nothing saved: no --out)'}",
    ]
    return "\n".join(lines)


def _epoch_metrics(
    run: _Run, splits: data.Splits, adapter: nn.Module, train_loss: float, train_acc: float, display: _Display
) -> dict[str, float]:
    size, device, dist = run.config.eval_batch_size, run.device, run.dist
    with display.eval_bar(len(splits.val) + len(splits.test)) as bar:
        val = evaluate(run.model, splits.val, adapter, size, device, dist=dist, bar=bar)
        test = evaluate(run.model, splits.test, adapter, size, device, dist=dist, bar=bar)
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "test_loss": test["loss"],
        "test_acc": test["acc"],
    }


def _epoch_line(m: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
        f"val acc {m['val_acc']:.4f}  test acc {m['test_acc']:.4f}  wall {m['wall']:.1f}s"
    )


def _checkpoint(run: _Run, at: _Progress) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {
        "model": unwrap(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "gradients": run.maker.state_dict(),
        "transforms": [t.state_dict() for t in run.hooks.transforms],
        "epoch": at.epoch,
        "step": at.step,
        "batch": at.batch,
        "sums": list(at.sums),
        "elapsed": at.elapsed,
        "loss": at.loss,
        "config": asdict(run.config),
        "rng": rng,
    }


# Fields that may differ between the interrupted run and its resumption: bookkeeping, and the learning rate,
# which a user lowers after a divergence (the change is recorded in metrics.jsonl).
_BOOKKEEPING = {"resume", "auto_resume", "overwrite", "progress", "device", "threads", "out", "data_dir",
                "save_every_steps", "tensorboard", "eval_batch_size"}
_RECORDED_CHANGES = {"epochs", "lr"}
_RESUME_KEYS = ("optimizer", "gradients", "transforms", "epoch", "step", "elapsed", "loss", "rng")


def _check_compatible(state: dict[str, Any], config: TrainConfig, path: Path) -> dict[str, list[Any]]:
    """Raise if the checkpoint was written by another run; return the recorded changes ``{field: [old, new]}``."""
    saved = state.get("config")
    if not isinstance(saved, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a quicktrain training checkpoint (no config/model entries)")
    missing = [k for k in _RESUME_KEYS if k not in state]
    if missing:
        kind = "a final model file (model.pt)" if "metrics" in state else "not a resume checkpoint"
        raise CheckpointError(
            f"{path} is {kind}, without {', '.join(missing)}; resume from the run's last.pt, or start a new run"
        )
    current = asdict(config)
    ignored = _BOOKKEEPING | _RECORDED_CHANGES
    changed = {k: (saved.get(k), v) for k, v in current.items() if k not in ignored and saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(changed.items()))
        raise CheckpointError(
            f"{path} was written by a different run ({detail}); use the same settings (only --epochs and --lr may "
            "change on --resume) or a new --out"
        )
    return {k: [saved.get(k), current[k]] for k in sorted(_RECORDED_CHANGES) if saved.get(k) != current[k]}


def _describe_changes(changed: dict[str, list[Any]]) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())


def _load_states(run: _Run, state: dict[str, Any], path: Path) -> None:
    try:
        unwrap(run.model).load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.maker.load_state_dict(state["gradients"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path} does not match this model/optimizer ({error}); use a new --out") from error
