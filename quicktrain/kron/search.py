"""Activated-neuron search: for a batch, the pairs ``(i, r)`` with ``Z_ri > b``, and the row update of ``Z``.

Three exact paths keep the pre-activations ``Z ∈ R^{m×n}`` and answer the same question,
``S_i = {r : Z_ri > b}`` for the batch's points, with identical output (same pairs, same
order), so a trainer's trajectory is bit-identical whichever path runs:

* ``"scan"`` (:class:`ScanSearch`): ``Z`` is a plain neuron-major matrix. A query reads
  the batch's columns ``Z[:, B]`` (``O(m |B|)``), keeps the neurons that fire for some
  point (``R = ∪_i S_i``) and lists the pairs inside that ``|R| × |B|`` block. An update
  adds ``|R|`` rows in place and nothing else.
* ``"blocks"`` (:class:`BlockSearch`): point-major upper bounds on blocks of ``s`` neurons,
  loosened by one small matmul per update and tightened lazily by the queries; a query
  reads ``Z`` only inside candidate blocks.
* ``"tree"`` (:class:`TreeSearch`): the paper's asynchronous max-tree per data point
  (:class:`~quicktrain.kron.tree.AsynchronousTree`): ``O(|B| k log m)`` query, but every
  update also refreshes the ``log m`` ancestors of the ``|R|`` touched leaves in all ``n``
  trees (``O(|R| n log m)``, ``log2 m`` times the row update itself).

:func:`choose_path` picks scan or blocks from the sizes and the active fraction
(``benchmarks/kron.py`` measures all three side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ._checks import SUPPORTED_DTYPES, check_threshold
from .tree import AsynchronousTree

__all__ = [
    "BLOCK",
    "PATHS",
    "ActiveSet",
    "BlockSearch",
    "ScanSearch",
    "Search",
    "TreeSearch",
    "choose_path",
    "make_search",
]

PATHS = ("scan", "blocks", "tree")
BLOCK = 8  # neurons per block of BlockSearch: small enough that q = 1 - (1 - p)^s stays low at p ~ 1%
BLOCKS_MAX_CANDIDATES = 0.1  # measured crossover: blocks win when at most this fraction of blocks fire
BLOCKS_MIN_M = 4096  # below this the scan is a handful of kernels on cache-resident data


@dataclass(frozen=True)
class ActiveSet:
    """The active pairs of one batch, sorted by batch position and, within one, by neuron.

    Attributes:
        pos: ``[P]`` batch position of each pair.
        neuron: ``[P]`` neuron of each pair.
        z: ``[P]`` pre-activation ``Z[neuron, idx[pos]]``.
        touched: ``[R]`` sorted distinct neurons (``R = ∪_i S_i``).
        row: ``[P]`` index of each pair's neuron in ``touched``.
    """

    pos: Tensor
    neuron: Tensor
    z: Tensor
    touched: Tensor
    row: Tensor


class Search(Protocol):
    """What a trainer needs from an activated-neuron structure."""

    name: str

    @property
    def leaves(self) -> Tensor: ...

    def find(self, idx: Tensor) -> ActiveSet: ...

    def add_rows_(self, touched: Tensor, delta: Tensor) -> None: ...

    def refresh_(self, touched: Tensor, cb: Tensor, g_rows: Tensor) -> None: ...


def _check_values(values: Tensor) -> None:
    if values.ndim != 2 or values.numel() == 0:
        raise ValueError(f"pre-activations must be a non-empty [m, n] tensor, got shape {tuple(values.shape)}")
    if values.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"pre-activations must be float32 or float64, got {values.dtype}")


class ScanSearch:
    """Exact scan of the stored pre-activations ``Z`` (neuron-major ``[m, n]``).

    Args:
        values: Initial ``Z`` ``[m, n]`` (copied).
        b: Threshold ``b >= 0``; pairs with ``Z_ri > b`` are reported.

    Example:
        >>> s = ScanSearch(torch.tensor([[0.0, 3.0], [2.0, 0.0], [5.0, 1.0]]), b=1.5)
        >>> act = s.find(torch.tensor([0, 1]))
        >>> act.pos, act.neuron
        (tensor([0, 0, 1]), tensor([1, 2, 0]))
    """

    name = "scan"

    def __init__(self, values: Tensor, b: float) -> None:
        _check_values(values)
        self.b = check_threshold(b)
        self.Z = values.clone(memory_format=torch.contiguous_format)

    @property
    def leaves(self) -> Tensor:
        """``Z`` (``[m, n]``; do not write to it)."""
        return self.Z

    def find(self, idx: Tensor) -> ActiveSet:
        """Active pairs of the batch ``idx`` (duplicates allowed), ``O(m |B|)``."""
        zb = self.Z.index_select(1, idx)  # [m, B]: the batch's columns
        hit = zb > self.b
        touched = hit.any(dim=1).nonzero().squeeze(1)  # sorted R
        # pairs inside the |R| x |B| block, position-major (transposed so nonzero sorts by pos)
        pos, row = hit.index_select(0, touched).T.nonzero(as_tuple=True)
        neuron = touched[row]
        return ActiveSet(pos, neuron, zb[neuron, pos], touched, row)

    def add_rows_(self, touched: Tensor, delta: Tensor) -> None:
        """``Z[touched] += delta`` for sorted distinct ``touched`` (``O(|R| n)``)."""
        self.Z.index_add_(0, touched, delta)

    def refresh_(self, touched: Tensor, cb: Tensor, g_rows: Tensor) -> None:
        """Nothing to maintain besides ``Z`` itself."""


class TreeSearch:
    """The paper's asynchronous max-tree (:class:`AsynchronousTree`) behind the :class:`Search` interface.

    Args:
        values: Initial ``Z`` ``[m, n]`` (copied into the tree's leaves).
        b: Threshold ``b >= 0``.
    """

    name = "tree"

    def __init__(self, values: Tensor, b: float) -> None:
        self.tree = AsynchronousTree(values, b)

    @property
    def leaves(self) -> Tensor:
        """``Z`` (a view of the tree's leaves; do not write to it)."""
        return self.tree.leaves

    def find(self, idx: Tensor) -> ActiveSet:
        """Active pairs of the batch ``idx``, ``O(|B| k log m)`` tree descent."""
        pos, neuron = self.tree.query(idx)
        touched, row = torch.unique(neuron, sorted=True, return_inverse=True)
        return ActiveSet(pos, neuron, self.tree.leaves[neuron, idx[pos]], touched, row)

    def add_rows_(self, touched: Tensor, delta: Tensor) -> None:
        """``Z[touched] += delta`` in the leaves; call :meth:`refresh_` before the next query."""
        self.tree.add_sorted_(touched, delta, refresh=False)

    def refresh_(self, touched: Tensor, cb: Tensor, g_rows: Tensor) -> None:
        """Recompute the touched leaves' ancestors in all ``n`` trees (``O(|R| n log m)``)."""
        if touched.numel():
            self.tree.refresh_(touched + self.tree.P)


class BlockSearch:
    """Per-point upper bounds on blocks of neurons, tightened lazily where a query looks.

    Neurons are grouped in blocks of ``s`` (:data:`BLOCK`); ``M[j, β] ≥ max_{r ∈ β} Z_rj``
    is kept point-major (``[n, ⌈m/s⌉]``), so a query reads the batch's rows of ``M``
    contiguously and gathers ``Z`` only inside candidate blocks (``M > b``). Invariant after
    each update (``Z[R] += C_B G[B]``):

    .. math::  M_{j\\beta} \\leftarrow M_{j\\beta} + \\sum_{i \\in B} \\max_{r \\in \\beta} |C_{ri}|\\,|G_{ij}|
               + \\mu \\;\\ge\\; \\max_{r\\in\\beta} Z_{rj},

    one ``[n, |B|] × [|B|, ⌈m/s⌉]`` matmul instead of a refresh of the touched rows (``μ``
    covers floating-point rounding). Bounds only loosen between queries; every candidate
    block a query gathers is reset to its exact maximum (lazy, "asynchronous" refresh of
    exactly what a query needs). Query ``O(n_B (m/s) + |cand| s)``, update ``O(|B| n m/s)``
    on top of the row update. Output equals :class:`ScanSearch`'s.

    Args:
        values: Initial ``Z`` ``[m, n]`` (copied, padded to whole blocks with ``-inf``).
        b: Threshold ``b >= 0``.
        block: Neurons per block ``s``.
    """

    name = "blocks"

    def __init__(self, values: Tensor, b: float, block: int = BLOCK) -> None:
        _check_values(values)
        self.b = check_threshold(b)
        self.m, self.n = values.shape
        self.s = block
        self.nb = -(-self.m // block)
        self.Z = torch.full((self.nb * block, self.n), -torch.inf, dtype=values.dtype, device=values.device)
        self.Z[: self.m] = values
        self.M = self.Z.view(self.nb, block, self.n).amax(dim=1).T.contiguous()  # [n, nb], exact at start
        self.offsets = torch.arange(block, device=values.device)
        self.eps = torch.finfo(values.dtype).eps
        self.zbound = float(values.abs().max())  # ≥ max |Z|, only scales the rounding margin

    @property
    def leaves(self) -> Tensor:
        """``Z`` (``[m, n]`` view; do not write to it)."""
        return self.Z[: self.m]

    def find(self, idx: Tensor) -> ActiveSet:
        """Active pairs of the batch ``idx``: candidate blocks from ``M``, exact test inside them."""
        cpos, cblk = (self.M.index_select(0, idx) > self.b).nonzero(as_tuple=True)  # pos-major
        cols = idx[cpos]
        rows = cblk[:, None] * self.s + self.offsets
        v = self.Z.view(-1).index_select(0, (rows * self.n + cols[:, None]).view(-1)).view(-1, self.s)
        self.M.view(-1).index_copy_(0, cols * self.nb + cblk, v.amax(dim=1))  # lazy tightening
        ci, off = (v > self.b).nonzero(as_tuple=True)
        pos, neuron = cpos[ci], rows[ci, off]
        hit = torch.zeros(self.Z.shape[0], dtype=torch.bool, device=self.Z.device)
        hit[neuron] = True
        touched = hit.nonzero().squeeze(1)
        row = hit.cumsum(0).sub_(1)[neuron]
        # the bound update needs each pair's slot in C_B and in the [nb, |B|+1] block maxima
        self._pairs = (row, pos, cblk[ci] * (idx.numel() + 1) + pos)
        return ActiveSet(pos, neuron, v[ci, off], touched, row)

    def add_rows_(self, touched: Tensor, delta: Tensor) -> None:
        """``Z[touched] += delta`` for sorted distinct ``touched``."""
        self.Z.index_add_(0, touched, delta)

    def refresh_(self, touched: Tensor, cb: Tensor, g_rows: Tensor) -> None:
        """Raise the bounds by ``max_{r∈β}|C_rB| |G[B, :]|`` plus the rounding margin (one matmul)."""
        row, pos, key = self._pairs
        beta = torch.zeros(self.nb, cb.shape[1] + 1, dtype=cb.dtype, device=cb.device)
        beta.view(-1).scatter_reduce_(0, key, cb[row, pos].abs(), "amax")  # max_{r∈β} |C_ri|
        g_abs = g_rows.abs()
        step = float(beta.max()) * float(g_abs.sum(dim=0).max())  # ≥ max |ΔZ|
        # rounding of ΔZ (a length-|B| sum), of Z + ΔZ and of M + ΔM: a few eps of everything in play
        beta[:, -1] = 4 * (cb.shape[1] + 2) * self.eps * (self.zbound + step)
        ones = torch.ones(1, self.n, dtype=cb.dtype, device=cb.device)
        self.M.addmm_(torch.cat((g_abs, ones)).T, beta.T, alpha=1 + 4 * (cb.shape[1] + 2) * self.eps)
        self.zbound += step


def choose_path(m: int, n: int, active_fraction: float) -> tuple[str, str]:
    """The faster exact path for width ``m``, ``n`` points and ``P(Z > b)`` = ``active_fraction``.

    A deterministic function of its arguments (no timing). The scan reads all ``m |B|``
    batch entries; :class:`BlockSearch` reads ``m |B| / s`` bounds plus the candidate blocks,
    a fraction ``q = 1 − (1 − p)^s`` of them when the bounds are tight, and pays one
    ``[n, |B|] × [|B|, m/s]`` matmul per update. Measured (``benchmarks/kron.py``, one CPU
    thread): blocks win once ``q ≤`` :data:`BLOCKS_MAX_CANDIDATES` and ``m ≥``
    :data:`BLOCKS_MIN_M`; at ``q ≈ 0.13`` (``b = √(0.4 ln m)``, ``m = 65,536``) the two tie
    and below ``m = 4,096`` the scan's few kernels win. The paper's tree never won a measured
    size (its refresh costs ``log2 m`` row updates), so it is chosen only on request.
    ``n`` scales every path's update alike and does not move the crossover.

    Args:
        m: Width.
        n: Number of training points.
        active_fraction: Fraction of ``Z(0)`` entries above ``b``.

    Returns:
        ``(path, reason)``: ``"scan"`` or ``"blocks"`` and a one-line explanation.
    """
    q = 1.0 - (1.0 - active_fraction) ** BLOCK
    head = f"m = {m}, n = {n}, P(Z > b) = {active_fraction:.4f}, candidate blocks q = {q:.3f}"
    if m >= BLOCKS_MIN_M and q <= BLOCKS_MAX_CANDIDATES:
        return "blocks", f"{head} ≤ {BLOCKS_MAX_CANDIDATES}: block bounds skip most of the scan"
    why = f"m < {BLOCKS_MIN_M}" if m < BLOCKS_MIN_M else f"q > {BLOCKS_MAX_CANDIDATES}"
    return "scan", f"{head} ({why}): the column scan is as fast"


def make_search(path: str, values: Tensor, b: float) -> ScanSearch | BlockSearch | TreeSearch:
    """Build the structure named ``path`` (one of :data:`PATHS`) on pre-activations ``values``."""
    if path == "scan":
        return ScanSearch(values, b)
    if path == "tree":
        return TreeSearch(values, b)
    if path == "blocks":
        return BlockSearch(values, b)
    raise ValueError(f"unknown path {path!r}; choose one of {PATHS} or 'auto'")
