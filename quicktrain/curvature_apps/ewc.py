"""Elastic weight consolidation (EWC) from precond's curvature: train on a new task, protect an old one.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017, eq. 3:

.. math:: \\mathcal L(\\theta) = \\mathcal L_B(\\theta) + \\frac\\lambda2 (\\theta - \\theta^*_A)^\\top F_A
    (\\theta - \\theta^*_A)

with ``θ*_A`` the weights at the end of task A and ``F_A`` its Fisher, here in any structure of
:func:`quicktrain.precond.compute_curvature` (``diag`` is the paper's ``Σ_i F_i (θ_i - θ*_i)²``; ``kron`` is
K-FAC's ``A ⊗ G`` per layer, as in Ritter et al., NeurIPS 2018; ``unitwise`` keeps per-unit blocks). The
curvature is the mean per-example Fisher of the batch-mean loss, so ``λ`` does not depend on the data set size.

From the command line: ``quicktrain train --classes 5-9 --consolidate RUN_DIR`` continues from the finished
run in ``RUN_DIR`` (its weights, via :func:`run_initializer`) with the penalty added to the loss, through
:func:`consolidation_hooks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quicktrain.curvature_apps.run_data import load_run, read_model_checkpoint, task_batches
from quicktrain.precond import (
    CurvatureEstimate,
    CurvatureGradients,
    PlainGradients,
    ShampooGradients,
    compute_curvature,
)
from quicktrain.train import CheckpointError
from quicktrain.train.hooks import AutogradGradients, GradientMaker, GradientMakerFactory, Initializer, unwrap

__all__ = ["ConsolidatedGradients", "EWCPenalty", "consolidated", "consolidation_hooks", "run_initializer"]

EWC_REPRESENTATIONS = ("diag", "kron", "unitwise")

# Makers whose forward_backward accumulates into p.grad (loss.backward()) before transforming it, so a
# gradient already in p.grad is treated as part of the loss's gradient (and preconditioned with it).
ACCUMULATING_MAKERS = (AutogradGradients, PlainGradients, CurvatureGradients, ShampooGradients)


class EWCPenalty:
    """``½ λ (θ - θ*)ᵀ F (θ - θ*)`` for the parameters that ``estimate`` covers (see the module docstring).

    The estimate's tensors are used through :meth:`CurvatureEstimate.quadratic` only, so the penalty applies
    to any model with the same parameter names and shapes (e.g. a fresh copy trained on the next task).

    Args:
        estimate: curvature of the old task at ``anchor``.
        anchor: ``θ*``: ``{full parameter name: tensor}`` of every parameter the estimate covers.
    """

    def __init__(self, estimate: CurvatureEstimate, anchor: dict[str, Tensor]) -> None:
        covered = {f"{m}.{p}" if m else p for m, rep in estimate.layers.items() for p in rep.params}
        missing = covered - set(anchor)
        if missing:
            raise ValueError(f"anchor lacks parameters {sorted(missing)} that the curvature covers")
        self.estimate = estimate
        self.anchor = {k: anchor[k].detach().clone() for k in sorted(covered)}

    @classmethod
    def from_model(cls, model: nn.Module, estimate: CurvatureEstimate) -> EWCPenalty:
        """Anchor the penalty at ``model``'s current parameters."""
        return cls(estimate, dict(unwrap(model).named_parameters()))

    @classmethod
    def from_run(cls, run_dir: str | Path, *, representation: str = "diag", batches: int | None = 32,
                 batch_size: int | None = None, fisher: str = "exact", seed: int = 0) -> EWCPenalty:
        """The penalty of a finished run: its final weights and their Fisher on the run's own task data.

        Args:
            run_dir: the ``--out`` folder of a finished ``quicktrain train`` run.
            representation: ``diag``, ``kron`` or ``unitwise``.
            batches: training batches to average the curvature over (None: the whole training split).
            batch_size: their size (default: the run's batch size).
            fisher: ``exact`` (the true Fisher of the model's predictive distribution, in closed form),
                ``mc`` (one sampled label per example, the paper's estimator) or ``emp`` (observed labels).
            seed: order of the batches and Monte-Carlo samples.
        """
        if representation not in EWC_REPRESENTATIONS:
            raise ValueError(f"Unknown EWC representation {representation!r}; choose from {list(EWC_REPRESENTATIONS)}")
        run = load_run(run_dir)
        size = batch_size or int(run.config.get("batch_size", 64))
        batch_list = task_batches(run, batches=batches, batch_size=size, seed=seed)
        estimate = compute_curvature(run.model, nn.CrossEntropyLoss(), batch_list, representation=representation,
                                     fisher_type=fisher, seed=seed)
        return cls.from_model(run.model, estimate)

    def __call__(self, model: nn.Module, strength: float = 1.0) -> Tensor:
        """``½ λ Σ_l Δθ_lᵀ F_l Δθ_l`` with ``Δθ = θ - θ*`` at ``model``'s parameters (differentiable)."""
        params = dict(unwrap(model).named_parameters())
        bad = [k for k, a in self.anchor.items() if k not in params or params[k].shape != a.shape]
        if bad:
            raise ValueError(f"model parameters {bad} are missing or have other shapes than the consolidated "
                             "run's; train the same --model on the same input shape")
        device = next(iter(params.values())).device
        if next(iter(self.anchor.values())).device != device:
            self.to(device)
        with torch.autocast(device.type, enabled=False):
            deltas = {k: params[k] - a for k, a in self.anchor.items()}
            return 0.5 * strength * self.estimate.quadratic(deltas)

    def to(self, device: torch.device | str) -> EWCPenalty:
        """Move the anchor and the curvature tensors to ``device`` (in place); returns ``self``."""
        device = torch.device(device)
        self.anchor = {k: v.to(device) for k, v in self.anchor.items()}
        for rep in self.estimate.layers.values():
            rep.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": dict(self.anchor), "curvature": self.estimate.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load the anchor and curvature of a penalty of the same model and representation."""
        if set(state["anchor"]) != set(self.anchor):
            raise ValueError(f"state anchors {sorted(state['anchor'])}, this penalty {sorted(self.anchor)}")
        device = next(iter(self.anchor.values())).device
        self.estimate.load_state_dict(state["curvature"])
        self.anchor = {k: v.detach() for k, v in state["anchor"].items()}
        self.to(device)


class ConsolidatedGradients:
    """A gradient maker that adds ``penalty(model, strength)`` to the task loss before ``base`` transforms it.

    ``forward_backward`` first writes ``∇ penalty`` into each ``p.grad`` (with ``torch.autograd.grad``, outside any
    DDP hook), then runs ``base.forward_backward``, whose ``loss.backward()`` accumulates the task gradient onto
    it; a preconditioning base then preconditions the sum, exactly as if the penalty were part of the loss.
    The returned loss is the **task loss only** (what the run logs); the penalty value is in ``last_penalty``.

    Args:
        base: the wrapped maker; one of :data:`ACCUMULATING_MAKERS` (others may overwrite ``p.grad``).
        penalty: the EWC penalty.
        strength: ``λ``.
    """

    def __init__(self, base: GradientMaker, penalty: EWCPenalty, strength: float) -> None:
        if not isinstance(base, ACCUMULATING_MAKERS):
            raise TypeError(f"{type(base).__name__} does not accumulate into p.grad, so the EWC gradient would be "
                            "lost; consolidate with plain autograd, precond 'sgd', a curvature method (kfac, ekfac, "
                            "diag_ng, ...) or shampoo")
        if not strength >= 0:
            raise ValueError(f"consolidation strength must be >= 0, got {strength}")
        self.base, self.penalty, self.strength = base, penalty, strength
        self.model: nn.Module = base.model
        self.last_penalty = torch.zeros(())

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        params = dict(unwrap(self.model).named_parameters())
        names = list(self.penalty.anchor)
        value = self.penalty(self.model, self.strength)
        for name, g in zip(names, torch.autograd.grad(value, [params[n] for n in names]), strict=True):
            p = params[name]
            p.grad = g if p.grad is None else p.grad + g
        self.last_penalty = value.detach()
        return self.base.forward_backward(inputs, targets)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "penalty": self.penalty.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.penalty.load_state_dict(state["penalty"])


def consolidated(penalty: EWCPenalty, strength: float,
                 base: GradientMakerFactory = AutogradGradients) -> GradientMakerFactory:
    """A :data:`~quicktrain.train.hooks.GradientMakerFactory` of :class:`ConsolidatedGradients` around ``base``."""

    def factory(model: nn.Module, loss_fn: nn.Module) -> ConsolidatedGradients:
        return ConsolidatedGradients(base(model, loss_fn), penalty, strength)

    return factory


def run_initializer(run_dir: str | Path, *, model_name: str | None = None, dataset: str | None = None) -> Initializer:
    """An initializer that loads a finished run's final weights (``RUN_DIR/model.pt``).

    Args:
        run_dir: the run folder.
        model_name: when given, must equal the run's model.
        dataset: when given, must equal the run's dataset.

    Raises:
        CheckpointError: at once when the model or dataset differ; when called, if the model's parameters or
            input shape differ from the run's.
    """
    ckpt = read_model_checkpoint(run_dir)
    path = Path(run_dir) / "model.pt"
    for what, want, have in (("model", model_name, ckpt["model_name"]), ("dataset", dataset, ckpt["dataset"])):
        if want is not None and want != have:
            raise CheckpointError(f"{path} holds a {what} {have!r}, not {want!r}; continue with --{what} {have}")

    def init(model: nn.Module, example_inputs: Tensor) -> None:
        if list(example_inputs.shape[1:]) != list(ckpt["in_shape"]):
            raise CheckpointError(f"{path} was trained on inputs {ckpt['in_shape']}, this run feeds "
                                  f"{list(example_inputs.shape[1:])}; use the run's --dataset {ckpt['dataset']}")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as error:
            raise CheckpointError(f"{path} does not fit this model ({error}); use the run's --model "
                                  f"{ckpt['model_name']}") from error

    return init


def consolidation_hooks(run_dir: str | Path, *, strength: float, representation: str = "diag",
                        model_name: str | None = None, dataset: str | None = None,
                        base: GradientMakerFactory = AutogradGradients,
                        **curvature: Any) -> tuple[Initializer, GradientMakerFactory]:
    """What ``quicktrain train --consolidate RUN_DIR`` plugs into :class:`~quicktrain.train.Hooks`.

    Args:
        run_dir: the finished run to continue from and protect.
        strength: ``λ`` of the penalty.
        representation: ``diag``, ``kron`` or ``unitwise`` curvature of the run's task.
        model_name: the new run's ``--model`` (checked against the run's).
        dataset: the new run's ``--dataset`` (checked against the run's).
        base: the gradient maker factory to wrap (see :class:`ConsolidatedGradients`).
        **curvature: passed to :meth:`EWCPenalty.from_run` (``batches``, ``batch_size``, ``fisher``, ``seed``).

    Returns:
        ``(initializer, gradient maker factory)`` for ``Hooks(init=..., gradients=...)``.
    """
    init = run_initializer(run_dir, model_name=model_name, dataset=dataset)
    penalty = EWCPenalty.from_run(run_dir, representation=representation, **curvature)
    return init, consolidated(penalty, strength, base)

