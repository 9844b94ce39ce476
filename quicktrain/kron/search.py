"""Activated-neuron search: for a batch, the pairs ``(i, r)`` with ``Z_ri > b``, and the row update of ``Z``.

Two exact paths keep the pre-activations ``Z ∈ R^{m×n}`` and answer the same question,
``S_i = {r : Z_ri > b}`` for the batch's points, with identical output (same pairs, same
order), so a trainer's trajectory does not depend on the path:

* ``"scan"`` (:class:`ScanSearch`): ``Z`` is a plain neuron-major matrix. A query reads
  the batch's columns ``Z[:, B]`` (``O(m |B|)``), keeps the neurons that fire for some
  point (``R = ∪_i S_i``) and lists the pairs inside that ``|R| × |B|`` block. An update
  adds ``|R|`` rows in place and nothing else.
* ``"tree"`` (:class:`TreeSearch`): the paper's asynchronous max-tree per data point
  (:class:`~quicktrain.kron.tree.AsynchronousTree`): ``O(|B| k log m)`` query, but every
  update also refreshes the ``log m`` ancestors of the ``|R|`` touched leaves in all ``n``
  trees (``O(|R| n log m)``).

With ``k = m P(Z > b)`` active neurons per point, the tree's refresh costs ``log m`` times
the row update itself, so the scan wins unless ``k`` is tiny (``b`` far in the tail);
:func:`choose_path` encodes the measured crossover (``benchmarks/kron.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ._checks import SUPPORTED_DTYPES, check_threshold
from .tree import AsynchronousTree

__all__ = ["PATHS", "ActiveSet", "ScanSearch", "Search", "TreeSearch", "choose_path", "make_search"]

PATHS = ("scan", "tree")
# the tree beats the scan only when a point's active neurons are this rare (k log2 m < m / TREE_RATIO)
TREE_RATIO = 64.0
TREE_MIN_M = 4096  # below this the scan's O(m |B|) read is a few kernel launches; the tree never wins


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

    def refresh_(self, touched: Tensor) -> None: ...


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

    def refresh_(self, touched: Tensor) -> None:
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
        self.tree.T.index_add_(0, touched + self.tree.P, delta)

    def refresh_(self, touched: Tensor) -> None:
        """Recompute the touched leaves' ancestors in all ``n`` trees (``O(|R| n log m)``)."""
        self.tree.refresh_(touched + self.tree.P)


def choose_path(m: int, n: int, active_fraction: float) -> tuple[str, str]:
    """The faster exact path for width ``m``, ``n`` points and ``P(Z > b)`` = ``active_fraction``.

    A deterministic function of its arguments (no timing). Per step, the scan reads
    ``m |B|`` entries and the tree touches ``|B| k log2 m`` nodes to query plus
    ``|R| n log2 m`` to refresh, with ``k = m · active_fraction``; the tree wins only when
    ``k log2 m`` is a small fraction of ``m`` (constant :data:`TREE_RATIO`, measured by
    ``benchmarks/kron.py``) and ``m`` is large enough for the scan's read to matter.

    Args:
        m: Width.
        n: Number of training points.
        active_fraction: Fraction of ``Z(0)`` entries above ``b``.

    Returns:
        ``(path, reason)``: ``"scan"`` or ``"tree"`` and a one-line explanation.
    """
    k = m * active_fraction
    log_m = math.log2(max(m, 2))
    if m >= TREE_MIN_M and k * log_m * TREE_RATIO < m:
        return "tree", f"k = {k:.1f} active of m = {m} per point: k·log2(m)·{TREE_RATIO:g} < m, the tree's descent wins"
    why = f"m = {m} < {TREE_MIN_M}" if m < TREE_MIN_M else f"k·log2(m)·{TREE_RATIO:g} ≥ m"
    return "scan", f"k = {k:.1f} active of m = {m} per point ({why}): the column scan wins"


def make_search(path: str, values: Tensor, b: float) -> ScanSearch | TreeSearch:
    """Build the structure named ``path`` (one of :data:`PATHS`) on pre-activations ``values``."""
    if path == "scan":
        return ScanSearch(values, b)
    if path == "tree":
        return TreeSearch(values, b)
    raise ValueError(f"unknown path {path!r}; choose one of {PATHS} or 'auto'")
