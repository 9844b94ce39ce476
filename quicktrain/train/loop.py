"""The one training loop: data, model, hooks, optimizer, logging, evaluation, checkpoints, resume."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import data, models
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, lr_at
from .distributed import DistInfo, init_distributed, shard
from .hooks import GradientMaker, Hooks, unwrap


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class RunResult:
    """What :func:`fit` returns: the final model and its metrics."""

    model: nn.Module
    metrics: dict[str, float]
    out: Path | None


def pick_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu")
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
    model: nn.Module, dataset: torch.utils.data.TensorDataset, adapter: nn.Module, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``dataset``."""
    was_training = model.training
    model.eval()
    images, labels = dataset.tensors
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = adapter(images[start : start + batch_size].to(device))
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
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
        """Train ``model`` from now on: wrap it for DDP (and ``torch.compile``), build a fresh optimizer and
        gradient maker."""
        self.model = model.to(self.device)
        self.wrapped = self.model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if self.config.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.optimizer = make_optimizer(self.config, self.model)
        self.maker = self.hooks.gradients(self.wrapped, self.loss_fn)

    def replace_if_changed(self, model: nn.Module) -> None:
        if model is not self.model:
            self.attach(model)


def fit(config: TrainConfig, hooks: Hooks | None = None) -> RunResult:
    """Train ``config.model`` on ``config.dataset`` and return the final model and its metrics.

    Writes ``metrics.jsonl`` (one JSON record per step and per epoch, with wall time), ``last.pt`` (an
    atomic checkpoint after every epoch, the resume point) and ``model.pt`` (the final model) into
    ``config.out`` when it is set.
    """
    hooks = hooks or Hooks()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    if config.amp and device.type != "cuda":
        raise ValueError("--amp (bfloat16 mixed precision) needs a CUDA device; drop --amp on CPU")
    dist = init_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    out = Path(config.out) if config.out else None
    log = _MetricsLog(out / "metrics.jsonl" if out and dist.is_main else None)

    # data and model
    splits = data.get_dataset(config.dataset, root=config.data_dir, download=config.download, seed=config.seed)
    if config.classes:
        splits = data.select_classes(splits, data.parse_classes(config.classes))
    model_shape = models.input_shape(config.model, splits.in_shape)
    adapter = data.Adapter(splits.in_shape, model_shape)
    train_x, train_y = (t.to(device) for t in splits.train.tensors)
    steps_per_epoch = len(train_y) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {config.batch_size} exceeds the {len(train_y)} training examples")
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    model = models.get_model(config.model, num_classes=splits.num_classes, in_shape=model_shape).to(device)
    example = adapter(train_x[: config.batch_size])
    if hooks.init is not None:
        hooks.init(model, example)
    for transform in hooks.transforms:
        transformed = transform.before_training(model)
        if transformed is not model and hooks.init is not None:
            hooks.init(transformed.to(device), example)  # a new architecture (e.g. a boosted giant) gets its own
        model = transformed
    run = _Run(config, hooks, device, dist)
    run.attach(model)

    # resume
    start_epoch, step, elapsed, last_loss = 0, 0, 0.0, math.nan
    checkpoint_path = out / "last.pt" if out else None
    if config.resume or (config.auto_resume and checkpoint_path is not None and checkpoint_path.exists()):
        if checkpoint_path is None:
            raise ValueError("--resume needs --out DIR, the folder of the run to continue")
        state = load_checkpoint(checkpoint_path, map_location=device)
        _check_compatible(state, config, checkpoint_path)
        for transform, t_state in zip(hooks.transforms, state["transforms"], strict=True):
            transform.load_state_dict(t_state)
            run.replace_if_changed(transform.rebuild(run.model))
        _load_states(run, state, checkpoint_path)
        start_epoch, step, elapsed, last_loss = state["epoch"], state["step"], state["elapsed"], state["loss"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
        log.truncate(step, start_epoch)
    else:
        log.truncate(0, 0)  # a fresh run in a used folder must not append to the old run's records

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(config.seed * 10007 + epoch))
        run.model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="step",
            leave=False,
            disable=not (config.progress and dist.is_main),
        )
        for i in range(steps_per_epoch):
            step_start = time.perf_counter()
            for transform in hooks.transforms:
                run.replace_if_changed(transform.on_step_start(run.model, step, total_steps))
            # lr
            lr = lr_at(step, total_steps, base_lr=config.lr, warmup_steps=config.warmup_steps, schedule=config.schedule)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            # forward, backward (plain or preconditioned), step
            index = shard(order[i * config.batch_size : (i + 1) * config.batch_size], dist).to(device)
            x, y = adapter(train_x[index]), train_y[index]
            run.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                loss, logits = run.maker.forward_backward(x, y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"loss became {loss_value} at step {step} (epoch {epoch + 1}); last finite loss was "
                    f"{last_loss:.4g}. Lower --lr or raise --damping; checkpoints up to the last epoch are intact"
                )
            run.optimizer.step()
            # log
            last_loss = loss_value
            loss_sum += loss_value * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            step_time = time.perf_counter() - step_start
            log.write(
                kind="step",
                step=step,
                epoch=epoch + 1,
                loss=loss_value,
                lr=lr,
                ms_per_step=1e3 * step_time,
                wall=elapsed + time.perf_counter() - epoch_start,
            )
            step += 1
            bar.update()
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}",
                acc=f"{correct / seen:.3f}",
                img_s=f"{len(y) * dist.world_size / step_time:.0f}",
                refresh=False,
            )
        bar.close()
        elapsed += time.perf_counter() - epoch_start

        # eval, log, checkpoint
        metrics = _epoch_metrics(run, splits, adapter, loss_sum / seen, correct / seen)
        metrics.update(epoch=epoch + 1, step=step, wall=elapsed)
        log.write(kind="epoch", **metrics)
        if config.progress and dist.is_main:
            tqdm.write(_epoch_line(metrics, config.epochs))
        if checkpoint_path is not None and dist.is_main:
            save_checkpoint(_checkpoint(run, epoch + 1, step, elapsed, last_loss), checkpoint_path)

    # transforms that finish the model (e.g. contract a boosted giant), then the final model
    final = run.model
    for transform in hooks.transforms:
        final = transform.after_training(final)
    if final is not run.model or not metrics:
        run.replace_if_changed(final)
        metrics = {**metrics, **_epoch_metrics(run, splits, adapter, math.nan, math.nan)}
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
    return RunResult(unwrap(run.model), metrics, out)


def _epoch_metrics(
    run: _Run, splits: data.Splits, adapter: nn.Module, train_loss: float, train_acc: float
) -> dict[str, float]:
    size, device = run.config.eval_batch_size, run.device
    val = evaluate(run.model, splits.val, adapter, size, device)
    test = evaluate(run.model, splits.test, adapter, size, device)
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


def _checkpoint(run: _Run, epoch: int, step: int, elapsed: float, loss: float) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {
        "model": unwrap(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "gradients": run.maker.state_dict(),
        "transforms": [t.state_dict() for t in run.hooks.transforms],
        "epoch": epoch,
        "step": step,
        "elapsed": elapsed,
        "loss": loss,
        "config": asdict(run.config),
        "rng": rng,
    }


# Fields that may differ between the interrupted run and its resumption.
_RESUMABLE_CHANGES = {"resume", "auto_resume", "epochs", "progress", "device", "threads", "out", "data_dir"}


def _check_compatible(state: dict[str, Any], config: TrainConfig, path: Path) -> None:
    saved = state.get("config")
    if not isinstance(saved, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a quicktrain training checkpoint (no config/model entries)")
    current = asdict(config)
    changed = {k: (saved.get(k), v) for k, v in current.items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(changed.items()))
        raise CheckpointError(f"{path} was written by a different run ({detail}); use the same settings or a new --out")


def _load_states(run: _Run, state: dict[str, Any], path: Path) -> None:
    try:
        unwrap(run.model).load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.maker.load_state_dict(state["gradients"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path} does not match this model/optimizer ({error}); use a new --out") from error


class _MetricsLog:
    """Appends JSON lines to ``path`` (nothing when ``path`` is None, e.g. on ranks other than 0)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate(self, step: int, epoch: int) -> None:
        """Drop records written after the checkpoint we resume from (by a run that died mid-epoch)."""
        if self.path is None or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if _before(json.loads(line), step, epoch)]
        self.path.write_text("".join(line + "\n" for line in keep))


def _before(record: dict[str, Any], step: int, epoch: int) -> bool:
    return record["step"] < step if record["kind"] == "step" else record["epoch"] <= epoch
