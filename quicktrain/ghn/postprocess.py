"""Diversity of predicted weights, and post-processing them before fine-tuning.

A GHN's predicted filters are less diverse than a random init's: the rows of a predicted weight span fewer
directions (lower effective rank) and more of them are near-copies. Knyazev ("Pretraining a Neural Network
before Knowing Its Architecture", ICML 2022 pre-training workshop) found that predicted parameters "lack the
diversity necessary to successfully fine-tune parameters with gradient descent" and post-processed them
before fine-tuning: orthogonalise every weight except the classifier's (QR of its ``[out, fan_in]`` matrix,
in the tall orientation, signs fixed by ``diag(R)``), and/or add noise; GHN-3 adds only a tiny noise
(``beta = 1e-5``) to break symmetry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _as_matrix(w: Tensor) -> Tensor:
    """``[out, fan_in]`` view of a weight of >= 2 dims (a filter per row), float32 unless it is float64."""
    m = w.detach().reshape(w.shape[0], -1)
    return m if m.dtype == torch.float64 else m.float()


def effective_rank(w: Tensor) -> float:
    """Effective rank of a weight's ``[out, fan_in]`` matrix (Roy & Vetterli, 2007).

    .. math::
        \\operatorname{erank}(W) = \\exp\\Big(-\\sum_i p_i \\log p_i\\Big),\\qquad p_i = \\sigma_i / \\sum_j \\sigma_j

    for the singular values :math:`\\sigma_i`; between 1 (rank one) and ``min(out, fan_in)`` (all equal).
    """
    s = torch.linalg.svdvals(_as_matrix(w))
    p = s / s.sum().clamp_min(1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def distinct_filters(w: Tensor, threshold: float = 0.99) -> float:
    """Fraction of output filters (rows) whose centred cosine similarity to every other row is ``<= threshold``.

    A row counts as a near-copy when some other row has ``cos > threshold`` (after removing each row's mean,
    so a constant offset does not make filters look alike); 1.0 means no two filters are near-copies.
    """
    m = _as_matrix(w)
    if m.shape[0] < 2:
        return 1.0
    m = F.normalize(m - m.mean(1, keepdim=True), dim=1)
    near = (m @ m.t()).fill_diagonal_(0).max(1).values > threshold
    return 1.0 - float(near.float().mean())


def orthogonalize(w: Tensor) -> Tensor:
    """Knyazev (2022)'s post-processing of one weight: the orthogonal factor of its QR, at ``w``'s norm.

    With ``M`` the ``[out, fan_in]`` matrix transposed when it is wide (so ``M`` is tall), ``M = QR`` and
    ``Q <- Q diag(sign(diag R))`` (the unique QR with a positive diagonal, so the result depends on ``w`` only).
    ``Q`` spans the same subspace as ``M`` (the predicted filters' span, or their input directions), with
    every singular value equal: the effective rank is maximal. Unlike the paper, the result is scaled to
    ``||w||_F``: a layer not followed by a normalisation keeps the predicted scale of its output.
    """
    m = _as_matrix(w)
    wide = m.shape[0] < m.shape[1]
    q, r = torch.linalg.qr(m.t() if wide else m)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    q = q.t() if wide else q
    scale = m.norm() / math.sqrt(min(m.shape))  # ||Q||_F^2 = min(out, fan_in)
    return (q * scale).reshape(w.shape).to(w.dtype)


def flatten_spectrum(w: Tensor, alpha: float) -> Tensor:
    r"""Move a weight's singular values toward their mean, keeping its singular vectors and its norm.

    .. math::
        M = U\,\mathrm{diag}(\sigma)\,V^\top,\qquad
        M' = c\,U\,\mathrm{diag}\big((1-\alpha)\,\sigma + \alpha\,\bar\sigma\big)\,V^\top,\qquad
        \bar\sigma = \|\sigma\|_2 / \sqrt{k}

    with ``c`` such that ``||M'||_F = ||M||_F``. ``alpha = 0`` is ``w``; ``alpha = 1`` is the polar factor
    ``U V^T`` at ``w``'s norm (the orthogonal matrix nearest to ``w``, all singular values equal, the effective
    rank maximal). In between, the directions the prediction uses most keep their order and the weak ones are
    lifted: more diversity with the predicted filters' directions unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    m = _as_matrix(w)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    s2 = (1 - alpha) * s + alpha * s.norm() / math.sqrt(len(s))
    s2 = s2 * s.norm() / s2.norm().clamp_min(1e-30)
    return ((u * s2) @ vh).reshape(w.shape).to(w.dtype)


__all__ = ["distinct_filters", "effective_rank", "flatten_spectrum", "orthogonalize"]
