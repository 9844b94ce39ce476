"""Knowledge distillation (Hinton et al., 2015), the usual baseline for NetBooster: giant teaches tiny.

The student minimises

.. math::

    \\mathcal{L} = (1 - \\lambda)\\, \\ell(s, y) + \\lambda\\, T^2\\,
        \\mathrm{KL}\\big(\\operatorname{softmax}(t / T) \\,\\|\\, \\operatorname{softmax}(s / T)\\big)

with student logits :math:`s`, teacher logits :math:`t` (teacher frozen, eval mode), temperature :math:`T`
and the loop's hard-label loss :math:`\\ell` (cross-entropy); the :math:`T^2` keeps gradient scales
comparable across temperatures (Hinton et al., 2015, Sec. 2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quicktrain.train.hooks import GradientMaker, GradientMakerFactory


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    hard_loss: nn.Module | None = None,
) -> Tensor:
    """The KD loss :math:`(1-\\lambda)\\ell(s, y) + \\lambda T^2 \\mathrm{KL}(p_t^T \\| p_s^T)`, batch mean.

    Args:
        student_logits: ``[N, K]``.
        teacher_logits: ``[N, K]`` (no gradient flows into them).
        targets: ``[N]`` class indices.
        temperature: :math:`T > 0`.
        alpha: weight :math:`\\lambda \\in [0, 1]` of the soft term.
        hard_loss: :math:`\\ell`; cross-entropy if ``None``.

    Returns:
        Scalar loss.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; both models must predict the same classes")
    hard = hard_loss(student_logits, targets) if hard_loss is not None else F.cross_entropy(student_logits, targets)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
    return (1.0 - alpha) * hard + alpha * soft


class DistillationGradients:
    """Gradient maker that trains ``model`` (student) on :func:`distillation_loss` against ``teacher``.

    Follows :class:`quicktrain.train.hooks.GradientMaker`: ``forward_backward`` leaves the student's gradient
    in ``p.grad`` and returns the detached ``(loss, student_logits)``. The teacher is frozen and run in eval
    mode under ``no_grad`` on the student's device.
    """

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, teacher: nn.Module, *, temperature: float = 4.0,
        alpha: float = 0.9,
    ) -> None:
        self.model, self.loss_fn, self.teacher = model, loss_fn, teacher
        self.temperature, self.alpha = temperature, alpha
        param = next(model.parameters(), None)
        if param is not None:
            self.teacher.to(param.device)
        self.teacher.eval().requires_grad_(False)

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        logits = self.model(inputs)
        loss = distillation_loss(logits, teacher_logits, targets, temperature=self.temperature,
                                 alpha=self.alpha, hard_loss=self.loss_fn)
        loss.backward()
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state != self.state_dict():
            raise ValueError(f"distillation settings differ from the checkpoint's: {state} vs {self.state_dict()}")


def distillation(teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.9) -> GradientMakerFactory:
    """A :data:`~quicktrain.train.hooks.GradientMakerFactory` distilling ``teacher`` into the loop's model.

    Example:
        >>> hooks = Hooks(gradients=distillation(trained_giant))  # doctest: +SKIP
    """
    distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                      temperature=temperature, alpha=alpha)  # validate the settings now, not at step 0

    def factory(model: nn.Module, loss_fn: nn.Module) -> GradientMaker:
        return DistillationGradients(model, loss_fn, teacher, temperature=temperature, alpha=alpha)

    return factory


__all__ = ["DistillationGradients", "distillation", "distillation_loss"]
