"""The two-layer shifted-ReLU network and its seeded, streamable initialisation.

.. math::  f(W, x, a) = \\frac{1}{\\sqrt{m}} \\sum_{r=1}^{m} a_r\\, \\max(\\langle w_r, x\\rangle - b, 0),
           \\qquad w_r(0) \\sim N(0, I_d),\\ a_r \\sim \\mathrm{Unif}\\{-1, +1\\}

``a`` is fixed; only ``W`` is trained. Rows of ``W(0)`` come in blocks of
:data:`ROW_BLOCK` rows; block ``j`` is drawn by a generator seeded by ``(seed, j)`` (in
cache-sized pieces of :data:`RNG_PIECE` elements), so ``W(0)`` can be streamed in row
blocks (the fast trainer never holds all of ``W``) and regenerated bit-exactly to
materialise ``W`` later; the contraction with the data is batched per block. Rows are
generated on the CPU and moved to the target device.
:class:`ExplicitInit` wraps given ``W(0)`` and ``a`` behind the same interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import SUPPORTED_DTYPES, check_positive, check_threshold
from ._math import shifted_relu

__all__ = ["ROW_BLOCK", "ExplicitInit", "KronMLP", "SeededInit"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant to decorrelate block seeds
ROW_BLOCK = 16  # rows of W(0) per generator seed and the streaming granularity (16 MB blocks at d = 262,144)
# Elements per randn call: torch fills a normal tensor in two passes, so L2-sized pieces of a block
# (not one call per 16 MB block, which measured 1.4x slower) keep the draw in cache.
RNG_PIECE = 1 << 16


@dataclass(frozen=True)
class SeededInit:
    """Reproducible initial weights ``W(0) ∈ R^{m×d}`` and output signs ``a ∈ {±1}^m``.

    Attributes:
        m: Width.
        d: Input dimension.
        seed: Base seed.
    """

    m: int
    d: int
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("m", self.m, integer=True)
        check_positive("d", self.d, integer=True)

    def _block_seed(self, j: int) -> int:
        return (self.seed * _MIX + j + 1) % (2**63 - 1)

    def rows(
        self, start: int, stop: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Rows ``start:stop`` of ``W(0)``, each ``w_r ~ N(0, I_d)``.

        Whole blocks of :data:`ROW_BLOCK` rows are drawn (one generator seed per block), so a
        range aligned to :data:`ROW_BLOCK` costs exactly its own rows.

        Args:
            start: First row.
            stop: One past the last row.
            dtype: ``torch.float32`` or ``torch.float64``.
            device: Target device.

        Returns:
            Tensor ``[stop - start, d]``.
        """
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {dtype} unsupported; use torch.float32 or torch.float64")
        if not 0 <= start <= stop <= self.m:
            raise ValueError(f"row range [{start}, {stop}) outside [0, {self.m})")
        lo = start - start % ROW_BLOCK
        hi = min(self.m, -(-stop // ROW_BLOCK) * ROW_BLOCK)
        buf = torch.empty(max(hi - lo, 0), self.d, dtype=dtype)
        g = torch.Generator()
        for s in range(lo, hi, ROW_BLOCK):  # one generator seed per block of rows
            g.manual_seed(self._block_seed(s // ROW_BLOCK))
            for piece in buf[s - lo : s - lo + ROW_BLOCK].view(-1).split(RNG_PIECE):
                torch.randn(piece.shape, generator=g, dtype=dtype, out=piece)
        return buf[start - lo : stop - lo].to(device)

    def weight(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """All of ``W(0)`` as ``[m, d]`` (d-dependent memory; for the dense reference)."""
        return self.rows(0, self.m, dtype=dtype, device=device)

    def signs(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """Output signs ``a ∈ {-1, +1}^m``."""
        g = torch.Generator().manual_seed(self.seed)
        return (torch.randint(0, 2, (self.m,), generator=g) * 2 - 1).to(dtype=dtype, device=device)


@dataclass(frozen=True, eq=False)
class ExplicitInit:
    """Given initial weights ``W(0) ∈ R^{m×d}`` and output weights ``a ∈ R^m`` (usually ``±1``).

    Same interface as :class:`SeededInit`; rows are slices of ``W0`` (kept by reference, never
    copied), so a trainer built from them can be checked against outside references or
    warm-started.

    Attributes:
        W0: ``[m, d]`` initial hidden weights.
        a: ``[m]`` output weights.
    """

    W0: Tensor
    a: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.W0, Tensor) or self.W0.ndim != 2 or self.W0.numel() == 0:
            shape = tuple(self.W0.shape) if isinstance(self.W0, Tensor) else type(self.W0).__name__
            raise ValueError(f"W0 must be a non-empty [m, d] tensor, got {shape}; pass the hidden weights")
        if not isinstance(self.a, Tensor) or self.a.shape != (self.W0.shape[0],):
            shape = tuple(self.a.shape) if isinstance(self.a, Tensor) else type(self.a).__name__
            raise ValueError(f"a must be a [m] = [{self.W0.shape[0]}] tensor (one per row of W0), got {shape}")
        for name, t in (("W0", self.W0), ("a", self.a)):
            if t.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{name} has dtype {t.dtype}; use torch.float32 or torch.float64")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"non-finite data: {name} has NaN/inf entries; pass finite weights")

    @property
    def m(self) -> int:
        """Width."""
        return self.W0.shape[0]

    @property
    def d(self) -> int:
        """Input dimension."""
        return self.W0.shape[1]

    def rows(
        self, start: int, stop: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Rows ``start:stop`` of ``W0`` in ``dtype`` on ``device``."""
        if not 0 <= start <= stop <= self.m:
            raise ValueError(f"row range [{start}, {stop}) outside [0, {self.m})")
        return self.W0[start:stop].to(device=device, dtype=dtype)

    def weight(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """All of ``W0`` (a copy, so training a model built from it leaves ``W0`` unchanged)."""
        return self.W0.to(device=device, dtype=dtype, copy=True)

    def signs(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """The output weights ``a`` (a copy)."""
        return self.a.to(device=device, dtype=dtype, copy=True)


class KronMLP(nn.Module):
    """Two-layer shifted-ReLU network with fixed output signs.

    .. math::  f(W, x, a) = \\frac{1}{\\sqrt{m}} \\sum_{r=1}^{m} a_r\\, \\sigma_b(\\langle w_r, x\\rangle)

    Args:
        weight: ``[m, d]`` hidden weights (trainable parameter).
        a: ``[m]`` output signs (buffer, not trained).
        b: Threshold ``b >= 0``.
    """

    def __init__(self, weight: Tensor, a: Tensor, b: float) -> None:
        super().__init__()
        if weight.ndim != 2 or a.shape != (weight.shape[0],):
            raise ValueError(
                f"weight must be [m, d] and a must be [m]; got {tuple(weight.shape)} and {tuple(a.shape)}"
            )
        self.weight = nn.Parameter(weight)
        self.register_buffer("a", a.to(weight))
        self.b = check_threshold(b)

    @classmethod
    def from_init(
        cls,
        init: SeededInit | ExplicitInit,
        *,
        b: float,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> KronMLP:
        """Build the network at ``W(0)`` of a :class:`SeededInit` or :class:`ExplicitInit`."""
        return cls(init.weight(dtype=dtype, device=device), init.signs(dtype=dtype, device=device), b)

    @property
    def m(self) -> int:
        """Width."""
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """Predictions ``[N]`` for explicit inputs ``x`` of shape ``[N, d]``."""
        z = x @ self.weight.T
        return shifted_relu(z, self.b) @ self.a / math.sqrt(self.m)
