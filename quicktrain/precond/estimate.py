"""Compute a curvature representation of a model on some data, as per-module objects with a state_dict.

Used for analysis and by methods that need the curvature itself rather than a preconditioned step
(elastic weight consolidation's penalty ``½ Δθ^T F Δθ``, Optimal Brain Damage saliencies ``½ F_ii θ_i²``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from quicktrain.precond.capture import KRON_TYPES, NORM_TYPES, SUPPORTED_TYPES, LayerCapture
from quicktrain.precond.curvature import forward_keep_buffers, output_sqrt, parse_fisher_type
from quicktrain.precond.makers import select_modules
from quicktrain.precond.representations import (
    Diagonal,
    KronEmbedding,
    KronFactored,
    LayerBlock,
    Representation,
    UnitWise,
)
from quicktrain.train.hooks import unwrap

__all__ = ["CurvatureEstimate", "compute_curvature"]


def _kron_factory(name: str, module: nn.Module) -> Representation:
    if isinstance(module, KRON_TYPES):
        return KronFactored(name, module)
    if isinstance(module, nn.Embedding):
        return KronEmbedding(name, module)
    return UnitWise(name, module)


_REPRESENTATIONS = {"kron": _kron_factory, "diag": Diagonal, "unitwise": UnitWise, "layer": LayerBlock}


class CurvatureEstimate:
    """Per-module curvature representations of a model (see :func:`compute_curvature`).

    Attributes:
        layers: ``{module name: Representation}``; e.g. ``layers['fc'].A``/``.G`` (kron), ``.D`` (diag:
            ``{param name: tensor}``), ``.F`` (unitwise/layer).
    """

    def __init__(self, layers: dict[str, Representation], representation: str) -> None:
        self.layers, self.representation = layers, representation

    def __getitem__(self, name: str) -> Representation:
        return self.layers[name]

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Curvature times per-parameter vectors keyed by full parameter name (``'fc.weight'``)."""
        out = {}
        for mname, rep in self.layers.items():
            local = {p: vecs[f"{mname}.{p}" if mname else p] for p in rep.params}
            for p, v in rep.mvp(local).items():
                out[f"{mname}.{p}" if mname else p] = v
        return out

    def quadratic(self, deltas: dict[str, Tensor]) -> Tensor:
        """``Σ_l Δθ_l^T C_l Δθ_l`` (e.g. EWC's penalty is half of it)."""
        return sum((v * deltas[k]).sum() for k, v in self.mvp(deltas).items())

    def state_dict(self) -> dict[str, Any]:
        return {"representation": self.representation,
                "layers": {name: rep.state_dict() for name, rep in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["representation"] != self.representation:
            raise ValueError(f"state holds {state['representation']!r}, not {self.representation!r}")
        for name, rep in self.layers.items():
            rep.load_state_dict(state["layers"][name])


def compute_curvature(model: nn.Module, loss_fn: nn.Module, data: Iterable[tuple[Tensor, Tensor]], *,
                      representation: str = "kron", fisher_type: str = "exact", n_mc_samples: int = 1,
                      ignore_modules: Iterable[Any] = (), seed: int = 0) -> CurvatureEstimate:
    """Average a curvature representation of ``model`` over batches of ``data`` (buffers left unchanged).

    .. math:: C = \\frac1B \\sum_{b} C_b, \\quad C_b = \\sum_k J_b^\\top v_k v_k^\\top J_b

    in the chosen structure.

    Args:
        model: the model.
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (mean).
        data: iterable of ``(inputs, targets)`` batches (a single tuple in a list is fine).
        representation: ``kron`` (K-FAC; unit-wise for norm layers), ``diag``, ``unitwise`` or ``layer``.
        fisher_type: ``exact`` (= GGN), ``mc`` or ``emp``.
        n_mc_samples: Monte-Carlo samples (``mc``).
        ignore_modules: modules to leave out.
        seed: seed of the sampling generator.

    Returns:
        A :class:`CurvatureEstimate`; parameters' ``.grad`` are not touched.
    """
    if representation not in _REPRESENTATIONS:
        raise ValueError(f"Unknown representation {representation!r}; choose from {sorted(_REPRESENTATIONS)}")
    ftype = parse_fisher_type(fisher_type)
    inner = unwrap(model)
    types = SUPPORTED_TYPES if representation != "kron" else (*KRON_TYPES, nn.Embedding, *NORM_TYPES)
    modules = select_modules(inner, types, ignore_modules, "error", f"compute_curvature({representation!r})")
    layers = {name: _REPRESENTATIONS[representation](name, m) for name, m in modules.items()}
    gen: torch.Generator | None = None
    n_batches = 0
    for inputs, targets in data:
        with LayerCapture(modules) as cap:
            logits = forward_keep_buffers(inner, inputs)
            if gen is None:
                gen = torch.Generator(device=logits.device)
                gen.manual_seed(seed)
            cap.backward_to_outputs(logits, output_sqrt(loss_fn, logits, targets, ftype, n_samples=n_mc_samples,
                                                        generator=gen))
        # running mean over batches: decay = b/(b+1) keeps (1/B) Σ_b C_b
        decay = n_batches / (n_batches + 1)
        for name, rep in layers.items():
            rep.update(cap.batch(name, inputs.shape[0]), decay)
        n_batches += 1
    if n_batches == 0:
        raise ValueError("data yielded no batch")
    return CurvatureEstimate(layers, representation)
