"""Input validation for kron: every failure is a ValueError naming the problem and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_factors(factors: Sequence[Tensor], y: Tensor | None = None) -> tuple[Tensor, ...]:
    """Validate Kronecker factor matrices (and optional targets).

    Args:
        factors: At least one tensor ``[n, d_k]``; all must share ``n``, dtype and device.
        y: Optional targets ``[n]``.

    Returns:
        The factors as a tuple.

    Raises:
        ValueError: On a wrong number of dimensions, mismatched ``n``/dtype/device,
            unsupported dtype, empty factors or non-finite entries.
    """
    if isinstance(factors, Tensor) or len(factors) == 0:
        raise ValueError(
            "factors must be a non-empty sequence of [n, d_k] tensors, e.g. (U, V); "
            "pass a tuple of factor matrices, not a single tensor"
        )
    factors = tuple(factors)
    ref = factors[0]
    for k, f in enumerate(factors):
        if not isinstance(f, Tensor):
            raise ValueError(f"factor {k} is a {type(f).__name__}, not a torch.Tensor; convert it first")
        if f.ndim != 2:
            raise ValueError(
                f"factor {k} has shape {tuple(f.shape)}; each factor must be 2-D [n, d_k] "
                "(one row per data point) — reshape it, e.g. images.reshape(n, -1)"
            )
        if f.shape[0] != ref.shape[0]:
            raise ValueError(
                f"factor shape mismatch: factor {k} has {f.shape[0]} rows but factor 0 has {ref.shape[0]}; "
                "all factors must describe the same n data points (x_i = u_i ⊗ v_i), so pass U and V "
                "with the same first dimension"
            )
        if f.shape[1] == 0 or f.shape[0] == 0:
            raise ValueError(f"factor {k} has shape {tuple(f.shape)}; n and d_k must be positive")
        if f.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"factor {k} has dtype {f.dtype}; use torch.float32 or torch.float64 (call .double())"
            )
        if f.dtype != ref.dtype:
            raise ValueError(
                f"factor dtype mismatch: factor {k} is {f.dtype} but factor 0 is {ref.dtype}; "
                "cast all factors to one dtype"
            )
        if f.device != ref.device:
            raise ValueError(
                f"factor device mismatch: factor {k} is on {f.device} but factor 0 is on {ref.device}; "
                "move all factors to one device"
            )
        bad = (~torch.isfinite(f)).sum().item()
        if bad:
            raise ValueError(
                f"non-finite data: factor {k} has {bad} NaN/inf entries; clean or drop those rows "
                "before training"
            )
    if y is not None:
        check_targets(y, ref)
    return factors


def check_targets(y: Tensor, ref: Tensor) -> None:
    """Validate targets ``[n]`` against a reference factor ``[n, d_k]``."""
    if not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != ref.shape[0]:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(
            f"targets y have shape {shape} but the factors have n = {ref.shape[0]} rows; "
            f"pass y as a 1-D tensor of length {ref.shape[0]}"
        )
    if y.dtype != ref.dtype or y.device != ref.device:
        raise ValueError(
            f"targets y are {y.dtype} on {y.device} but the factors are {ref.dtype} on {ref.device}; "
            "use y.to(U)"
        )
    bad = (~torch.isfinite(y)).sum().item()
    if bad:
        raise ValueError(f"non-finite data: targets y have {bad} NaN/inf entries; clean them before training")


def check_threshold(b: float) -> float:
    """Validate the shifted-ReLU threshold ``b`` (must be finite and ``>= 0``)."""
    b = float(b)
    if not math.isfinite(b) or b < 0:
        raise ValueError(
            f"threshold b = {b} is invalid: b must be a finite number >= 0 (it sets the sparsity, "
            "P(neuron active) = P(N(0,1) > b)); pass e.g. b = sqrt(0.4 * log(m))"
        )
    return b


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite positive number (an int if ``integer``)."""
    if integer and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_indices(idx: Tensor, n: int, device: torch.device) -> Tensor:
    """Validate a batch of data-point indices ``[B]`` into ``range(n)``."""
    idx = torch.as_tensor(idx, device=device)
    if idx.ndim != 1 or idx.numel() == 0 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"batch indices must be a non-empty 1-D integer tensor, got shape {tuple(idx.shape)} "
            f"dtype {idx.dtype}; pass e.g. torch.tensor([0, 5, 7])"
        )
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise ValueError(
            f"batch indices must lie in [0, {n}), got range [{lo}, {hi}]; index the training set"
        )
    return idx.long()
