"""The two-layer shifted-ReLU network and its seeded, streamable initialisation.

.. math::  f(W, x, a) = \\frac{1}{\\sqrt{m}} \\sum_{r=1}^{m} a_r\\, \\max(\\langle w_r, x\\rangle - b, 0),
           \\qquad w_r(0) \\sim N(0, I_d),\\ a_r \\sim \\mathrm{Unif}\\{-1, +1\\}

``a`` is fixed; only ``W`` is trained. Rows of ``W(0)`` come in blocks of
:data:`ROW_BLOCK` rows; block ``j`` is drawn by a generator seeded by ``(seed, j)`` (in
cache-sized pieces of :data:`RNG_PIECE` elements), so ``W(0)`` can be streamed in row
blocks (the fast trainer never holds all of ``W``) and regenerated bit-exactly to
materialise ``W`` later; the contraction with the data is batched per block. Rows are
generated on the CPU and moved to the target device.

:class:`ConditionalInit` draws the same distribution without drawing ``W(0)`` first: the
pre-activations ``Z(0) = W(0) X^T`` of the training data come straight from their law
``z_r ~ N(0, G)`` (``G = X X^T``), and ``W(0)`` is drawn conditionally on them only when it is
materialised (see its docstring for the proof that the rows are exactly ``N(0, I_d)``).
:class:`ExplicitInit` wraps given ``W(0)`` and ``a`` behind the same interface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._checks import SUPPORTED_DTYPES, check_positive, check_threshold
from ._math import gram_matrix, kron_rows, preactivations, shifted_relu

__all__ = ["MAX_GRAM_COND", "ROW_BLOCK", "ConditionalInit", "ExplicitInit", "KronMLP", "SeededInit", "gram_condition"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant to decorrelate block seeds
ROW_BLOCK = 16  # rows of W(0) per generator seed and the streaming granularity (16 MB blocks at d = 262,144)
# Elements per randn call: torch fills a normal tensor in two passes, so L2-sized pieces of a block
# (not one call per 16 MB block, which measured 1.4x slower) keep the draw in cache.
RNG_PIECE = 1 << 16
# Largest condition number of G for which ConditionalInit is used: materialised W(0) reproduces Z(0)
# to about cond(G)·ε relative (≈ 2e-13 in float64 at the bound), i.e. the trainer stays exact.
MAX_GRAM_COND = 1e3
# Materialising ConditionalInit: elements of W(0) per group of rows (and of its [rows, d_1, n] temporary)
_GROUP_ELEMS = 1 << 24


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

    def _aux_seed(self) -> int:
        """Seed of ConditionalInit's draw of Z(0); block seeds are ``seed·MIX + j + 1`` with ``j ≥ 0``."""
        return (self.seed * _MIX - 1) % (2**63 - 1)

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
        buf = self.fill_(torch.empty(max(hi - lo, 0), self.d, dtype=dtype), lo)
        return buf[start - lo : stop - lo].to(device)

    def fill_(self, buf: Tensor, lo: int) -> Tensor:
        """Draw rows ``lo : lo + len(buf)`` of ``W(0)`` into the CPU tensor ``buf`` in place (its dtype).

        ``lo`` must be a multiple of :data:`ROW_BLOCK` and the range end at a block end or at ``m``.
        Streaming callers reuse one ``buf``, so the draw writes to warm memory.
        """
        hi = lo + buf.shape[0]
        if lo % ROW_BLOCK or not (hi == self.m or (hi % ROW_BLOCK == 0 and hi < self.m)) or buf.shape[1:] != (self.d,):
            raise ValueError(
                f"fill_ needs a [rows, {self.d}] buffer for whole blocks of {ROW_BLOCK} rows from a block start, got "
                f"rows [{lo}, {hi}) into {tuple(buf.shape)}; use rows() for other ranges"
            )
        g = torch.Generator()
        for s in range(lo, lo + buf.shape[0], ROW_BLOCK):  # one generator seed per block of rows
            g.manual_seed(self._block_seed(s // ROW_BLOCK))
            for piece in buf[s - lo : s - lo + ROW_BLOCK].view(-1).split(RNG_PIECE):
                torch.randn(piece.shape, generator=g, dtype=buf.dtype, out=piece)
        return buf

    def weight(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """All of ``W(0)`` as ``[m, d]`` (d-dependent memory; for the dense reference)."""
        return self.rows(0, self.m, dtype=dtype, device=device)

    def signs(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """Output signs ``a ∈ {-1, +1}^m``."""
        g = torch.Generator().manual_seed(self.seed)
        return (torch.randint(0, 2, (self.m,), generator=g) * 2 - 1).to(dtype=dtype, device=device)


def gram_condition(gram: Tensor) -> float:
    """2-norm condition number ``λ_max / λ_min`` of a symmetric Gram matrix (``inf`` if singular).

    Computed in float64 from the eigenvalues (``O(n^3)``).
    """
    ev = torch.linalg.eigvalsh(gram.to(torch.float64))
    return float(ev[-1] / ev[0]) if float(ev[0]) > 0 else math.inf


@dataclass(frozen=True, eq=False)
class ConditionalInit:
    """``W(0)`` with rows ``N(0, I_d)``, drawn through its pre-activations on the training data.

    With ``X = [x_1; …; x_n]`` (``n × d``, full row rank) and ``G = X X^T = L L^T`` (Cholesky):

    .. math::  Z(0) = H L^\\top, \\quad H_{ri} \\sim N(0, 1);\\qquad
               W(0) = \\Xi + \\bigl(Z(0) - \\Xi X^\\top\\bigr) G^{-1} X,
               \\quad \\Xi_{rj} \\sim N(0, 1)

    (``Ξ`` is the :class:`SeededInit` of the same seed.) Then ``X W(0)^T = Z(0)^T``, and each row
    ``w_r = ξ_r + X^T G^{-1}(z_r − X ξ_r)`` is Gaussian with mean 0 and covariance
    ``(I − P) + X^T G^{-1} G G^{-1} X = I`` (``P = X^T G^{-1} X``, ``z_r ~ N(0, G)`` independent of
    ``ξ_r``), rows independent: exactly the law of ``w_r(0) ~ N(0, I_d)``. So ``Z(0)`` costs
    ``O(n^3 + m n^2)`` instead of the ``O(m n d)`` draw-and-contract of :class:`SeededInit`, and
    the ``O(m n d)`` work moves to :meth:`rows` (materialisation, on request only).

    It is a different sample from :class:`SeededInit` of the same seed (same law). Use it only for
    well-conditioned ``G`` (:data:`MAX_GRAM_COND`): ``X W(0)^T`` reproduces ``Z(0)`` to about
    ``cond(G)·ε`` relative.

    Attributes:
        base: The seeded ``Ξ`` (and the output signs).
        factors: Training factors ``[n, d_k]`` in float64 (``X`` is formed from them in chunks).
        chol: Lower Cholesky factor ``L`` of ``G`` (float64).
        z0: ``Z(0)`` ``[m, n]`` (float64).
    """

    base: SeededInit
    factors: tuple[Tensor, ...]
    chol: Tensor
    z0: Tensor

    @classmethod
    def draw(
        cls, base: SeededInit, factors: tuple[Tensor, ...], *, gram_cond: float | None = None
    ) -> ConditionalInit:
        """Draw ``Z(0) = H L^T`` for the training ``factors`` (``Π d_k`` must equal ``base.d``).

        Args:
            base: Seed, width and ``d``.
            factors: Training factors ``[n, d_k]``.
            gram_cond: :func:`gram_condition` of their Gram matrix if already known.

        Raises:
            ValueError: If ``G`` is singular or its condition number exceeds :data:`MAX_GRAM_COND`.
        """
        f64 = tuple(f.to(torch.float64) for f in factors)
        if math.prod(f.shape[1] for f in f64) != base.d:
            dims = [f.shape[1] for f in f64]
            raise ValueError(f"base.d = {base.d} but the factors give d = Π {dims}; rebuild the init")
        gram = gram_matrix(f64)
        cond = gram_condition(gram) if gram_cond is None else gram_cond
        if cond > MAX_GRAM_COND:
            raise ValueError(
                f"the Gram matrix of the training points has condition number {cond:.3g} > {MAX_GRAM_COND:g} "
                "(more points than dimensions, duplicates or near-collinear points), so W(0) cannot be drawn "
                "conditionally and stay exact; use draw='full' (or 'auto')"
            )
        chol = torch.linalg.cholesky(gram)
        g = torch.Generator().manual_seed(base._aux_seed())
        # H in float32 (a float64 draw is ~7x slower on CPU), then Z(0) = H L^T in float64
        h = torch.randn(base.m, gram.shape[0], generator=g, dtype=torch.float32).to(gram.device, torch.float64)
        return cls(base, f64, chol, h @ chol.T)

    @property
    def m(self) -> int:
        """Width."""
        return self.base.m

    def has_factors(self, factors: Sequence[Tensor]) -> bool:
        """Whether ``factors`` are the training factors ``Z(0)`` was drawn for (so it applies to them)."""
        return len(factors) == len(self.factors) and all(
            f.shape == g.shape and torch.equal(f.to(device=g.device, dtype=g.dtype), g)
            for f, g in zip(factors, self.factors, strict=True)
        )

    @property
    def d(self) -> int:
        """Input dimension."""
        return self.base.d

    def rows(
        self, start: int, stop: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Rows ``start:stop`` of ``W(0) = Ξ + (Z(0) − Ξ X^T) G^{-1} X`` (``O(rows · n · d)``).

        Computed in fixed groups of rows (:attr:`group_rows`, a multiple of :data:`ROW_BLOCK`), so
        a row is bit-identical whichever range it is asked in. ``Ξ`` and the products with ``X`` are
        in ``dtype``; the ``n × n`` solve is in float64.
        """
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {dtype} unsupported; use torch.float32 or torch.float64")
        if not 0 <= start <= stop <= self.m:
            raise ValueError(f"row range [{start}, {stop}) outside [0, {self.m})")
        dev = self.z0.device
        fs = tuple(f.to(dtype) for f in self.factors)
        head, n, group = fs[0], fs[0].shape[0], self.group_rows
        rest = kron_rows(fs[1:]) if len(fs) > 1 else None  # [n, d / d_1]
        sub = max(1, _GROUP_ELEMS // (head.shape[1] * n))  # rows per [sub, d_1, n] temporary
        lo = start - start % group
        hi = min(self.m, -(-stop // group) * group)
        out = torch.empty(max(hi - lo, 0), self.d, dtype=dtype, device=dev)
        for s in range(lo, hi, group):
            e = min(self.m, s + group)
            w = out[s - lo : e - lo]
            if dev.type == "cpu":  # Ξ drawn in place (no second pass over a fresh buffer)
                self.base.fill_(w, s)
            else:
                w.copy_(self.base.rows(s, e, dtype=dtype, device=dev))
            resid = self.z0[s:e] - preactivations(w, fs).to(torch.float64)  # Z(0) − Ξ X^T
            coef = torch.cholesky_solve(resid.T, self.chol).T.to(dtype)  # D = (Z(0) − Ξ X^T) G^{-1}
            if rest is None:
                w.addmm_(coef, head)
                continue
            # w_r += Σ_i D_ri u_i ⊗ x'_i, i.e. as a [d_1, d/d_1] matrix W_r += U_1^T diag(D_r) X': one GEMM
            # with inner size n per sub-block of rows, never forming the n × d matrix X
            wv = w.view(e - s, head.shape[1], -1)
            for q in range(0, e - s, sub):
                scaled = coef[q : q + sub, None, :] * head.T[None]  # [sub, d_1, n]
                wv[q : q + sub].view(-1, wv.shape[2]).addmm_(scaled.reshape(-1, n), rest)
        return out[start - lo : stop - lo].to(device)

    @property
    def group_rows(self) -> int:
        """Rows of ``W(0)`` materialised together: about ``2^24`` elements, a multiple of :data:`ROW_BLOCK`."""
        return max(1, _GROUP_ELEMS // self.d // ROW_BLOCK) * ROW_BLOCK

    def weight(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """All of ``W(0)`` as ``[m, d]`` (d-dependent memory and ``O(m n d)`` time)."""
        return self.rows(0, self.m, dtype=dtype, device=device)

    def signs(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """Output signs ``a`` (those of :attr:`base`)."""
        return self.base.signs(dtype=dtype, device=device)


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
        init: SeededInit | ConditionalInit | ExplicitInit,
        *,
        b: float,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> KronMLP:
        """Build the network at ``W(0)`` of a :class:`SeededInit`, :class:`ConditionalInit` or :class:`ExplicitInit`."""
        return cls(init.weight(dtype=dtype, device=device), init.signs(dtype=dtype, device=device), b)

    @property
    def m(self) -> int:
        """Width."""
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """Predictions ``[N]`` for explicit inputs ``x`` of shape ``[N, d]``."""
        z = x @ self.weight.T
        return shifted_relu(z, self.b) @ self.a / math.sqrt(self.m)
