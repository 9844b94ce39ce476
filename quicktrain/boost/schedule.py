"""NetBooster's training schedule as a :class:`quicktrain.train.hooks.ModelTransform`.

Over a run of :math:`T` optimizer steps (the expansion-then-contraction schedule of Yu et al., 2023):

1. ``before_training``: expand the tiny network into the giant (:func:`quicktrain.boost.expand`);
2. steps with :math:`t < t_\\text{start}`: train the giant (PLT slope :math:`\\alpha = 0`, ReLU blocks);
3. :math:`t_\\text{start} \\le t < t_\\text{end}`: Progressive Linearization Tuning, :math:`\\alpha(t)` rises
   linearly from 0 to 1 (:func:`quicktrain.boost.plt_slope`), set at the start of every step (or epoch);
4. the first step with :math:`\\alpha(t) = 1`: contract the giant exactly (:func:`quicktrain.boost.contract`)
   and hand the tiny network back to the loop, which builds a new optimizer for it;
5. the remaining steps fine-tune the tiny network (``finetune_fraction`` of the run); ``after_training``
   contracts if that has not happened yet (e.g. ``plt_end = 1``).

Times :math:`t` are fractions of the run (``unit="fraction"``, default), optimizer steps (``"step"``) or
epochs (``"epoch"``, needs ``steps_per_epoch``). ``update="epoch"`` changes the slope only at epoch starts.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from quicktrain.train.hooks import unwrap

from .contract import contract
from .expand import ExpansionPlan, LayerSelection, expand, is_giant, plan_expansion
from .plt import PLTActivation, plt_activations, plt_slope

logger = logging.getLogger(__name__)

_UNITS = ("fraction", "step", "epoch")
_UPDATES = ("step", "epoch")


class BoostTransform:
    """Expand, train, linearise (PLT), contract and fine-tune, driven by the training loop.

    Args:
        ratio: expansion ratio :math:`r` of the inserted blocks.
        depth: blocks inserted after each expanded layer.
        layers: which layers to expand (see :func:`quicktrain.boost.plan_expansion`); ``None`` = all eligible.
        plt_start: when linearisation starts (slope leaves 0). Default 0.2 (fraction).
        plt_end: when the slope reaches 1 and the giant is contracted. Default ``1 - finetune_fraction``
            if that is given, else 0.5 (fractions): the tiny network gets the second half of the run. Chosen on
            validation accuracy (``benchmarks/boost_schedule.py``): linearisation costs the giant most of its
            lead, and a tiny network contracted at 80% of one cosine schedule, left the last 20% at under 10% of
            the peak learning rate, ends below vanilla training; contracted at 50% it ends above it.
        finetune_fraction: fraction of the run left to fine-tune the tiny network; only with
            ``unit="fraction"``; must agree with ``plt_end`` if both are given.
        unit: unit of ``plt_start``/``plt_end``: ``"fraction"`` of total steps, ``"step"`` or ``"epoch"``.
        steps_per_epoch: optimizer steps per epoch (for ``unit="epoch"`` or ``update="epoch"``).
        update: ``"step"`` (slope changes every step) or ``"epoch"`` (slope held constant within an epoch).
        zero_init: start the blocks as identities (the giant starts as the tiny network's function).
        linear: the ablation without the non-linear phase: the slope is 1 from the first step (the blocks are
            affine, linear over-parameterisation as in ExpandNets and RepVGG-style re-parameterisation) and the
            giant is still contracted at ``plt_end``; ``plt_start`` is then unused.
        verbose: print the expansion plan (expanded / skipped layers with reasons) and the contraction step
            (rank 0 only under ``torchrun``); they are logged to ``quicktrain.boost`` either way.

    Example:
        >>> t = BoostTransform(ratio=2, plt_start=0.5, plt_end=0.75)
        >>> [round(t.slope_at(s, 100), 6) for s in (0, 50, 60, 75)]
        [0.0, 0.0, 0.4, 1.0]
    """

    def __init__(
        self,
        *,
        ratio: float = 4,
        depth: int = 1,
        layers: LayerSelection = None,
        plt_start: float = 0.2,
        plt_end: float | None = None,
        finetune_fraction: float | None = None,
        unit: str = "fraction",
        steps_per_epoch: int | None = None,
        update: str = "step",
        zero_init: bool = True,
        linear: bool = False,
        verbose: bool = True,
    ) -> None:
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"expansion ratio must be a positive number (e.g. 1.5 or 4), got {ratio!r}")
        if not (isinstance(depth, int) and depth >= 1):
            raise ValueError(f"expansion depth must be an integer >= 1, got {depth!r}")
        if unit not in _UNITS:
            raise ValueError(f"Unknown PLT unit {unit!r}; choose from {list(_UNITS)}")
        if update not in _UPDATES:
            raise ValueError(f"Unknown PLT update {update!r}; choose from {list(_UPDATES)}")
        if (unit == "epoch" or update == "epoch") and not (steps_per_epoch and steps_per_epoch > 0):
            raise ValueError(f"unit/update 'epoch' needs steps_per_epoch > 0, got {steps_per_epoch}")
        if finetune_fraction is not None:
            if unit != "fraction":
                raise ValueError("finetune_fraction needs unit='fraction'; set plt_end in your unit instead")
            if not 0.0 <= finetune_fraction <= 1.0:
                raise ValueError(f"finetune_fraction must be in [0, 1], got {finetune_fraction}")
            if plt_end is not None and not math.isclose(plt_end, 1.0 - finetune_fraction):
                raise ValueError(
                    f"plt_end={plt_end} and finetune_fraction={finetune_fraction} disagree "
                    "(contraction at plt_end leaves 1 - plt_end to fine-tune); give only one of them"
                )
            plt_end = 1.0 - finetune_fraction
        if plt_end is None:
            plt_end = 0.5
        if unit == "fraction" and not 0.0 <= plt_start <= plt_end <= 1.0:
            raise ValueError(f"need 0 <= plt_start <= plt_end <= 1 (fractions), got {plt_start}, {plt_end}")
        if not 0 <= plt_start <= plt_end:
            raise ValueError(f"need 0 <= plt_start <= plt_end, got plt_start={plt_start}, plt_end={plt_end}")
        self.ratio, self.depth, self.layers, self.zero_init = ratio, depth, layers, zero_init
        self.linear = linear
        self.verbose = verbose
        self.plt_start, self.plt_end, self.unit = float(plt_start), float(plt_end), unit
        self.steps_per_epoch, self.update = steps_per_epoch, update
        self.plan: ExpansionPlan | None = None
        self.slope = 0.0
        self.contracted_at: int | None = None
        self._acts: tuple[nn.Module, list[PLTActivation]] | None = None

    # ---- schedule (pure) -------------------------------------------------------------------------------
    def time_at(self, step: int, total_steps: int) -> float:
        """Time of ``step`` in this schedule's unit (quantised to epoch starts when ``update="epoch"``)."""
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if self.update == "epoch":
            step = (step // self.steps_per_epoch) * self.steps_per_epoch
        if self.unit == "fraction":
            return step / total_steps
        if self.unit == "epoch":
            return step / self.steps_per_epoch
        return float(step)

    def slope_at(self, step: int, total_steps: int) -> float:
        """PLT slope at the start of ``step`` (0-based) of ``total_steps`` (always 1 with ``linear=True``)."""
        if self.linear:
            return 1.0
        return plt_slope(self.time_at(step, total_steps), self.plt_start, self.plt_end)

    @property
    def contracted(self) -> bool:
        """Whether the giant has been contracted back into the tiny network."""
        return self.contracted_at is not None

    # ---- ModelTransform protocol -----------------------------------------------------------------------
    def before_training(self, model: nn.Module) -> nn.Module:
        """Expand the tiny network into the giant (blocks at slope 0, identity-initialised by default)."""
        inner = unwrap(model)
        if is_giant(inner):
            raise ValueError("before_training got a model that is already expanded; pass the tiny network")
        self.plan = plan_expansion(inner, self.layers)
        giant = expand(inner, ratio=self.ratio, depth=self.depth, zero_init=self.zero_init, plan=self.plan)
        self._say(f"boost: {self.plan.summary()}")
        self._set_slope(giant, self.slope, force=True)
        return giant

    def on_step_start(self, model: nn.Module, step: int, total_steps: int) -> nn.Module:
        """Set the PLT slope for ``step``; contract (returning the tiny network) from ``plt_end`` on.

        Without ``linear`` the slope reaches 1 exactly at ``plt_end`` (:func:`plt_slope`), so the giant is
        contracted at the first step with slope 1."""
        if self.contracted:
            return model
        inner = unwrap(model)
        if not is_giant(inner):
            raise RuntimeError("BoostTransform.on_step_start got a model without NetBooster blocks; "
                               "call before_training first and train the model it returns")
        self._set_slope(inner, self.slope_at(step, total_steps))
        if self.time_at(step, total_steps) < self.plt_end:
            return model
        return self._contract(inner, step)

    def after_training(self, model: nn.Module) -> nn.Module:
        """Contract if the schedule has not done so yet (sets any slope still below 1 to 1, with a warning)."""
        if self.contracted:
            return model
        inner = unwrap(model)
        if self.slope < 1.0:
            logger.warning("boost: training ended at PLT slope %.3f < 1 (the PLT window ends with the run, or the "
                           "run is too short to reach plt_end=%g); setting it to 1 before contracting changes the "
                           "function - choose plt_end before the last step to fine-tune after contraction",
                           self.slope, self.plt_end)
        self._set_slope(inner, 1.0)
        return self._contract(inner, -1)

    def rebuild(self, model: nn.Module) -> nn.Module:
        """On resume: the freshly expanded giant, contracted if the saved run had contracted (weights get
        overwritten by the loop), else with the saved slope."""
        inner = unwrap(model)
        if not is_giant(inner):
            raise ValueError("rebuild expects the model returned by before_training (the giant)")
        if self.contracted:
            self._set_slope(inner, 1.0, force=True)
            self._acts = None
            return contract(inner)
        self._set_slope(inner, self.slope, force=True)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"slope": self.slope, "contracted_at": self.contracted_at, "config": self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"slope", "contracted_at", "config"} - set(state)
        if missing:
            raise ValueError(f"BoostTransform state lacks {sorted(missing)}")
        if state["config"] != self._config():
            raise ValueError(f"BoostTransform config differs from the checkpoint's: {state['config']} saved, "
                             f"{self._config()} now; resume with the same --boost options")
        self.slope = float(state["slope"])
        self.contracted_at = state["contracted_at"]

    # ---- helpers ---------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        layers = self.layers if self.layers is None or callable(self.layers) else list(self.layers)
        return {
            "ratio": self.ratio, "depth": self.depth, "plt_start": self.plt_start, "plt_end": self.plt_end,
            "unit": self.unit, "steps_per_epoch": self.steps_per_epoch, "update": self.update,
            "zero_init": self.zero_init, "linear": self.linear,
            "layers": layers if not callable(layers) else "<callable>",
        }

    def _set_slope(self, giant: nn.Module, slope: float, *, force: bool = False) -> None:
        fresh = force or self._acts is None or self._acts[0] is not giant
        if fresh:
            self._acts = (giant, list(plt_activations(giant).values()))
        if fresh or slope != self.slope:  # touch the buffers only when the slope changes (no CUDA syncs)
            for act in self._acts[1]:
                act.set(slope)
        self.slope = slope

    def _contract(self, giant: nn.Module, step: int) -> nn.Module:
        tiny = contract(giant)
        self.contracted_at = step
        self._acts = None
        logger.info("boost: contracted the giant at step %d (PLT slope 1)", step)
        self._say(f"boost: contracted the giant at step {step} (PLT slope 1); "
                  f"{'fine-tuning the tiny network' if step >= 0 else 'training is over'}")
        return tiny

    def _say(self, text: str) -> None:
        if self.verbose and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            print(text, flush=True)


__all__ = ["BoostTransform"]
