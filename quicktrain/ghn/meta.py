"""Meta-training of a GHN on a dataset (GHN-2 Sec. 4, GHN-3 Sec. 4).

Each step samples a meta-batch of ``M`` architectures from the ``train`` split, predicts their parameters
with gradients kept, and minimises

.. math::
    \\mathcal{L}(\\phi) = \\frac{1}{M} \\sum_{m=1}^{M}
        \\mathrm{CE}\\big(f_m(x; H_\\phi(\\mathcal{G}_m)), y\\big)
                     + \\lambda\\, R(\\{H_\\phi(\\mathcal{G}_m)\\})

(:func:`~quicktrain.ghn.model.predicted_param_regularizer` is ``R``) with AdamW, a warmup + cosine learning
rate, gradient clipping and skipping of non-finite steps. Under ``torchrun`` each rank samples its own
architectures and gradients are averaged (data parallelism over architectures).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from .archs import SPLIT_SIZE, Split, build_arch
from .checkpoint import read_checkpoint, save_checkpoint
from .graph import model_to_graph
from .model import GHN, DatasetInfo, GHNConfig, ghn_config, predicted_param_regularizer


@dataclass(frozen=True)
class MetaTrainConfig:
    """Meta-training hyperparameters (built from the CLI)."""

    dataset: str = "digits"
    size: str = "T"
    steps: int = 1000
    meta_batch: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup: int = 50
    grad_clip: float = 5.0
    reg: float = 3e-5  # GHN-3's predparam_wd
    graph_info: bool = True
    seed: int = 0
    save_every: int = 200
    log_every: int = 50
    time_budget_min: float = 0.0  # > 0: stop (and save) after this many minutes
    threads: int = 0  # > 0: torch.set_num_threads


def lr_at(step: int, *, base: float, warmup: int, total: int) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def meta_loss(
    ghn: GHN,
    models: list[torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    reg: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(total loss, classification loss, accuracy)`` of one meta-batch, with gradients to the GHN."""
    graphs = [model_to_graph(m, x[:1], sp_cutoff=ghn.config.sp_cutoff) for m in models]
    params = ghn(graphs)
    ce, correct = 0.0, 0
    for m, p in zip(models, params, strict=True):
        logits = functional_call(m, p, (x,))
        ce = ce + F.cross_entropy(logits, y)
        correct += int((logits.argmax(1) == y).sum())
    ce = ce / len(models)
    total = ce + reg * predicted_param_regularizer(params) if reg > 0 else ce
    return total, ce.detach(), correct / (len(models) * len(y))


def _load_data(name: str):
    from quicktrain.data import get_dataset  # the data part's public function

    return get_dataset(name)


def meta_train(
    cfg: MetaTrainConfig, out: str | Path, *, resume: bool = False, command: str = ""
) -> dict[str, Any]:
    """Meta-train a GHN and save it to ``out`` (and every ``save_every`` steps, for ``resume``).

    Returns:
        a summary: steps done, skipped steps, final smoothed loss/accuracy, seconds.
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world, rank = 1, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
    data = _load_data(cfg.dataset)
    xs, ys = data.train.tensors
    info = DatasetInfo(cfg.dataset, tuple(data.in_shape), int(data.num_classes))
    torch.manual_seed(cfg.seed)
    ghn = GHN(ghn_config(cfg.size, graph_info=cfg.graph_info), info)
    opt = torch.optim.AdamW(ghn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    start_step, skipped, prior_seconds = 0, 0, 0.0
    out = Path(out)
    if resume and out.is_file():
        payload = read_checkpoint(out)
        if GHNConfig.from_dict(payload["config"]) != ghn.config:
            raise ValueError(
                f"cannot resume {out}: its GHN config differs from --size/--no-graph of this run"
            )
        if "optimizer" not in payload.get("train", {}):
            raise ValueError(f"cannot resume {out}: it has no training state (a shipped/final checkpoint)")
        ghn.load_state_dict(payload["state_dict"])
        tr = payload["train"]
        opt.load_state_dict(tr["optimizer"])
        start_step, skipped = int(tr["step"]), int(tr["skipped"])
        prior_seconds = float(tr.get("seconds", 0.0))
        gen.set_state(tr["rng"][rank] if rank < len(tr["rng"]) else tr["rng"][0])
        torch.set_rng_state(tr["torch_rng"])
    ghn.train()

    def save(step: int, final: bool) -> None:
        rngs = [gen.get_state()]
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, gen.get_state())
            rngs = gathered
        if rank != 0:
            return
        state = {
            "step": step,
            "skipped": skipped,
            "optimizer": opt.state_dict(),
            "rng": rngs,
            "torch_rng": torch.get_rng_state(),
            "seconds": prior_seconds + time.perf_counter() - t0,
            "args": {k: v for k, v in asdict(cfg).items()},
        }
        save_checkpoint(out, ghn, train_state=state, command=command)

    t0 = time.perf_counter()
    ema_loss, ema_acc = None, None
    bar = tqdm(
        range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=rank != 0, mininterval=5
    )
    step = start_step
    for step in bar:
        # lr
        lr = lr_at(step, base=cfg.lr, warmup=cfg.warmup, total=cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        # sample a meta-batch of architectures and an image batch
        idx = torch.randint(SPLIT_SIZE[Split.TRAIN], (cfg.meta_batch,), generator=gen).tolist()
        models = [
            build_arch(Split.TRAIN, i, in_shape=info.in_shape, num_classes=info.num_classes) for i in idx
        ]
        b = torch.randint(len(ys), (cfg.batch_size,), generator=gen)
        # forward / backward
        opt.zero_grad(set_to_none=True)
        total, ce, acc = meta_loss(ghn, models, xs[b], ys[b], reg=cfg.reg)
        ok = torch.isfinite(total)
        if ok:
            total.backward()
        if world > 1:
            flag = torch.tensor([float(ok)])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
            if ok:
                for p in ghn.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
        # clip, NaN-skip, step
        if ok:
            norm = torch.nn.utils.clip_grad_norm_(ghn.parameters(), cfg.grad_clip)
            ok = bool(torch.isfinite(norm))
        if ok:
            opt.step()
        else:
            skipped += 1
            opt.zero_grad(set_to_none=True)
        # log
        if ok:
            ema_loss = float(ce) if ema_loss is None else 0.98 * ema_loss + 0.02 * float(ce)
            ema_acc = acc if ema_acc is None else 0.98 * ema_acc + 0.02 * acc
        if rank == 0 and (step + 1) % cfg.log_every == 0:
            bar.set_postfix_str(f"loss {ema_loss:.3f} acc {ema_acc:.3f} lr {lr:.2e} skipped {skipped}")
            bar.write(
                f"step {step + 1} loss {ema_loss:.4f} acc {ema_acc:.3f} lr {lr:.2e} "
                f"skipped {skipped} {time.perf_counter() - t0:.0f}s"
            )
        # checkpoint / stop
        over_budget = cfg.time_budget_min > 0 and time.perf_counter() - t0 > 60 * cfg.time_budget_min
        if (step + 1) % cfg.save_every == 0 or over_budget:
            save(step + 1, final=False)
        if over_budget:
            break
    done = step + 1 if cfg.steps > start_step else start_step
    save(done, final=True)
    if world > 1:
        dist.destroy_process_group()
    return {
        "steps": done,
        "skipped": skipped,
        "loss": ema_loss,
        "acc": ema_acc,
        "seconds": time.perf_counter() - t0,
    }


def strip_training_state(src: str | Path, dst: str | Path) -> None:
    """Copy a checkpoint without its optimizer state (for shipping: a few MB)."""
    payload = read_checkpoint(src)
    args = payload.get("train", {}).get("args", {})
    steps = payload.get("train", {}).get("step")
    seconds = payload.get("train", {}).get("seconds")
    ghn = GHN(GHNConfig.from_dict(payload["config"]), DatasetInfo.from_dict(payload["dataset"]))
    ghn.load_state_dict(payload["state_dict"])
    save_checkpoint(
        dst,
        ghn,
        train_state={"args": args, "step": steps, "seconds": seconds},
        command=payload.get("command", ""),
    )


__all__ = [
    "MetaTrainConfig",
    "evaluate_predicted",
    "lr_at",
    "meta_loss",
    "meta_train",
    "strip_training_state",
]


@torch.no_grad()
def evaluate_predicted(
    ghn: GHN,
    models: list[torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    bn_batches: list[torch.Tensor] | None = None,
    noise: float = 0.0,
) -> list[float]:
    """Test accuracy of each model with GHN-predicted parameters and no training (filled in place)."""
    from .predict import predict_into

    accs = []
    for m in models:
        predict_into(m, ghn, example_inputs=x[:2], bn_batches=bn_batches, noise=noise)
        m.eval()
        correct = sum(
            int((m(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(500), y.split(500), strict=True)
        )
        accs.append(correct / len(y))
    return accs
