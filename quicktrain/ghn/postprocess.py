"""Diversity of predicted weights, dead units, and post-processing predicted networks before fine-tuning.

A GHN's predicted filters can be less diverse than a random init's: the rows of a predicted weight span fewer
directions (lower effective rank) and, when a decoded chunk is tiled, many are near-copies. Knyazev
("Pretraining a Neural Network before Knowing Its Architecture", ICML 2022 pre-training workshop) found
that predicted parameters "lack the diversity necessary to successfully fine-tune parameters with gradient
descent" and post-processed them before fine-tuning: orthogonalise every weight except the classifier's
(QR of its ``[out, fan_in]`` matrix, in the tall orientation, signs fixed by ``diag(R)``), and/or add
noise; GHN-3 adds only a tiny noise (``beta = 1e-5``) to break symmetry.

Measured with the shipped GHNs (``benchmarks/ghn_late.py``, docs/ghn.md): neither raising the effective rank
(noise, :func:`orthogonalize`, :func:`flatten_spectrum`) nor reviving the predicted network's many dead
ReLU units (:func:`revive_dead_units`; 38% of ``cnn``'s hidden classifier units on fashion-mnist against 9%
for default init) closes the late fine-tuning gap to default init, so ``predict_into`` applies none of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PASS = (nn.Flatten, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Identity)


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


def relu_chains(model: nn.Module) -> list[tuple[str, str]]:
    """``(producer, consumer)`` module names of ``producer -> ReLU -> [flatten/pool/dropout] -> consumer``.

    Found in module registration order (how ``nn.Sequential`` models are written): a Linear/Conv/BatchNorm
    with a bias, then an ``nn.ReLU``, then, with only shape-keeping or pooling modules in between, a
    Linear/Conv whose input has one channel (or one block of ``in_features / units`` columns) per unit.
    Registration order need not be data-flow order; :func:`revive_dead_units` checks the function instead.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    chains = []
    for i in range(len(leaves) - 2):
        (pn, p), (_, r) = leaves[i], leaves[i + 1]
        if not (isinstance(p, _PRODUCERS) and getattr(p, "bias", None) is not None and isinstance(r, nn.ReLU)):
            continue
        units = p.num_features if isinstance(p, nn.modules.batchnorm._BatchNorm) else p.weight.shape[0]
        for cn, c in leaves[i + 2 :]:
            if isinstance(c, _CONSUMERS):
                fan = c.in_features if isinstance(c, nn.Linear) else c.in_channels
                if fan % units == 0 and (isinstance(c, nn.Linear) or fan == units):
                    chains.append((pn, cn))
                break
            if not isinstance(c, _PASS):
                break
    return chains


@torch.no_grad()
def _pre_activations(model: nn.Module, producer: nn.Module, xs: list[Tensor]) -> Tensor:
    """``[units, samples]`` outputs of ``producer`` over ``xs`` (channels x positions for convs)."""
    zs: list[Tensor] = []
    hook = producer.register_forward_hook(lambda m, i, o: zs.append(o.detach().clone()))  # before in-place ReLU
    try:
        for x in xs:
            model(x)
    finally:
        hook.remove()
    return torch.cat([o.transpose(0, 1).reshape(o.shape[1], -1) for o in zs], 1)


@torch.no_grad()
def dead_fraction(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, float]:
    """For each :func:`relu_chains` producer, the fraction of its units that are ``<= 0`` on every input
    (eval mode): they get no gradient."""
    xs = [x[0] if isinstance(x, (tuple, list)) else x for x in batches]
    mods = dict(model.named_modules())
    was = model.training
    model.eval()
    try:
        return {
            pn: float((_pre_activations(model, mods[pn], xs).max(1).values <= 0).float().mean())
            for pn, _ in relu_chains(model)
        }
    finally:
        model.train(was)


@torch.no_grad()
def revive_dead_units(model: nn.Module, batches: Iterable[Tensor], *, tol: float = 1e-5) -> list[str]:
    r"""Make ReLU units that are dead on ``batches`` live, without changing the network's output on them.

    For a chain ``z = producer(h)``, ``a = relu(z)``, ``consumer(a)`` (:func:`relu_chains`), a unit ``j`` with
    ``z_j <= 0`` on every input of ``batches`` gets no gradient, ever. It is revived by

    .. math::
        b_j \leftarrow b_j - \operatorname{median}_x z_j(x),\qquad W^{\text{consumer}}_{:,j} \leftarrow 0

    so it is positive on about half the inputs and its output is multiplied by zero: the network's function
    is unchanged (exactly on ``batches``, where the unit was 0), and the first step gives the zeroed weights a
    gradient ``relu(z_j) * delta`` (like a zero-initialised last layer). The model is run in eval mode (BN
    running statistics must already fit, e.g. re-estimated). Each chain's change is checked: if the output
    on ``batches`` moved by more than ``tol`` (relative), that chain is restored.

    Returns:
        ``"producer[j]"`` for every revived unit.
    """
    xs = [x[0] if isinstance(x, (tuple, list)) else x for x in batches]
    if not xs:
        raise ValueError("revive_dead_units needs at least one batch of inputs")
    was = model.training
    model.eval()
    mods = dict(model.named_modules())
    revived: list[str] = []
    try:
        ref = torch.cat([model(x) for x in xs])
        for pn, cn in relu_chains(model):
            prod, cons = mods[pn], mods[cn]
            z = _pre_activations(model, prod, xs)
            dead = z.max(1).values <= 0
            if not dead.any():
                continue
            saved = prod.bias.clone(), cons.weight.clone()
            prod.bias[dead] -= z[dead].median(1).values
            w = cons.weight.view(cons.weight.shape[0], len(dead), -1)  # a Linear after Flatten: a block per unit
            w[:, dead] = 0
            out = torch.cat([model(x) for x in xs])
            if (out - ref).norm() > tol * ref.norm().clamp_min(1e-12):
                prod.bias.copy_(saved[0])
                cons.weight.copy_(saved[1])
                continue
            revived += [f"{pn}[{j}]" for j in torch.nonzero(dead).flatten().tolist()]
    finally:
        model.train(was)
    return revived


__all__ = [
    "dead_fraction",
    "distinct_filters",
    "effective_rank",
    "flatten_spectrum",
    "orthogonalize",
    "relu_chains",
    "revive_dead_units",
]
