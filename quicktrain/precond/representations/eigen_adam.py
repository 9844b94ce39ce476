"""Adam in the eigenbasis of the K-FAC factors: SOAP's solver (Vyas et al., "SOAP: Improving and Stabilizing
Shampoo using Adam", 2024, Algorithm 3) on K-FAC's curvature (Martens & Grosse, 2015).

For a Linear/Conv2d with K-FAC factors ``A = Q_A Λ_A Q_Aᵀ`` (inputs, bias column appended) and
``G = Q_G Λ_G Q_Gᵀ`` (output gradients), the gradient matrix ``g = [∇W, ∇b]`` is rotated into the Kronecker
eigenbasis, normalised there by the running root mean square of its rotated coordinates, and rotated back:

.. math::
    g' = Q_G^\\top g\\, Q_A, \\qquad v \\leftarrow \\beta_2 v + (1-\\beta_2)\\, g'^2, \\qquad
    \\Delta W = Q_G \\frac{g'}{\\sqrt{v/(1-\\beta_2^t)} + \\epsilon} Q_A^\\top

By default (``beta1 = 0``) only the second moment is kept here, and the momentum is left to the ``torch.optim``
optimizer that applies ``ΔW`` (SGD with momentum: LaProp's order, Ziyin et al. 2020, momentum of the
normalised steps; heavyball's ``SOLP`` is SOAP in that order, its momentum in the rotated basis). Why: every
maker leaves a gradient for any optimizer to apply, and a first moment kept inside would be a second momentum
under SGD-momentum or Adam; a momentum kept in the parameter basis also needs no re-projection when the basis
changes. ``beta1 > 0`` keeps Adam's first moment ``m`` of ``g'`` as SOAP does (numerator ``m̂`` instead of
``g'``; apply the result with momentum-free SGD), rotated exactly into a refreshed basis,
``m ← Q_{G,new}ᵀ Q_{G,old} m Q_{A,old}ᵀ Q_{A,new}``. The second moment, which lives in the basis, is
re-projected when the basis is refreshed (:func:`~quicktrain.precond._math.reproject_second_moment`).

How this differs from EKFAC (George et al., 2018), which keeps the same eigenbasis: EKFAC divides ``g'`` by the
Fisher's second moment of the per-example gradients plus a damping, ``g'/(S + λ)`` (a natural gradient);
here ``g'`` is divided by the square root of the running second moment of the mini-batch gradient itself,
``g'/√v``, Adam's per-coordinate step, which is what SOAP does in Shampoo's eigenbasis. The damping has
no role: the eigenvectors of ``A + λI`` are those of ``A``, and Adam's ``ε`` bounds the step.

A factor whose dimension exceeds ``max_dim`` is not computed and its side keeps the identity basis (SOAP's
``max_precond_dim`` rule: an ``eigh`` of a ``d × d`` matrix costs ``O(d³)``, the rotations ``O(d²)`` per row).
Normalisation layers, which have no Kronecker structure, get Adam in the parameter basis (SOAP's
``precondition_1d=False``), and an Embedding rotates its output side only (its input factor is diagonal).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from quicktrain.precond._math import adam_direction, eigh_float64, reproject_second_moment, rotate
from quicktrain.precond.capture import LayerBatch
from quicktrain.precond.representations.base import Representation
from quicktrain.precond.representations.kron import (
    KronEmbedding,
    KronFactored,
    kron_dims,
    kron_grad_matrix,
    kron_set_grad,
)

__all__ = ["EmbeddingEigenAdam", "KronEigenAdam", "ParamAdam", "check_adam"]


def check_adam(beta1: float, beta2: float, eps: float, max_dim: int = 1) -> None:
    """Raise ``ValueError`` naming the bad value of Adam's ``β₁``, ``β₂``, ``ε`` or the largest rotated dimension."""
    for key, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {beta}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not isinstance(max_dim, int) or max_dim < 1:
        raise ValueError(f"max_dim must be an integer >= 1, got {max_dim!r}")


class _AdamSettings:
    """Adam's checked ``β₁``, ``β₂``, ``ε`` and the count of moment updates, shared by every representation here."""

    def _init_adam(self, beta1: float, beta2: float, eps: float, max_dim: int = 1) -> None:
        check_adam(beta1, beta2, eps, max_dim)
        self.beta1, self.beta2, self.eps, self.adam_step = beta1, beta2, eps, 0


def _basis(factor: Tensor | None) -> Tensor | None:
    """Eigenvectors of a symmetric factor (float64 ``eigh``), None for a side kept in the identity basis."""
    return None if factor is None else eigh_float64(factor)[1]


class _EigenAdam(_AdamSettings):
    """The solver state shared by the rotated representations: the bases ``QL`` (left, the output side) and
    ``QR`` (right, the input side; None: identity), the first and second moments ``M`` (None with
    ``beta1 = 0``) and ``V`` of the rotated gradient and the number of their updates ``adam_step``."""

    QL: Tensor | None
    QR: Tensor | None
    M: Tensor | None
    V: Tensor | None
    adam_step: int

    def _refresh(self, ql: Tensor | None, qr: Tensor | None) -> None:
        if self.V is not None:  # the second moment follows its coordinates into the new basis
            self.V = reproject_second_moment(self.V, (self.QL, self.QR), (ql, qr))
        if self.M is not None:  # the first moment is a matrix in the basis: rotated exactly
            self.M = rotate(rotate(self.M, self.QL, self.QR, back=True), ql, qr)
        self.QL, self.QR = ql, qr

    def _step(self, mat: Tensor) -> Tensor:
        d, self.M, self.V = adam_direction(rotate(mat, self.QL, self.QR), self.M, self.V, self.adam_step,
                                           self.beta1, self.beta2, self.eps)
        self.adam_step += 1
        return rotate(d, self.QL, self.QR, back=True)

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError("kfac_soap's solver is Adam's: it has no curvature matrix to multiply by")


class KronEigenAdam(_EigenAdam, KronFactored):
    """Adam in the eigenbasis of a Linear/Conv2d's K-FAC factors, per group (see the module docstring):
    ``QL = Q_G``, ``QR = Q_A``.

    The factors are :class:`~quicktrain.precond.representations.kron.KronFactored`'s (``bias``,
    ``weight_sharing`` and ``statistics_fraction`` as there); the eigenbases are refreshed on inverse steps.
    ``bias="separate"``: the bias's input factor is the constant 1, so its column keeps the identity on the
    right (``Q_A ⊕ 1``) and is rotated by ``Q_G`` only.

    Args:
        name: module name.
        module: ``nn.Linear`` (attention projections included) or ``nn.Conv2d``.
        beta1: ``β₁`` of the first moment (0: none, the optimizer's momentum applies).
        beta2: ``β₂`` of the second moment.
        eps: ``ε``.
        max_dim: a factor of a larger dimension is not kept and its side is not rotated.
        bias, weight_sharing, statistics_fraction: as in ``KronFactored``.
    """

    _state = ("A", "G", "QL", "QR", "M", "V", "adam_step")
    UA = None  # KronFactored's low-rank rows, read by its input-factor update: never kept here

    def __init__(self, name: str, module: nn.Module, beta1: float = 0.0, beta2: float = 0.95, eps: float = 1e-8,
                 max_dim: int = 2048, bias: str = "augment", weight_sharing: str = "expand",
                 statistics_fraction: float = 1.0) -> None:
        super().__init__(name, module, bias=bias, weight_sharing=weight_sharing, low_rank=False,
                         statistics_fraction=statistics_fraction)
        self._init_adam(beta1, beta2, eps, max_dim)
        d_out, d_in = kron_dims(module, with_bias=not self.separate)
        self.rotate_out, self.rotate_in = d_out <= max_dim, d_in <= max_dim

    def update(self, batch: LayerBatch, decay: float) -> None:
        batch = self._statistics_batch(batch)
        if self.rotate_in:
            self._update_input_factor(batch, decay)
        if self.rotate_out:
            self._update_output_factor(batch, decay)

    def update_inverse(self, damping: float) -> None:
        qa = _basis(self.A)
        if qa is not None and self.separate:  # Q_A ⊕ 1: the bias column is not rotated on the right
            qa = F.pad(qa, (0, 1, 0, 1))
            qa[..., -1, -1] = 1.0
        self._refresh(_basis(self.G), qa)

    def precondition(self, damping: float) -> None:
        grads = self.grads()
        kron_set_grad(self.module, self._step(kron_grad_matrix(self.module, grads["weight"], grads.get("bias"))))


class EmbeddingEigenAdam(_EigenAdam, KronEmbedding):
    """Adam in the eigenbasis of an Embedding's output factor ``G``: the weight is ``[V, D]``, so ``QR = Q_G``
    (``g' = g Q_G``), and its input factor is diagonal (token counts), so the rows keep the identity basis,
    ``QL = I``. Factors as in ``KronEmbedding``."""

    _state = ("A", "G", "QR", "M", "V", "adam_step")
    QL = None

    def __init__(self, name: str, module: nn.Module, beta1: float = 0.0, beta2: float = 0.95, eps: float = 1e-8,
                 max_dim: int = 2048) -> None:
        super().__init__(name, module)
        self._init_adam(beta1, beta2, eps, max_dim)
        self.rotate_out = module.embedding_dim <= max_dim

    def update_inverse(self, damping: float) -> None:
        self._refresh(None, _basis(self.G) if self.rotate_out else None)

    def precondition(self, damping: float) -> None:
        self.module.weight.grad = self._step(self.grads()["weight"])


class ParamAdam(_AdamSettings, Representation):
    """Adam in the parameter basis, for layers without Kronecker structure (normalisation layers):
    ``Δθ = g / (√v̂ + ε)`` per parameter (``m̂ / (√v̂ + ε)`` with ``beta1 > 0``). It keeps no curvature."""

    _state = ("M", "V", "adam_step")

    def __init__(self, name: str, module: nn.Module, beta1: float = 0.0, beta2: float = 0.95,
                 eps: float = 1e-8) -> None:
        super().__init__(name, module)
        self._init_adam(beta1, beta2, eps)
        self.M, self.V = {}, {}  # {parameter name: moment}

    def update(self, batch: LayerBatch, decay: float) -> None:
        """No statistics: the second moment is the gradient's, updated in :meth:`precondition`."""

    def update_inverse(self, damping: float) -> None:
        """Nothing to refresh: the basis is the parameters'."""

    def precondition(self, damping: float) -> None:
        for n, g in self.grads().items():
            self.params[n].grad, self.M[n], self.V[n] = adam_direction(g, self.M.get(n), self.V.get(n), self.adam_step,
                                                                       self.beta1, self.beta2, self.eps)
        self.adam_step += 1
