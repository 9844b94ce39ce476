"""Export a (contracted) tiny network to ONNX and TorchScript, checking both against eager PyTorch."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quicktrain import models
from quicktrain.train.checkpoint import CheckpointError, load_checkpoint

from .expand import is_giant

_REQUIRED = ("model", "model_name", "num_classes", "in_shape")


@dataclass
class LoadedModel:
    """A final model rebuilt from a run: the module (eval mode), its registry name and input shape."""

    model: nn.Module
    model_name: str
    in_shape: tuple[int, int, int]
    source: Path


def load_final_model(run_or_checkpoint: str | Path) -> LoadedModel:
    """Rebuild the final model of a ``quicktrain train`` run from its folder or its ``model.pt``.

    The file must be the final-model checkpoint written by :func:`quicktrain.train.fit` (keys ``model``,
    ``model_name``, ``num_classes``, ``in_shape``); the model is rebuilt with
    :func:`quicktrain.models.get_model` and loaded strictly, so a giant (not contracted) is rejected.

    Raises:
        CheckpointError: missing file, a training checkpoint (``last.pt``) or weights that do not fit.
    """
    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = path / "model.pt"
    state = load_checkpoint(path)
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        hint = " (this looks like the resume checkpoint last.pt)" if "optimizer" in state else ""
        raise CheckpointError(f"{path} lacks {missing}{hint}; pass the run folder or its final model.pt")
    in_shape = tuple(int(s) for s in state["in_shape"])
    model = models.get_model(state["model_name"], num_classes=int(state["num_classes"]), in_shape=in_shape)
    if any(".blocks." in k for k in state["model"]):
        raise CheckpointError(f"{path} holds an expanded NetBooster giant; contract it (boost.contract) first")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit model {state['model_name']!r}: {error}") from error
    return LoadedModel(model.eval(), state["model_name"], in_shape, path)


def export_model(
    model: nn.Module, in_shape: tuple[int, ...], out_dir: str | Path, *, onnx: bool = True,
    torchscript: bool = True, atol: float = 1e-4,
) -> dict[str, Path]:
    """Write ``model.onnx`` and/or ``model.ts`` (traced TorchScript) into ``out_dir``, batch size dynamic.

    Each export is run on a random batch and compared with eager PyTorch (``max |diff| <= atol``); ONNX is
    checked with ``onnx.checker`` and, when ``onnxruntime`` is installed, also run.

    Args:
        model: the tiny network (a giant is rejected: export the contracted model).
        in_shape: one example's shape ``(C, H, W)`` (or ``(F,)``).
        out_dir: folder to write into (created).
        onnx: write ONNX (needs the ``onnx`` and ``onnxscript`` packages).
        torchscript: write TorchScript.
        atol: tolerance of the checks.

    Returns:
        Format name -> written path.

    Raises:
        ValueError: a giant was passed.
        RuntimeError: an exported model disagrees with eager PyTorch.
    """
    if is_giant(model):
        raise ValueError("refusing to export an expanded giant; call quicktrain.boost.contract(giant) first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu().float()
    example = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(example)
    written: dict[str, Path] = {}
    if torchscript:
        path = out / "model.ts"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit deprecation notices
            traced = torch.jit.trace(model, example)
            traced.save(str(path))
            loaded = torch.jit.load(str(path))
        _check("TorchScript", loaded(torch.cat([example, example])).detach()[2:], reference, atol)
        written["torchscript"] = path
    if onnx:
        written["onnx"] = _export_onnx(model, example, reference, out / "model.onnx", atol)
    return written


def _export_onnx(model: nn.Module, example: torch.Tensor, reference: torch.Tensor, path: Path, atol: float) -> Path:
    try:
        import onnx as onnx_lib
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as error:
        raise RuntimeError(f"ONNX export needs onnx and onnxscript ({error}); pip install 'quicktrain[export]' "
                           "or pass --no-onnx") from error
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model, (example,), dynamic_shapes=({0: batch},), input_names=["input"], output_names=["logits"],
        dynamo=True, verbose=False,
    )
    program.save(str(path))
    onnx_lib.checker.check_model(onnx_lib.load(str(path)))
    try:
        import onnxruntime
    except ImportError:
        return path
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch3 = torch.cat([example, example[:1]])
    (logits,) = session.run(None, {"input": batch3.numpy()})
    _check("ONNX (onnxruntime)", torch.from_numpy(logits)[:2], reference, atol)
    return path


def _check(kind: str, got: torch.Tensor, reference: torch.Tensor, atol: float) -> None:
    err = (got - reference).abs().max().item()
    if not err <= atol:
        raise RuntimeError(f"{kind} export disagrees with eager PyTorch: max |diff| = {err:.3g} > {atol}")


__all__ = ["LoadedModel", "export_model", "load_final_model"]
