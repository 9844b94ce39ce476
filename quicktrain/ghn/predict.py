"""Use a trained GHN: predict a model's parameters and write them into it in place."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import load_checkpoint, shipped_checkpoints
from .graph import model_to_graph
from .model import GHN, last_layer_nodes

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
HEAD_MODES = ("strict", "predict", "reinit")
HeadMode = Literal["strict", "predict", "reinit"]


@dataclass
class PredictReport:
    """What :func:`predict_into` did.

    Attributes:
        predicted: names of the parameters written from the GHN.
        unsupported: names of parameters the GHN does not predict; they keep their default initialisation.
        head: names of the classifier-head parameters left at default init (``head="reinit"``).
        seconds: wall time of tracing + prediction + writing (without BN re-estimation).
        bn_batches: number of batches used to re-estimate BatchNorm statistics.
        head_scale: the factor the head was scaled by (``head_norm="default"``), else ``None``.
    """

    predicted: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bn_batches: int = 0
    head_scale: float | None = None


def resolve_ghn(checkpoint_or_ghn: GHN | str | Path) -> GHN:
    """A :class:`GHN` from itself or from a checkpoint path."""
    if isinstance(checkpoint_or_ghn, GHN):
        return checkpoint_or_ghn
    if isinstance(checkpoint_or_ghn, (str, Path)):
        return load_checkpoint(checkpoint_or_ghn)
    raise TypeError(f"expected a GHN or a checkpoint path, got {type(checkpoint_or_ghn).__name__}")


def check_compatible(ghn: GHN, example_inputs: Tensor, num_outputs: int | None) -> None:
    """Raise when the input shape or class count differs from the data the GHN was trained for."""
    ds = ghn.dataset
    if ds is None:
        return
    if tuple(example_inputs.shape[1:]) != tuple(ds.in_shape):
        raise ValueError(
            f"this GHN was trained for {ds.name!r} inputs of shape {tuple(ds.in_shape)}, but the model gets "
            f"{tuple(example_inputs.shape[1:])}; use a GHN trained on this data "
            f"(`quicktrain ghn train --dataset ...`) or default init"
        )
    if num_outputs is not None and num_outputs != ds.num_classes:
        raise ValueError(
            f"this GHN was trained for {ds.name!r} with {ds.num_classes} classes, but the model outputs "
            f"{num_outputs}; use a GHN trained for {num_outputs} classes or default init"
        )


def has_running_bn(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers that use running statistics in eval mode."""
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Reset BatchNorm running statistics and re-estimate them as plain averages over ``batches``.

    Predicted weights change every layer's activation statistics, so the default ``(0, 1)`` running
    statistics are wrong in eval mode; a few forward passes in train mode with ``momentum=None``
    (cumulative average) fix them. Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        for x in batches:
            if isinstance(x, (tuple, list)):
                x = x[0]
            model(x)
            n += 1
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
    if n == 0:
        raise ValueError(
            "bn_batches is empty; pass at least one batch of inputs to re-estimate BatchNorm statistics"
        )
    return n


def predict_into(
    model: nn.Module,
    checkpoint_or_ghn: GHN | str | Path,
    *,
    example_inputs: Tensor | None = None,
    bn_batches: Iterable[Tensor] | Literal["keep"] | None = None,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    head: HeadMode = "strict",
    head_norm: Literal["predicted", "default"] = "predicted",
    progress: bool = False,
) -> PredictReport:
    """Predict all parameters of ``model`` with a GHN and write them into ``model`` in place.

    .. math::
        \\theta = H_\\phi(\\mathcal{G}(\\text{model})),\\qquad
        W \\leftarrow W + \\epsilon\\,\\mathrm{std}(W)\\,\\xi,\\quad \\xi \\sim \\mathcal{N}(0, I)

    The noise breaks the symmetry that tiling creates (repeated blocks of a weight get identical gradients
    otherwise; GHN-3 adds noise of the same kind before fine-tuning). It applies to tensors with >= 2 dims.

    Args:
        model: any module; its parameters are overwritten.
        checkpoint_or_ghn: a :class:`GHN` or a checkpoint path.
        example_inputs: one batch ``[B, C, H, W]``; default: zeros of the GHN's dataset shape.
        bn_batches: iterable of input batches (or ``(x, y)`` tuples) to re-estimate BatchNorm statistics.
            Required when the model has BatchNorm layers that track running statistics: statistics of default
            init do not fit predicted weights (eval-mode accuracy of the shipped fashion-mnist GHN's networks
            dropped from 0.47 to 0.13 without them), so ``None`` is an error there; ``"keep"`` keeps the
            current statistics on purpose.
        noise: relative std ``epsilon`` of the symmetry-breaking noise (e.g. ``1e-2``); 0 disables it.
        generator: RNG for the noise.
        head: the classifier head when the model's class count may differ from the GHN's dataset (transfer):
            ``"strict"`` raises on a different count; ``"predict"`` predicts the head for the model's count
            (the decoded chunk is tiled/sliced to ``[classes, features]`` like any tensor, GHN-2 Sec. 4);
            ``"reinit"`` predicts every other tensor and leaves the head (the parameters whose output is the
            network output) at the model's default init.
        head_norm: ``"default"`` rescales the predicted head (the weight and bias whose output is the network
            output) by one factor ``c`` so that the weight's norm is that of PyTorch's default init of a
            ``Linear``/``Conv`` layer, :math:`E\\|W\\|_F^2 = \\text{out}/3`. The logits become ``c`` times the
            predicted ones: the same predictions (argmax), less confident. A predicted head is typically
            several times larger (10x for ``cnn`` on digits), which multiplies the gradient that reaches every
            layer below it and makes the first SGD/Adam steps of fine-tuning throw the network off.
        progress: show a progress bar over the predicted tensors (huge models).

    Returns:
        A :class:`PredictReport`; unsupported parameters are also logged as a warning.

    Raises:
        ValueError: the model's input shape or class count differs from the GHN's dataset, or it has
            BatchNorm layers and no ``bn_batches``.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    if head_norm not in ("predicted", "default"):
        raise ValueError(f"head_norm must be 'predicted' or 'default', got {head_norm!r}")
    ghn = resolve_ghn(checkpoint_or_ghn)
    if example_inputs is None:
        if ghn.dataset is None:
            raise ValueError("this GHN has no dataset info; pass example_inputs (one batch of model inputs)")
        example_inputs = torch.zeros(2, *ghn.dataset.in_shape)
    check_compatible(ghn, example_inputs, None)
    start = time.perf_counter()
    device = next(model.parameters()).device
    try:
        graph = model_to_graph(model, example_inputs.to(device), sp_cutoff=ghn.config.sp_cutoff)
    except RuntimeError as e:  # e.g. a channel or size mismatch inside the model
        trained = f" (the GHN was trained for inputs {tuple(ghn.dataset.in_shape)})" if ghn.dataset else ""
        raise ValueError(
            f"{type(model).__name__} failed on example inputs of shape {tuple(example_inputs.shape[1:])}"
            f"{trained}: {e}"
        ) from e
    if head == "strict":
        check_compatible(ghn, example_inputs, graph.output_shape[-1] if graph.output_shape else None)
    if bn_batches is None and has_running_bn(model):
        raise ValueError(
            f"{type(model).__name__} has BatchNorm layers whose running statistics must be re-estimated for "
            "predicted weights; pass bn_batches=[a few input batches] (e.g. 4 batches of 128 training images), "
            'or bn_batches="keep" to keep the current statistics'
        )
    was_training = ghn.training
    ghn.eval()
    named = dict(model.named_parameters())
    report = PredictReport(unsupported=list(graph.unsupported))
    outputs = [graph.param_names[i] for i in sorted(last_layer_nodes(graph)) if graph.param_names[i]]
    if head == "reinit":
        report.head = outputs
    skip = set(report.head)
    total = sum(n is not None for n in graph.param_names)
    with torch.no_grad():
        preds = ghn.iter_predictions([graph])  # one tensor at a time, written in place
        for _, name, w in tqdm(preds, total=total, desc="predict", unit="tensor", disable=not progress):
            if name in skip:
                continue
            if noise > 0 and w.dim() >= 2:
                xi = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device)
                w = w + noise * w.std() * xi
            named[name].copy_(w)
            report.predicted.append(name)
    ghn.train(was_training)
    if head_norm == "default":
        report.head_scale = _rescale_head(named, outputs)
    report.seconds = time.perf_counter() - start
    if report.unsupported:
        n = len(report.unsupported)
        msg = f"GHN did not predict {n} parameter(s), they keep default init: {report.unsupported}"
        warnings.warn(msg, stacklevel=2)
    if bn_batches is not None and not isinstance(bn_batches, str):
        report.bn_batches = reestimate_bn(model, bn_batches)
    return report


def _rescale_head(named: dict[str, nn.Parameter], head: list[str]) -> float | None:
    """Scale the head's tensors by one factor so its weight has the default-init norm ``sqrt(out / 3)``.

    Returns the factor, or ``None`` (with a warning) when the network output does not come from exactly one
    weight (e.g. a LayerNorm after the last linear layer), where scaling the head would not scale the logits.
    """
    weights = [n for n in head if named[n].dim() >= 2]
    if len(weights) != 1:
        found = ", ".join(weights) if weights else "none: another op (a sum, a norm) makes the output"
        msg = (f"head_norm='default': the output does not come from one layer's weight (found {found}), so "
               "scaling a weight would not scale the logits; the head keeps its predicted norm")
        warnings.warn(msg, stacklevel=3)
        return None
    w = named[weights[0]]
    with torch.no_grad():
        scale = float((w.shape[0] / 3) ** 0.5 / w.norm().clamp_min(1e-12))
        for n in head:
            named[n].mul_(scale)
    return scale


def default_checkpoint(dataset: str | None) -> Path:
    """The shipped GHN for ``dataset``; a clear error lists what is shipped when none fits."""
    shipped = shipped_checkpoints()
    if dataset is None:
        raise ValueError(
            f"no GHN checkpoint given; pass ghn:PATH or a dataset with a shipped GHN ({sorted(shipped)})"
        )
    if dataset not in shipped:
        raise ValueError(
            f"no shipped GHN for dataset {dataset!r} (shipped: {sorted(shipped)}); train one with "
            f"`quicktrain ghn train --dataset {dataset} --out ghn.pt` and use --init ghn:ghn.pt"
        )
    return shipped[dataset]


def initializer(
    checkpoint_path: str | Path | None = None,
    *,
    dataset: str | None = None,
    noise: float = 0.0,
) -> Callable[[nn.Module, Tensor], None]:
    """An :data:`quicktrain.train.hooks.Initializer` for ``--init ghn[:CHECKPOINT]``.

    Args:
        checkpoint_path: a GHN checkpoint; ``None`` uses the shipped one for ``dataset``.
        dataset: the run's dataset name (selects the shipped GHN when no path is given).
        noise: symmetry-breaking noise (see :func:`predict_into`).

    Returns:
        ``init(model, example_inputs)``: predicts the parameters in place, rescales the head to default-init
        norm (``head_norm="default"`` of :func:`predict_into`: with the predicted head, SGD at lr 0.03-0.1
        lost the predicted network's accuracy in its first steps) and re-estimates BatchNorm statistics on
        ``example_inputs`` (the training loop passes its first batch), split in up to 4 batches, as few as 2
        examples each (BatchNorm needs more than one value per channel).
    """
    path = Path(checkpoint_path) if checkpoint_path else default_checkpoint(dataset)
    ghn = load_checkpoint(path)  # load (and validate) now, so a bad path fails before training starts

    def init(model: nn.Module, example_inputs: Tensor) -> None:
        n = max(1, min(4, len(example_inputs) // 2))
        bn = list(example_inputs.tensor_split(n)) if len(example_inputs) >= 2 else None
        predict_into(model, ghn, example_inputs=example_inputs, bn_batches=bn, noise=noise, head_norm="default")

    return init


__all__ = ["PredictReport", "default_checkpoint", "has_running_bn", "initializer", "predict_into", "reestimate_bn"]
