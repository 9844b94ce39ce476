"""Meta-training of a GHN on a dataset (GHN-2 Sec. 4, GHN-3 Sec. 4).

Each step samples a meta-batch of ``M`` architectures from a fixed, seeded pool of the ``train`` split
(:class:`ArchPool`: every network is built, traced and prepared for the GHN once, then reused), gives each
its own batch of images, predicts their parameters with gradients kept, and minimises

.. math::
    \\mathcal{L}(\\phi) = \\frac{1}{M} \\sum_{m=1}^{M}
        \\mathrm{CE}\\big(f_m(x_m; H_\\phi(\\mathcal{G}_m)), y_m\\big)
                     + \\lambda\\, R(\\{H_\\phi(\\mathcal{G}_m)\\})

(:func:`~quicktrain.ghn.model.predicted_param_regularizer` is ``R``) with AdamW, a warmup + cosine learning
rate, gradient clipping and skipping of non-finite steps. Under ``torchrun`` each rank samples its own
architectures and gradients are averaged (data parallelism over architectures).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from .archs import FAMILIES, SPLIT_SIZE, Split, build_arch
from .checkpoint import read_checkpoint, save_checkpoint
from .graph import Graph, model_to_graph
from .model import GHN, DatasetInfo, GHNConfig, PreparedGraph, ghn_config, predicted_param_regularizer


@dataclass(frozen=True)
class MetaTrainConfig:
    """Meta-training hyperparameters (built from the CLI)."""

    dataset: str = "digits"
    size: str = "T"
    steps: int = 1000
    meta_batch: int = 8
    batch_size: int = 8  # images per architecture (each architecture gets its own)
    pool_size: int = 1000  # fixed pool of training architectures (0 = fresh ones every step, GHN-2 style)
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup: int = 50
    grad_clip: float = 5.0
    reg: float = 3e-5  # GHN-3's predparam_wd
    graph_info: bool = True
    seed: int = 0
    save_every: int = 200
    log_every: int = 50
    time_budget_min: float = 0.0  # > 0: stop (and save) after this many minutes of this invocation
    schedule_min: float = 0.0  # > 0: cosine over this many minutes of training time (all resumes), then stop
    threads: int = 0  # > 0: torch.set_num_threads
    device: str = "cpu"
    init_from: str = ""  # a GHN checkpoint to start from (its weights only; a fresh optimizer and schedule)
    # relative draw weight per architecture family in the pool (missing families weigh 1; {} = uniform draws)
    family_weights: dict[str, float] = field(default_factory=dict)


def lr_at(step: int, *, base: float, warmup: int, total: int, progress: float | None = None) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total``.

    ``progress`` in ``[0, 1]`` replaces ``(step - warmup) / (total - warmup)`` (a schedule over time).
    """
    if step < warmup:
        return base * (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, max(0.0, progress))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def graph_signature(g: Graph) -> str:
    """A name-free fingerprint of a graph: the multiset of (type, shape, successors' (type, shape)).

    Two networks built by different code (module names differ) get the same signature when their graphs
    have the same typed, shaped nodes wired the same way (one round of Weisfeiler-Lehman refinement).
    """
    label = [(int(t), tuple(int(v) for v in s)) for t, s in zip(g.node_types, g.node_shapes, strict=True)]
    succ: list[list] = [[] for _ in label]
    for a, b in g.edges.t().tolist():
        succ[a].append(label[b])
    items = Counter((label[i], tuple(sorted(succ[i]))) for i in range(len(label)))
    return hashlib.sha1(repr(sorted(items.items())).encode()).hexdigest()


def registry_signatures(in_shape: tuple[int, int, int], num_classes: int) -> set[str]:
    """Signatures of quicktrain's registry models for this data (the unseen split kept out of the pool)."""
    from quicktrain import models  # the models part's public API

    out = set()
    for name in models.list_models():
        shape = tuple(models.input_shape(name, in_shape))
        if shape != tuple(in_shape):
            continue
        model = models.get_model(name, num_classes=num_classes, in_shape=shape)
        out.add(graph_signature(model_to_graph(model, torch.zeros(2, *shape))))
    return out


class ArchPool:
    """A fixed, seeded pool of ``train``-split architectures, each built, traced and prepared once.

    Entry ``j`` is built on first use: the network is created on the ``meta`` device (no memory, no
    initialisation), materialised to trace its graph, then its parameters go back to ``meta`` — meta-training
    supplies predicted parameters through ``functional_call`` — and only its buffers (BatchNorm statistics)
    stay allocated. Its :class:`~quicktrain.ghn.model.PreparedGraph` (GHN input features, distances, decoding
    plan) is kept. Networks whose graph equals a registry model's (:func:`registry_signatures`) or that have
    parameters the GHN cannot predict are skipped, deterministically.
    """

    def __init__(
        self,
        ghn: GHN,
        size: int,
        *,
        seed: int,
        in_shape: tuple[int, int, int],
        num_classes: int,
        device: torch.device | str = "cpu",
        exclude: set[str] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.ghn, self.size, self.in_shape, self.num_classes = ghn, size, tuple(in_shape), num_classes
        self.device = torch.device(device)
        self.exclude = registry_signatures(self.in_shape, num_classes) if exclude is None else exclude
        self.seed = seed
        self.indices = random.Random(seed).sample(range(SPLIT_SIZE[Split.TRAIN]), size)
        self._cache: dict[int, tuple[torch.nn.Module, PreparedGraph]] = {}
        self.skipped: list[int] = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, j: int) -> tuple[torch.nn.Module, PreparedGraph]:
        if j not in self._cache:
            self._cache[j] = self._build(j)
        return self._cache[j]

    def draw_weights(self, family_weights: dict[str, float]) -> torch.Tensor:
        """Per-entry draw weights: ``family_weights[f]`` for an entry of family ``f``, 1 for the others.

        Builds every entry first, so that a skipped network's replacement is weighed by its own family.
        """
        unknown = set(family_weights) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown architecture families {sorted(unknown)}; choose from {FAMILIES}")
        if any(not (math.isfinite(w) and w >= 0) for w in family_weights.values()):
            raise ValueError(f"family weights must be finite, >= 0, got {family_weights}")
        families = [self[j][0].spec.family for j in range(self.size)]
        weights = torch.tensor([float(family_weights.get(f, 1.0)) for f in families], dtype=torch.float64)
        if not weights.sum() > 0:
            raise ValueError(f"family weights {family_weights} give every network of this pool weight 0")
        return weights

    def _build(self, j: int) -> tuple[torch.nn.Module, PreparedGraph]:
        example = torch.zeros(2, *self.in_shape, device=self.device)
        for attempt in range(1, 1000):
            index = self.indices[j]
            with torch.device("meta"):
                model = build_arch(Split.TRAIN, index, in_shape=self.in_shape, num_classes=self.num_classes)
            model.to_empty(device=self.device)
            for m in model.modules():  # to_empty leaves buffers uninitialised
                if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                    m.reset_running_stats()
            graph = model_to_graph(model, example, sp_cutoff=self.ghn.config.sp_cutoff)
            if not graph.unsupported and graph_signature(graph) not in self.exclude:
                break
            self.skipped.append(index)
            # a replacement that depends only on (seed, j, attempt): the same pool whatever the access order
            self.indices[j] = random.Random(f"{self.seed}:{j}:{attempt}").randrange(SPLIT_SIZE[Split.TRAIN])
        else:
            raise RuntimeError(f"no usable architecture for pool entry {j} after 1000 draws")
        for name, p in list(model.named_parameters()):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.nn.Parameter(p.to("meta"), requires_grad=False))
        return model.train(), self.ghn.prepare(graph)


def meta_loss(
    ghn: GHN,
    models: list[torch.nn.Module],
    x: torch.Tensor | list[torch.Tensor],
    y: torch.Tensor | list[torch.Tensor],
    *,
    reg: float,
    graphs: list[Graph] | list[PreparedGraph] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(total loss, classification loss, accuracy)`` of one meta-batch, with gradients to the GHN.

    ``x``/``y`` are one batch shared by all models or one batch per model; ``graphs`` (traced when omitted)
    may be prepared ones from an :class:`ArchPool`.
    """
    xs = x if isinstance(x, (list, tuple)) else [x] * len(models)
    ys = y if isinstance(y, (list, tuple)) else [y] * len(models)
    if graphs is None:
        graphs = [model_to_graph(m, xb[:1], sp_cutoff=ghn.config.sp_cutoff) for m, xb in zip(models, xs, strict=True)]
    params = ghn(graphs)
    ce, correct, seen = 0.0, 0, 0
    for m, p, xb, yb in zip(models, params, xs, ys, strict=True):
        logits = functional_call(m, {k: _channels_last(w) for k, w in p.items()}, (_channels_last(xb),))
        ce = ce + F.cross_entropy(logits, yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
    ce = ce / len(models)
    total = ce + reg * predicted_param_regularizer(params) if reg > 0 else ce
    return total, ce.detach(), correct / seen


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels-last layout if it is 4-D: oneDNN's CPU convolutions (forward and backward) and
    pooling run 1.4-2.3x faster on it than on NCHW at the pool's sizes; values are the same."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def ghn_optimizer(ghn: GHN, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Meta-training's AdamW, fused: one pass over all GHN parameters instead of ~10 tensor ops per
    parameter (on CPU 1.4 ms instead of 11 ms for the ``T`` GHN), the same update up to round-off."""
    return torch.optim.AdamW(ghn.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def _load_data(name: str):
    from quicktrain.data import get_dataset  # the data part's public function

    return get_dataset(name)


def _load_weights(ghn: GHN, payload: dict[str, Any], what: str) -> None:
    """Load a GHN checkpoint's weights into ``ghn`` after checking its config and dataset (``what``: the
    action the error messages name, e.g. ``resume PATH``)."""
    if GHNConfig.from_dict(payload["config"]) != ghn.config:
        raise ValueError(f"cannot {what}: its GHN config differs from --size/--no-graph of this run")
    if DatasetInfo.from_dict(payload["dataset"]) != ghn.dataset:
        raise ValueError(f"cannot {what}: it was trained for {payload['dataset']}, not {ghn.dataset}")
    ghn.load_state_dict(payload["state_dict"])


def meta_train(cfg: MetaTrainConfig, out: str | Path, *, resume: bool = False, command: str = "") -> dict[str, Any]:
    """Meta-train a GHN and save it to ``out`` (and every ``save_every`` steps, for ``resume``).

    Returns:
        a summary: steps done, skipped steps, final smoothed loss/accuracy, seconds.
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _meta_train(cfg, Path(out), resume, command, world=1, rank=0)
    dist.init_process_group("gloo")
    try:  # a failed rank must not leave its group alive: the others would wait on it until their timeout
        return _meta_train(cfg, Path(out), resume, command, world=dist.get_world_size(), rank=dist.get_rank())
    finally:
        dist.destroy_process_group()


def _meta_train(cfg: MetaTrainConfig, out: Path, resume: bool, command: str, *, world: int,
                rank: int) -> dict[str, Any]:
    """The meta-training loop of :func:`meta_train` on rank ``rank`` of ``world`` processes."""
    device = torch.device(cfg.device)
    data = _load_data(cfg.dataset)
    xs, ys = (t.to(device) for t in data.train.tensors)  # on the device once, batches are gathered there
    info = DatasetInfo(cfg.dataset, tuple(data.in_shape), int(data.num_classes))
    torch.manual_seed(cfg.seed)
    ghn = GHN(ghn_config(cfg.size, graph_info=cfg.graph_info), info).to(device)
    opt = ghn_optimizer(ghn, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    start_step, skipped, prior_seconds, prior_cpu = 0, 0, 0.0, 0.0
    if resume and out.is_file():
        payload = read_checkpoint(out)
        if "optimizer" not in payload.get("train", {}):
            raise ValueError(f"cannot resume {out}: it has no training state (a shipped/final checkpoint)")
        _load_weights(ghn, payload, f"resume {out}")
        ghn.to(device)
        tr = payload["train"]
        opt.load_state_dict(tr["optimizer"])
        start_step, skipped = int(tr["step"]), int(tr["skipped"])
        prior_seconds = float(tr.get("seconds", 0.0))
        prior_cpu = float(tr.get("cpu_seconds", 0.0))
        gen.set_state(tr["rng"][rank] if rank < len(tr["rng"]) else tr["rng"][0])
        torch.set_rng_state(tr["torch_rng"])
    elif cfg.init_from:
        _load_weights(ghn, read_checkpoint(cfg.init_from), f"start from {cfg.init_from}")
    ghn.train()
    pool = (
        ArchPool(
            ghn,
            cfg.pool_size,
            seed=cfg.seed * 1000 + rank,
            in_shape=info.in_shape,
            num_classes=info.num_classes,
            device=device,
        )
        if cfg.pool_size > 0
        else None
    )
    if cfg.family_weights and pool is None:
        raise ValueError("family weights need a fixed pool: set pool_size > 0 (--pool-size)")
    draw = pool.draw_weights(cfg.family_weights) if cfg.family_weights else None

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
            "cpu_seconds": prior_cpu + time.process_time() - c0,
            "args": {k: v for k, v in asdict(cfg).items()},
        }
        save_checkpoint(out, ghn, train_state=state, command=command)

    t0, c0 = time.perf_counter(), time.process_time()
    ema_loss, ema_acc = None, None
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=rank != 0, mininterval=5)
    step = start_step
    for step in bar:
        # lr
        trained = prior_seconds + time.perf_counter() - t0
        progress = trained / (60 * cfg.schedule_min) if cfg.schedule_min > 0 else None
        lr = lr_at(step, base=cfg.lr, warmup=cfg.warmup, total=cfg.steps, progress=progress)
        for group in opt.param_groups:
            group["lr"] = lr
        # sample a meta-batch of architectures and one image batch for each
        if pool is not None:
            if draw is None:
                idx = torch.randint(len(pool), (cfg.meta_batch,), generator=gen).tolist()
            else:
                idx = torch.multinomial(draw, cfg.meta_batch, replacement=True, generator=gen).tolist()
            models, graphs = map(list, zip(*(pool[j] for j in idx), strict=True))
        else:
            idx = torch.randint(SPLIT_SIZE[Split.TRAIN], (cfg.meta_batch,), generator=gen).tolist()
            models = [
                build_arch(Split.TRAIN, i, in_shape=info.in_shape, num_classes=info.num_classes).to(device) for i in idx
            ]
            graphs = None
        b = torch.randint(len(ys), (cfg.meta_batch, cfg.batch_size), generator=gen).to(device)
        # forward / backward
        opt.zero_grad(set_to_none=True)
        total, ce, acc = meta_loss(ghn, models, list(xs[b]), list(ys[b]), reg=cfg.reg, graphs=graphs)
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
        over_budget = (cfg.time_budget_min > 0 and time.perf_counter() - t0 > 60 * cfg.time_budget_min) or (
            progress is not None and progress >= 1.0
        )
        if (step + 1) % cfg.save_every == 0 or over_budget:
            save(step + 1, final=False)
        if over_budget:
            break
    done = step + 1 if cfg.steps > start_step else start_step
    save(done, final=True)
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
    cpu_seconds = payload.get("train", {}).get("cpu_seconds")
    ghn = GHN(GHNConfig.from_dict(payload["config"]), DatasetInfo.from_dict(payload["dataset"]))
    ghn.load_state_dict(payload["state_dict"])
    save_checkpoint(
        dst,
        ghn,
        train_state={"args": args, "step": steps, "seconds": seconds, "cpu_seconds": cpu_seconds},
        command=payload.get("command", ""),
    )


__all__ = [
    "ArchPool",
    "MetaTrainConfig",
    "ghn_optimizer",
    "graph_signature",
    "registry_signatures",
    "lr_at",
    "meta_loss",
    "meta_train",
    "strip_training_state",
]
