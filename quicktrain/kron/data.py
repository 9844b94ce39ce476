"""Kronecker-structured datasets: factor matrices ``(U, V, ...)`` and targets ``y``.

A data point is ``x_i = torch.kron(u_i, v_i)`` (first factor slowest; see
:mod:`quicktrain.kron._math` for the vec convention). Factors are normalised to
unit norm by default, so ``‖x_i‖ = Π_k ‖u^{(k)}_i‖ = 1`` and, with ``w_r ~ N(0, I_d)``,
``⟨w_r, x_i⟩ ~ N(0, 1)`` at initialisation — the paper's setting.

Tasks:
    * :func:`make_teacher`: synthetic regression with a rank-1-per-unit teacher
      ``y = h^{-1/2} Σ_j α_j relu(⟨p_j, u⟩⟨q_j, v⟩)`` (d-independent to generate).
    * :func:`make_digit_pairs`: pairs of ``sklearn`` digits, ``x = image_a ⊗ image_b``,
      ``y = +1`` if same class else ``-1`` (d = 64², or 784² with ``size=28``).
    * :func:`make_fashion_pairs`: the same from local Fashion-MNIST IDX files (optional).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._checks import check_factors, check_positive
from ._math import kron_rows

__all__ = [
    "KronDataset",
    "batch_schedule",
    "make_digit_pairs",
    "make_fashion_pairs",
    "make_teacher",
    "unit_rows",
]



@dataclass(frozen=True)
class KronDataset:
    """Factor matrices and targets of a Kronecker dataset.

    Attributes:
        factors: K tensors ``[n, d_k]``; data point ``i`` is ``u¹_i ⊗ … ⊗ uᴷ_i``.
        y: Targets ``[n]``.
        name: Free-form task name.
    """

    factors: tuple[Tensor, ...]
    y: Tensor
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", check_factors(self.factors, self.y))

    @property
    def n(self) -> int:
        """Number of data points."""
        return self.factors[0].shape[0]

    @property
    def dims(self) -> tuple[int, ...]:
        """Factor dimensions ``(d_1, ..., d_K)``."""
        return tuple(f.shape[1] for f in self.factors)

    @property
    def d(self) -> int:
        """Input dimension ``d = Π_k d_k``."""
        return math.prod(self.dims)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KronDataset:
        """Copy to another dtype and/or device."""
        return KronDataset(
            tuple(f.to(dtype=dtype, device=device) for f in self.factors),
            self.y.to(dtype=dtype, device=device),
            self.name,
        )

    def subset(self, idx: Tensor) -> KronDataset:
        """Rows ``idx`` of the dataset."""
        return KronDataset(tuple(f[idx] for f in self.factors), self.y[idx], self.name)

    def split(self, n_test: int, *, seed: int = 0) -> tuple[KronDataset, KronDataset]:
        """Random (train, test) split with ``n_test`` test points."""
        if not 0 < n_test < self.n:
            raise ValueError(f"n_test must be in (0, {self.n}), got {n_test}; lower it or add data")
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).to(self.y.device)
        return self.subset(perm[n_test:]), self.subset(perm[:n_test])

    def x(self, idx: Tensor | None = None) -> Tensor:
        """Explicit inputs ``[n or B, d]``, row ``i`` = ``torch.kron(u_i, v_i)`` (d-dependent!)."""
        factors = self.factors if idx is None else [f[idx] for f in self.factors]
        return kron_rows(factors)


def unit_rows(a: Tensor) -> Tensor:
    """Scale each row to unit Euclidean norm (rows of zeros raise)."""
    norm = a.norm(dim=1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError(
            "a factor row is all zeros and cannot be normalised; drop it or pass normalize=False"
        )
    return a / norm


def make_teacher(
    n: int,
    dims: Sequence[int] = (16, 16),
    *,
    width: int = 8,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> KronDataset:
    """Synthetic teacher regression task on unit-norm Kronecker inputs.

    .. math::  y_i = \\frac{1}{\\sqrt{h}} \\sum_{j=1}^{h} \\alpha_j\\,
               \\mathrm{relu}\\Big(\\prod_k \\langle p^{(k)}_j, u^{(k)}_i\\rangle\\Big) + \\epsilon_i

    i.e. a two-layer teacher whose hidden weights are rank-one tensors
    ``p_j¹ ⊗ … ⊗ p_jᴷ`` with ``p ~ N(0, I)``, so ``⟨teacher_j, x_i⟩ = Π_k ⟨p_j^k, u_i^k⟩``
    is computed without ``x``. Factor rows are Gaussian, normalised to unit norm.

    Args:
        n: Number of data points.
        dims: Factor dimensions ``(d_1, ..., d_K)``; ``K >= 1``.
        width: Teacher width ``h``.
        noise: Std of Gaussian label noise ``ε``.
        seed: Generator seed.
        dtype: ``torch.float32`` or ``torch.float64``.

    Returns:
        A :class:`KronDataset` named ``"teacher"``.
    """
    check_positive("n", n, integer=True)
    check_positive("width", width, integer=True)
    if len(dims) == 0:
        raise ValueError("dims must name at least one factor dimension, e.g. (16, 16)")
    for k in dims:
        check_positive("each factor dimension", k, integer=True)
    g = torch.Generator().manual_seed(seed)
    factors = tuple(unit_rows(torch.randn(n, dk, generator=g, dtype=torch.float64)) for dk in dims)
    proj = torch.ones(n, width, dtype=torch.float64)
    for f, dk in zip(factors, dims, strict=True):
        proj = proj * (f @ torch.randn(dk, width, generator=g, dtype=torch.float64))
    alpha = torch.randn(width, generator=g, dtype=torch.float64).sign()
    y = torch.relu(proj) @ alpha / math.sqrt(width)
    y = y + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return KronDataset(tuple(f.to(dtype) for f in factors), y.to(dtype), "teacher")


def _pairs_from_images(
    images: Tensor,
    labels: Tensor,
    n: int,
    *,
    seed: int,
    same_frac: float,
    center: bool,
    dtype: torch.dtype,
    name: str,
) -> KronDataset:
    """Sample ``n`` image pairs, ``y = +1`` if same class else ``-1``; factors are unit-norm images."""
    if not 0.0 <= same_frac <= 1.0:
        raise ValueError(f"same_frac must be in [0, 1], got {same_frac}")
    g = torch.Generator().manual_seed(seed)
    feats = images.reshape(images.shape[0], -1).to(torch.float64)
    if center:
        feats = feats - feats.mean(dim=1, keepdim=True)
    feats = unit_rows(feats)
    first = torch.randint(0, feats.shape[0], (n,), generator=g)
    same = torch.rand(n, generator=g) < same_frac
    second = torch.randint(0, feats.shape[0], (n,), generator=g)
    # for "same" pairs redraw the partner among images of the first one's class
    by_class = {int(c): torch.nonzero(labels == c).flatten() for c in labels.unique()}
    for i in torch.nonzero(same).flatten().tolist():
        pool = by_class[int(labels[first[i]])]
        second[i] = pool[torch.randint(0, pool.numel(), (1,), generator=g)]
    y = torch.where(labels[first] == labels[second], 1.0, -1.0).to(torch.float64)
    return KronDataset((feats[first].to(dtype), feats[second].to(dtype)), y.to(dtype), name)


def make_digit_pairs(
    n: int,
    *,
    size: int = 8,
    same_frac: float = 0.5,
    center: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> KronDataset:
    """Pairs of handwritten digits (``sklearn.datasets.load_digits``, bundled, offline).

    ``x = image_a ⊗ image_b`` (each image flattened row-major, centred and unit-norm),
    ``y = +1`` if both digits have the same class, else ``-1``. ``d = size⁴``:
    ``size=8`` gives ``d = 64² = 4096``; ``size=28`` bilinearly upsamples to 28×28 and
    gives ``d = 784² = 614,656``.

    Args:
        n: Number of pairs.
        size: Image side length (8 = native).
        same_frac: Fraction of pairs drawn from the same class (balances the labels).
        center: Subtract each image's mean pixel before normalising.
        seed: Generator seed.
        dtype: ``torch.float32`` or ``torch.float64``.

    Returns:
        A :class:`KronDataset` named ``"digits"``.
    """
    from sklearn.datasets import load_digits

    check_positive("n", n, integer=True)
    check_positive("size", size, integer=True)
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64)
    if size != 8:
        images = torch.nn.functional.interpolate(
            images[:, None], size=(size, size), mode="bilinear", align_corners=False
        )[:, 0]
    labels = torch.as_tensor(bunch.target)
    return _pairs_from_images(
        images, labels, n, seed=seed, same_frac=same_frac, center=center, dtype=dtype, name="digits"
    )


def make_fashion_pairs(
    n: int,
    *,
    root: str | Path | None = None,
    same_frac: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> KronDataset:
    """Pairs of Fashion-MNIST items from local IDX files (``d = 784²``); never downloads.

    Args:
        n: Number of pairs.
        root: Folder with the Fashion-MNIST IDX files (default: Debian's ``dataset-fashion-mnist``).
        same_frac: Fraction of same-class pairs.
        seed: Generator seed.
        dtype: ``torch.float32`` or ``torch.float64``.

    Returns:
        A :class:`KronDataset` named ``"fashion"``.

    Raises:
        FileNotFoundError: If the IDX files are not under ``root`` (the message says how to get them).
    """
    from .. import data

    images, labels = data.get_dataset("fashion-mnist", root=root).train.tensors
    images = images[:, 0].to(torch.float64)  # globally standardised; per-image centring and norm undo that
    return _pairs_from_images(
        images, labels, n, seed=seed, same_frac=same_frac, center=True, dtype=dtype, name="fashion"
    )


def batch_schedule(n: int, batch: int, steps: int, *, seed: int = 0) -> list[Tensor]:
    """Mini-batch index sequence: each epoch is a fresh permutation cut into batches.

    The same list drives the dense reference and the fast trainer, so both see the
    same batch sequence. A trailing partial batch of an epoch is dropped.

    Args:
        n: Number of data points.
        batch: Batch size ``|B| <= n``.
        steps: Number of batches.
        seed: Generator seed.

    Returns:
        ``steps`` int64 tensors of shape ``[batch]`` (on CPU).
    """
    check_positive("n", n, integer=True)
    check_positive("batch", batch, integer=True)
    if batch > n:
        raise ValueError(f"batch = {batch} exceeds the dataset size n = {n}; lower --batch")
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - batch + 1, batch):
            if len(out) == steps:
                break
            out.append(perm[s : s + batch])
    return out
