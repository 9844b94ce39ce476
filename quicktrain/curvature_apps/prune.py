"""Prune a trained model by importance scores: unstructured (global) or whole channels, then fine-tune briefly.

* **Unstructured**: the fraction ``S`` of all Linear/Conv2d weights with the lowest scores (ranked globally
  across layers, or within each layer with ``per_layer``) is set to zero; the masks are kept during
  fine-tuning with ``torch.nn.utils.prune``.
* **Structured**: the fraction ``S`` of the output channels of every hidden layer of a chain model (the
  registry's ``mlp`` and ``cnn``; the same fraction per layer, so every score yields the same architecture) is
  removed, giving a genuinely smaller model (:func:`quicktrain.curvature_apps.channels.shrink`).

Scores (:data:`SCORES`): ``magnitude`` (``|θ|``; per channel the L1 norm of its weights), ``obd-diag`` and
``obd-kron`` (Optimal Brain Damage saliency from the diagonal or K-FAC Fisher, see
:mod:`quicktrain.curvature_apps.importance`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from quicktrain.curvature_apps.channels import channel_groups, shrink
from quicktrain.curvature_apps.importance import channel_magnitude, channel_saliency, magnitude_scores, obd_saliency
from quicktrain.curvature_apps.run_data import LoadedRun, load_run, task_batches
from quicktrain.precond import KRON_TYPES, compute_curvature
from quicktrain.train import Hooks, TrainConfig, Transform, evaluate, fit, save_checkpoint

__all__ = ["SCORES", "PruneStart", "apply_masks", "channel_keep", "prune_run", "score_model", "unstructured_masks"]

SCORES = ("magnitude", "obd-diag", "obd-kron")


def _prunable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KRON_TYPES)}


def _drop_lowest(scores: Tensor, sparsity: float) -> Tensor:
    """Flat mask that is 0 at the ``round(S·n)`` lowest of the flat ``scores`` (ties: first ones) and 1 elsewhere."""
    mask = torch.ones_like(scores)
    mask[torch.argsort(scores, stable=True)[: round(sparsity * scores.numel())]] = 0.0
    return mask


def unstructured_masks(model: nn.Module, scores: dict[str, Tensor], sparsity: float, *,
                       per_layer: bool = False) -> dict[str, Tensor]:
    """Masks (1 keep, 0 prune) of every Linear/Conv2d weight removing the lowest scores.

    Args:
        model: the model.
        scores: ``{full parameter name: scores}`` covering ``'<module>.weight'`` of every Linear/Conv2d.
        sparsity: fraction ``S`` in ``[0, 1)`` of those weights to remove.
        per_layer: remove ``round(S·n_l)`` weights of each layer instead of ``round(S·total)`` ranked globally
            (a global ranking can empty a whole layer, which disconnects the network).

    Returns:
        ``{module name: mask of the weight's shape}``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    modules = _prunable(model)
    names = [f"{m}.weight" for m in modules]
    missing = [n for n in names if n not in scores]
    if missing:
        raise ValueError(f"scores lack {missing}; score every Linear/Conv2d weight")
    if per_layer:
        parts = [_drop_lowest(scores[n].reshape(-1).float(), sparsity) for n in names]
    else:
        flat = _drop_lowest(torch.cat([scores[n].reshape(-1).float() for n in names]), sparsity)
        parts = flat.split([m.weight.numel() for m in modules.values()])
    return {m: part.view_as(mod.weight).to(mod.weight) for (m, mod), part in zip(modules.items(), parts, strict=True)}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Multiply each named module's weight by its mask, in place (permanent)."""
    for name, mask in masks.items():
        model.get_submodule(name).weight.mul_(mask)


def channel_keep(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Per layer, the indices (sorted) of the ``width - round(S·width)`` highest-scoring channels (at least one)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    keep = {}
    for name, s in scores.items():
        n_keep = max(1, s.numel() - round(sparsity * s.numel()))
        keep[name] = torch.argsort(s, descending=True, stable=True)[:n_keep].sort().values
    return keep


def score_model(run: LoadedRun, score: str, *, structured: bool, batches: int | None = 16, batch_size: int = 128,
                fisher: str = "exact", seed: int = 0) -> dict[str, Tensor]:
    """Scores of a run's model: per parameter, or per channel (``structured``) by producer name.

    OBD scores use the curvature of the run's own training data (``batches`` batches, ``fisher`` type).
    """
    if score not in SCORES:
        raise ValueError(f"Unknown score {score!r}; choose from {list(SCORES)}")
    model = run.model
    if score == "magnitude":
        return channel_magnitude(model) if structured else magnitude_scores(model)
    if structured:
        channel_groups(model)  # refuse unsupported models before computing curvature
    data = task_batches(run, batches=batches, batch_size=batch_size, seed=seed)
    estimate = compute_curvature(model, nn.CrossEntropyLoss(), data, representation=score.removeprefix("obd-"),
                                 fisher_type=fisher, seed=seed)
    return channel_saliency(model, estimate) if structured else obd_saliency(model, estimate)


class PruneStart(Transform):
    """A :class:`~quicktrain.train.hooks.ModelTransform` that fine-tunes a given pruned model in ``fit``.

    ``before_training`` swaps in ``model`` (with ``masks`` held by ``torch.nn.utils.prune`` so pruned weights
    stay zero); ``after_training`` makes the masks permanent.
    """

    def __init__(self, model: nn.Module, masks: dict[str, Tensor] | None = None) -> None:
        self.model, self.masks = model, masks or {}

    def before_training(self, model: nn.Module) -> nn.Module:
        for name, mask in self.masks.items():
            torch_prune.custom_from_mask(self.model.get_submodule(name), "weight", mask)
        return self.model

    def after_training(self, model: nn.Module) -> nn.Module:
        for name in self.masks:
            torch_prune.remove(model.get_submodule(name), "weight")
        return model


def _finetune_config(run: LoadedRun, steps: int, lr: float | None, out: Path) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    cfg = {k: v for k, v in run.config.items() if k in known}
    per_epoch = len(run.splits.train) // cfg.get("batch_size", 64)
    if per_epoch < 1:
        raise ValueError("the run's batch size exceeds its training set")
    epochs = math.ceil(steps / per_epoch)
    cfg.update(epochs=epochs, max_steps_per_epoch=math.ceil(steps / epochs), lr=lr or cfg.get("lr", 1e-3) / 10,
               warmup_steps=0, out=str(out), resume=False, auto_resume=False, progress=False, init=None,
               precond=None, boost=False)
    return TrainConfig(**cfg)


def prune_run(run_dir: str | Path, sparsity: float, *, structured: bool = False, score: str = "obd-kron",
              finetune_steps: int = 0, out: str | Path | None = None, lr: float | None = None,
              per_layer: bool = False, batches: int | None = 16, fisher: str = "exact",
              seed: int = 0) -> dict[str, Any]:
    """Prune a finished run's model, optionally fine-tune it, and write ``OUT/model.pt`` and ``summary.json``.

    Args:
        run_dir: the ``--out`` folder of a finished ``quicktrain train`` run.
        sparsity: fraction of weights (unstructured) or of each hidden layer's channels (structured) to remove.
        structured: remove channels (registry ``mlp``/``cnn`` only) instead of single weights.
        score: one of :data:`SCORES`.
        finetune_steps: training steps on the run's task afterwards (about this many: whole epochs of equal
            length), with the run's settings and a tenth of its learning rate unless ``lr`` is given.
        out: output folder (default ``RUN_DIR-pruned-<score>-<S>[-structured]``).
        lr: fine-tuning learning rate.
        per_layer: unstructured only: the same sparsity in every layer instead of a global ranking.
        batches: curvature batches (OBD scores).
        fisher: Fisher type of the curvature (``exact`` = Gauss-Newton, OBD's choice).
        seed: curvature batches and sampling.

    Returns:
        ``{"before": test/val metrics right after pruning, "metrics": final metrics, "params": count, "out": ...}``.
        ``model.pt`` has the usual keys plus ``"pruning"`` (``widths`` of the hidden layers when structured;
        load it with :func:`quicktrain.curvature_apps.run_data.build_model`).
    """
    run = load_run(run_dir)
    tag = f"{score}-{sparsity:g}" + ("-structured" if structured else "-per-layer" if per_layer else "")
    out = Path(out) if out is not None else Path(f"{str(run_dir).rstrip('/')}-pruned-{tag}")
    scores = score_model(run, score, structured=structured, batches=batches, fisher=fisher, seed=seed)
    masks: dict[str, Tensor] = {}
    if structured:
        keep = channel_keep(scores, sparsity)
        model = shrink(run.model, keep)
        widths = {name: len(k) for name, k in keep.items()}
    else:
        masks = unstructured_masks(run.model, scores, sparsity, per_layer=per_layer)
        model = run.model
        apply_masks(model, masks)
        widths = {}
    size = run.config.get("eval_batch_size", 1000)
    before = {f"{split}_acc": evaluate(model, getattr(run.splits, split), run.adapter, size, torch.device("cpu"))["acc"]
              for split in ("val", "test")}
    metrics: dict[str, Any] = dict(before)
    config = run.config
    if finetune_steps > 0:
        ft = _finetune_config(run, finetune_steps, lr, out)
        result = fit(ft, Hooks(transforms=[PruneStart(model, masks)]))
        model, metrics, config = result.model, result.metrics, asdict(ft)
    pruning = {"source": str(run_dir), "score": score, "sparsity": sparsity, "structured": structured,
               "per_layer": per_layer and not structured,
               "widths": widths, "finetune_steps": finetune_steps, "before": before}
    params = sum(p.numel() for p in model.parameters())
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in masks)
    ckpt = {**run.checkpoint, "model": model.state_dict(), "config": config, "metrics": metrics, "pruning": pruning}
    save_checkpoint(ckpt, out / "model.pt")
    summary = {"config": config, "metrics": metrics, "pruning": pruning, "params": params, "zero_weights": zeros}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"before": before, "metrics": metrics, "params": params, "zero_weights": zeros, "out": str(out)}
