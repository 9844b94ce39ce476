"""Asynchronous activated-neuron tree: which neurons fire (``Z_ri > b``) for each data point.

One max-segment tree per data point over the ``m`` neurons, all ``n`` trees stored
together as one tensor ``T`` of shape ``[2P, n]`` (``P`` = next power of two ≥ m,
node ``1`` is the root, node ``v`` has children ``2v`` and ``2v+1``, leaf of neuron
``r`` is node ``P + r``; padding leaves are ``-inf``). Column ``i`` is data point
``i``'s tree, so the leaves ``T[P:P+m]`` *are* the pre-activation matrix
``Z ∈ R^{m×n}`` with ``Z_ri = ⟨w_r, x_i⟩``.

Operations (vectorised over data points; ``k`` = number of active leaves):

* **init**    ``O(m n)``: build all internal maxima bottom-up.
* **update**  ``O(|R| n log m)``: change leaves ``R`` in every tree, then refresh the
  ancestors of ``R`` level by level (shared across the ``n`` trees).
* **query**   ``O(k log m)`` per data point: descend from the root into every child whose
  maximum exceeds ``b``; the leaves reached are exactly ``S_i = {r : Z_ri > b}``.

"Asynchronous" follows the paper: each data point's tree answers its query
independently of the others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import SUPPORTED_DTYPES, check_threshold

__all__ = ["AsynchronousTree"]


class AsynchronousTree:
    """Batched max-tree reporting, per data point, the neurons with ``Z_ri > b``.

    Args:
        values: Initial leaves ``Z`` of shape ``[m, n]`` (float32/float64, any device).
        b: Threshold ``b >= 0``; ``query`` reports entries strictly greater than ``b``.

    Example:
        >>> tree = AsynchronousTree(torch.tensor([[0.0, 3.0], [2.0, 0.0], [5.0, 1.0]]), b=1.5)
        >>> tree.query(torch.tensor([0, 1]))
        (tensor([0, 0, 1]), tensor([1, 2, 0]))
    """

    def __init__(self, values: Tensor, b: float) -> None:
        if values.ndim != 2 or values.numel() == 0:
            raise ValueError(
                f"tree values must be a non-empty [m, n] tensor, got shape {tuple(values.shape)}"
            )
        if values.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"tree values must be float32 or float64, got {values.dtype}")
        self.b = check_threshold(b)
        self.m, self.n = values.shape
        self.levels = max(0, (self.m - 1).bit_length())  # P = 2**levels
        self.P = 1 << self.levels
        self.T = torch.full((2 * self.P, self.n), -torch.inf, dtype=values.dtype, device=values.device)
        self.T[self.P : self.P + self.m] = values
        self._build()

    # ------------------------------------------------------------------ init
    def _build(self) -> None:
        """Fill every internal node with the max of its children, level by level (init)."""
        h = self.P // 2
        while h >= 1:
            self.T[h : 2 * h] = torch.maximum(self.T[2 * h : 4 * h : 2], self.T[2 * h + 1 : 4 * h : 2])
            h //= 2

    @property
    def leaves(self) -> Tensor:
        """The pre-activation matrix ``Z`` (a ``[m, n]`` view of the leaves; do not write to it)."""
        return self.T[self.P : self.P + self.m]

    # ---------------------------------------------------------------- update
    def refresh_(self, leaf_nodes: Tensor) -> None:
        """Recompute the ancestors of sorted unique ``leaf_nodes`` (node ids ``P + r``) in all ``n`` trees."""
        nodes = leaf_nodes
        for _ in range(self.levels):
            nodes = torch.unique_consecutive(nodes // 2)
            self.T[nodes] = torch.maximum(self.T[2 * nodes], self.T[2 * nodes + 1])

    def _check_neurons(self, neurons: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        neurons = torch.as_tensor(neurons, device=self.T.device)
        if neurons.ndim != 1 or neurons.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"neurons must be a 1-D integer tensor, got shape {tuple(neurons.shape)}")
        if rows.shape != (neurons.numel(), self.n):
            raise ValueError(
                f"update values must have shape [len(neurons), n] = [{neurons.numel()}, {self.n}], "
                f"got {tuple(rows.shape)}"
            )
        if neurons.numel() == 0:
            return neurons.long(), rows
        if int(neurons.min()) < 0 or int(neurons.max()) >= self.m:
            raise ValueError(f"neuron indices must lie in [0, {self.m})")
        neurons, order = torch.sort(neurons.long())
        if bool((neurons[1:] == neurons[:-1]).any()):
            raise ValueError("neuron indices must be unique within one update; merge duplicate rows first")
        return neurons, rows[order]

    def add_(self, neurons: Tensor, delta: Tensor) -> None:
        """Update: ``Z[neurons, :] += delta`` for all data points, then refresh ancestors.

        Args:
            neurons: ``[k]`` unique neuron indices.
            delta: ``[k, n]`` increments.
        """
        neurons, delta = self._check_neurons(neurons, delta)
        self.add_sorted_(neurons, delta)

    def set_(self, neurons: Tensor, values: Tensor) -> None:
        """Update: ``Z[neurons, :] = values`` for all data points, then refresh ancestors.

        Args:
            neurons: ``[k]`` unique neuron indices.
            values: ``[k, n]`` new leaf values.
        """
        neurons, values = self._check_neurons(neurons, values)
        if neurons.numel():
            leaf = neurons + self.P
            self.T[leaf] = values.to(self.T.dtype)
            self.refresh_(leaf)

    def add_sorted_(self, neurons: Tensor, delta: Tensor, *, refresh: bool = True) -> None:
        """Unchecked :meth:`add_` for sorted unique int64 ``neurons`` (the trainer's hot path).

        With ``refresh=False`` only the leaves change; call :meth:`refresh_` on the same leaves
        before the next query (lets a caller time the two terms apart).
        """
        if neurons.numel():
            leaf = neurons + self.P
            self.T.index_add_(0, leaf, delta.to(self.T.dtype))
            if refresh:
                self.refresh_(leaf)

    # ----------------------------------------------------------------- query
    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Query: all active (data point, neuron) pairs ``Z_ri > b`` for ``points``.

        Args:
            points: ``[B]`` data-point indices (duplicates allowed).

        Returns:
            ``(pos, neuron)``, both int64 ``[P]``: ``pos`` indexes into ``points``; pairs are
            sorted by ``pos`` and, within a position, by neuron.
        """
        points = torch.as_tensor(points, device=self.T.device).long()
        flat = self.T.view(-1)
        pos = torch.arange(points.numel(), device=self.T.device)
        node = torch.ones_like(pos)
        col = points
        keep = flat[node * self.n + col] > self.b
        pos, node, col = pos[keep], node[keep], col[keep]
        for _ in range(self.levels):
            node = torch.stack((2 * node, 2 * node + 1), dim=1).reshape(-1)
            pos = pos.repeat_interleave(2)
            col = col.repeat_interleave(2)
            keep = flat[node * self.n + col] > self.b
            pos, node, col = pos[keep], node[keep], col[keep]
        return pos, node - self.P

    def query_brute(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Reference ``O(m)`` scan with the same output format as :meth:`query`."""
        points = torch.as_tensor(points, device=self.T.device).long()
        mask = self.leaves[:, points].T > self.b  # [B, m]
        pos, neuron = torch.nonzero(mask, as_tuple=True)
        return pos, neuron

    def active_counts(self) -> Tensor:
        """``|S_i|`` for every data point, ``[n]`` (from the root-free leaf scan)."""
        return (self.leaves > self.b).sum(dim=0)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Tensor | float]:
        """Leaves and threshold (internal nodes are rebuilt on load)."""
        return {"leaves": self.leaves.clone(), "b": self.b}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor | float]) -> AsynchronousTree:
        """Rebuild a tree saved by :meth:`state_dict`."""
        return cls(state["leaves"], float(state["b"]))  # type: ignore[arg-type]
