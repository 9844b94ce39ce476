"""The two-layer shifted-ReLU network and its seeded, streamable initialisation.

.. math::  f(W, x, a) = \\frac{1}{\\sqrt{m}} \\sum_{r=1}^{m} a_r\\, \\max(\\langle w_r, x\\rangle - b, 0),
           \\qquad w_r(0) \\sim N(0, I_d),\\ a_r \\sim \\mathrm{Unif}\\{-1, +1\\}

``a`` is fixed; only ``W`` is trained. Row ``r`` of ``W(0)`` is drawn from its own
generator seeded by ``(seed, r)``, so ``W(0)`` can be streamed in row blocks of any
size (the fast trainer never holds all of ``W``) and regenerated bit-exactly to
materialise ``W`` later. Rows are generated on the CPU and moved to the target device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import SUPPORTED_DTYPES, check_positive, check_threshold
from ._math import shifted_relu

__all__ = ["KronMLP", "SeededInit"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant to decorrelate row seeds


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

    def _row_seed(self, r: int) -> int:
        return (self.seed * _MIX + r + 1) % (2**63 - 1)

    def rows(
        self, start: int, stop: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Rows ``start:stop`` of ``W(0)``, each ``w_r ~ N(0, I_d)``.

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
        out = torch.empty(stop - start, self.d, dtype=dtype)
        g = torch.Generator()
        for j, r in enumerate(range(start, stop)):
            g.manual_seed(self._row_seed(r))
            torch.randn(self.d, generator=g, dtype=dtype, out=out[j])
        return out.to(device)

    def weight(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """All of ``W(0)`` as ``[m, d]`` (d-dependent memory; for the dense reference)."""
        return self.rows(0, self.m, dtype=dtype, device=device)

    def signs(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """Output signs ``a ∈ {-1, +1}^m``."""
        g = torch.Generator().manual_seed(self.seed)
        return (torch.randint(0, 2, (self.m,), generator=g) * 2 - 1).to(dtype=dtype, device=device)


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
        init: SeededInit,
        *,
        b: float,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> KronMLP:
        """Build the network at ``W(0)`` of a :class:`SeededInit`."""
        return cls(init.weight(dtype=dtype, device=device), init.signs(dtype=dtype, device=device), b)

    @property
    def m(self) -> int:
        """Width."""
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """Predictions ``[N]`` for explicit inputs ``x`` of shape ``[N, d]``."""
        z = x @ self.weight.T
        return shifted_relu(z, self.b) @ self.a / math.sqrt(self.m)
