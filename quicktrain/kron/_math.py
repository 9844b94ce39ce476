"""Pure tensor functions for Kronecker SGD (Song & Yue, arXiv 2305.08001).

Every quantity of the algorithm is one function here; the stateful trainers in
:mod:`quicktrain.kron.sgd` and :mod:`quicktrain.kron.dense` only call them.

Layout and vec convention
-------------------------
A data point is a Kronecker product of factor vectors, laid out exactly as
``torch.kron``::

    x = torch.kron(u, v),   x[a * d2 + c] = u[a] * v[c],   u in R^{d1}, v in R^{d2}

i.e. ``x`` is the *row-major* flattening of the outer product ``u vᵀ``
(``x = (u[:, None] * v[None, :]).reshape(-1)``). In the column-major ``vec`` of
the matrix-calculus literature this is ``x = vec(v uᵀ)``, and the classical
identity reads

.. math::  (A \\otimes B)\\,\\mathrm{vec}(V) = \\mathrm{vec}(B V A^\\top).

A weight row ``w_r`` in R^{d1 d2} is reshaped row-major to ``W_r`` in R^{d1 x d2}
(``w_r.reshape(d1, d2)``), so that

.. math::  \\langle w_r, u \\otimes v \\rangle = u^\\top W_r v,

and for two data points ``⟨u_i ⊗ v_i, u_j ⊗ v_j⟩ = ⟨u_i, u_j⟩⟨v_i, v_j⟩``.
With K factors the same holds factor by factor (``x = u¹ ⊗ u² ⊗ … ⊗ uᴷ``, first
factor slowest).

Paper equations are written out in each docstring; they are cited by name
(model, loss, gradient, update, Gram identity) rather than by equation number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "gram_matrix",
    "kron_rows",
    "predictions_from_active",
    "preactivations",
    "shifted_relu",
    "squared_loss",
    "update_coefficients",
]


def shifted_relu(z: Tensor, b: float) -> Tensor:
    """Shifted ReLU activation of the paper's two-layer network.

    .. math::  \\sigma_b(z) = \\max(z - b, 0)

    Its derivative (used by SGD) is ``1[z > b]`` (zero at ``z = b``, as in autograd).

    Args:
        z: Pre-activations, any shape.
        b: Threshold ``b >= 0``.

    Returns:
        Tensor of the shape of ``z``.

    Example:
        >>> shifted_relu(torch.tensor([0.5, 2.0]), 1.0)
        tensor([0., 1.])
    """
    return torch.clamp(z - b, min=0)


def kron_rows(factors: Sequence[Tensor]) -> Tensor:
    """Explicit Kronecker data matrix, row ``i`` equal to ``torch.kron(u_i, v_i)``.

    .. math::  x_i = u^{(1)}_i \\otimes u^{(2)}_i \\otimes \\dots \\otimes u^{(K)}_i \\in \\mathbb{R}^{d},
               \\quad d = \\prod_k d_k

    This is the d-dependent object the fast algorithm never builds; it exists for the
    dense reference and for materialising ``W``.

    Args:
        factors: K tensors of shape ``[n, d_k]``.

    Returns:
        Tensor ``[n, d_1 * ... * d_K]``.

    Example:
        >>> u, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
        >>> kron_rows([u, v])
        tensor([[3., 4., 6., 8.]])
    """
    out = factors[0]
    n = out.shape[0]
    for f in factors[1:]:
        out = (out[:, :, None] * f[:, None, :]).reshape(n, -1)
    return out


def gram_matrix(factors: Sequence[Tensor], rows: Tensor | None = None) -> Tensor:
    """Gram matrix of Kronecker data points from the factors only (the tensor trick).

    .. math::  G_{ij} = \\langle x_i, x_j \\rangle
               = \\prod_{k=1}^{K} \\langle u^{(k)}_i, u^{(k)}_j \\rangle,
               \\qquad G = (U^{(1)} U^{(1)\\top}) \\circ \\dots \\circ (U^{(K)} U^{(K)\\top})

    Cost ``O(n^2 sum_k d_k)`` instead of ``O(n^2 d)``.

    Args:
        factors: K tensors of shape ``[n, d_k]``.
        rows: Optional row indices ``[B]``; then only ``G[rows, :]`` is computed.

    Returns:
        Tensor ``[n, n]`` (or ``[B, n]``).
    """
    g = None
    for f in factors:
        left = f if rows is None else f[rows]
        gk = left @ f.T
        g = gk if g is None else g * gk
    assert g is not None
    return g


def preactivations(weight_rows: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Pre-activations of a block of neurons on Kronecker data, without building ``x``.

    .. math::  Z_{ri} = \\langle w_r, u_i \\otimes v_i \\rangle = u_i^\\top W_r v_i

    For K factors, ``W_r`` reshaped to ``[d_1, ..., d_K]`` is contracted with the last factor
    by one matmul for the whole block, ``T = U^{(K)} W_{[r·d_1⋯d_{K-1}], d_K}^\\top``
    (``[n, r·d_1⋯d_{K-1}]``, data point leading), then with each remaining factor by one batched
    matrix-vector product over the data points (``bmm``, no broadcast temporaries). Cost
    ``O(rows * d * n)`` flops, memory ``O(rows * d / d_K * n)``.

    Args:
        weight_rows: ``[r, d]`` rows of ``W`` (row-major ``[d_1, ..., d_K]`` layout).
        factors: K tensors ``[n, d_k]``.

    Returns:
        Tensor ``[r, n]``.
    """
    dims = [f.shape[1] for f in factors]
    r, n = weight_rows.shape[0], factors[0].shape[0]
    t = factors[-1] @ weight_rows.reshape(-1, dims[-1]).T  # [n, r * d_1 ⋯ d_{K-1}]
    for k in range(len(factors) - 2, -1, -1):
        t = torch.bmm(t.view(n, -1, dims[k]), factors[k][:, :, None])  # contract d_k point by point
    return t.view(n, r).T


def predictions_from_active(
    point: Tensor, neuron: Tensor, z: Tensor, a: Tensor, b: float, batch: int, m: int
) -> Tensor:
    """Network output from the activated neurons only.

    .. math::  f(W, x_i, a) = \\frac{1}{\\sqrt{m}} \\sum_{r=1}^{m} a_r \\sigma_b(\\langle w_r, x_i \\rangle)
               = \\frac{1}{\\sqrt{m}} \\sum_{r \\in S_i} a_r (Z_{ri} - b),
               \\quad S_i = \\{r : Z_{ri} > b\\}

    Args:
        point: ``[P]`` position in the batch of each active pair.
        neuron: ``[P]`` neuron index of each active pair.
        z: ``[P]`` pre-activation ``Z[neuron, x]`` of each pair.
        a: ``[m]`` output signs.
        b: Threshold.
        batch: Batch size ``B``.
        m: Width.

    Returns:
        Predictions ``[B]``.
    """
    out = torch.zeros(batch, dtype=z.dtype, device=z.device)
    out.index_add_(0, point, a[neuron] * (z - b))
    return out / math.sqrt(m)


def squared_loss(pred: Tensor, y: Tensor) -> Tensor:
    """Batch squared loss (summed, as in the paper's objective).

    .. math::  L(W) = \\frac{1}{2} \\sum_{i \\in B} (f(W, x_i, a) - y_i)^2

    Args:
        pred: ``[B]`` predictions.
        y: ``[B]`` targets.

    Returns:
        Scalar tensor.
    """
    return 0.5 * ((pred - y) ** 2).sum()


def update_coefficients(residual: Tensor, a_active: Tensor, lr: float, m: int) -> Tensor:
    """Coefficient of ``x_i`` in the SGD update of ``w_r`` for each active pair.

    The gradient of the loss is

    .. math::  \\frac{\\partial L}{\\partial w_r} = \\frac{1}{\\sqrt m} \\sum_{i \\in B}
               (f(W, x_i, a) - y_i)\\, a_r\\, 1[\\langle w_r, x_i\\rangle > b]\\, x_i,

    so ``w_r ← w_r − η ∂L/∂w_r = w_r + Σ_i c_{ri} x_i`` with

    .. math::  c_{ri} = -\\frac{\\eta}{\\sqrt m} a_r (f(W, x_i, a) - y_i)\\, 1[Z_{ri} > b].

    The pre-activations then move through the Gram matrix,
    ``Z_{rj} ← Z_{rj} + Σ_{i∈B} c_{ri} G_{ij}``.

    Args:
        residual: ``[P]`` residual ``f_i - y_i`` of each active pair's data point.
        a_active: ``[P]`` output sign of each active pair's neuron.
        lr: Step size ``η``.
        m: Width.

    Returns:
        ``[P]`` coefficients ``c_{ri}``.
    """
    return (-lr / math.sqrt(m)) * a_active * residual
