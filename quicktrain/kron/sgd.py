"""Kronecker SGD (Song & Yue, arXiv 2305.08001): SGD whose per-step cost does not depend on d.

State after initialisation (nothing of length ``d`` is kept):

* ``Z ∈ R^{m×n}``, ``Z_ri = ⟨w_r(t), x_i⟩`` — held by the activated-neuron search
  (:mod:`quicktrain.kron.search`: the default column ``"scan"`` or the paper's ``"tree"``);
* ``G ∈ R^{n×n}``, ``G_ij = ⟨x_i, x_j⟩ = Π_k ⟨u^k_i, u^k_j⟩`` (Gram / tensor trick);
* ``C ∈ R^{m×n}``, the accumulated update coefficients, so that
  ``W(t) = W(0) + C X`` with ``X = [x_1; …; x_n]`` (used only to materialise ``W``);
* the output weights ``a``, the threshold ``b``, the step size ``η`` and the initial weights
  (a seed — :class:`ConditionalInit` or :class:`SeededInit`, see :func:`choose_draw` — or given
  ``W(0)``, :class:`ExplicitInit`).

One step on batch ``B`` (``k`` = active neurons per point, ``R`` = touched neurons,
``P ≤ |B| k`` = active pairs):

1. search: ``S_i = {r : Z_ri > b}`` for ``i ∈ B`` — scan ``O(m |B|)`` or tree ``O(|B| k log m)``;
2. forward: ``f_i = m^{-1/2} Σ_{r∈S_i} a_r (Z_ri − b)`` — ``O(P)``;
3. backward: ``c_ri = −η m^{-1/2} a_r (f_i − y_i)`` for ``r ∈ S_i`` — ``O(P)``;
4. ``Z[R, :] += C_B G[B, :]`` — ``O(|R| |B| n)``; the tree also refreshes ``O(|R| n log m)`` nodes;
5. ``C[r, i] += c_ri`` for the ``P`` pairs.

The step state holds no factor matrix, so the step structurally cannot touch a length-``d``
vector (a :class:`ConditionalInit` keeps a float64 copy of the factors, ``n × Σ d_k``, only to
materialise ``W(0)``). Only initialisation and materialisation (:meth:`KronSGD.weight`)
take the factors. Initialisation from a seed draws ``Z(0) ~ N(0, G)`` row by row
(:class:`ConditionalInit`, ``O(n^3 + m n^2)``, no ``d``) where that is cheaper and ``G`` is
well-conditioned, else it draws ``W(0)`` and contracts it (``O(m n d)`` via
:func:`initial_preactivations`, also the cost of :meth:`KronSGD.from_weights`). Device and dtype
follow the input factors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import check_factors, check_indices, check_positive, check_threshold
from ._math import (
    gram_matrix,
    kron_rows,
    preactivations,
    predictions_from_active,
    shifted_relu,
    squared_loss,
    update_coefficients,
)
from .dense import StepResult
from .model import MAX_GRAM_COND, ROW_BLOCK, ConditionalInit, ExplicitInit, KronMLP, SeededInit, gram_condition
from .search import PATHS, choose_path, make_search

__all__ = ["DRAWS", "KronSGD", "choose_draw", "draw_seeded", "initial_preactivations"]

DEFAULT_CHUNK_ELEMS = 1 << 23  # ≈ 32 MB of float32 per streamed block of W(0)
DRAWS = ("conditional", "full")
# The conditional draw must be this many times cheaper in flops than draw-and-contract to be chosen:
# its eigenvalue and Cholesky routines run further below peak than the one big matmul.
_DRAW_MARGIN = 4


def choose_draw(m: int, n: int, d: int, gram_cond: float | None = None) -> tuple[str, str]:
    """How the seeded trainer draws ``Z(0)``: ``"conditional"`` or ``"full"``, and why.

    Flop counts: the conditional draw (:class:`~quicktrain.kron.model.ConditionalInit`) costs
    about ``4 n^3 + m n^2`` (eigenvalues and Cholesky factor of ``G``, then ``H L^T``); drawing
    ``W(0)`` and contracting it costs ``2 m n d`` (plus ``m d`` Gaussian draws, not counted).
    ``"conditional"`` is chosen when it is :data:`_DRAW_MARGIN` times cheaper and
    ``cond(G) ≤`` :data:`~quicktrain.kron.model.MAX_GRAM_COND` (``gram_cond`` is only needed then).
    Deterministic in its arguments.

    Args:
        m: Width.
        n: Number of training points.
        d: Input dimension.
        gram_cond: Condition number of ``G`` (``None``: not computed yet).

    Returns:
        ``(draw, reason)``.
    """
    cond_flops, full_flops = 4 * n**3 + m * n**2, 2 * m * n * d
    if _DRAW_MARGIN * cond_flops > full_flops:
        return "full", f"full: 4n³+mn² = {cond_flops:.3g} flops is not {_DRAW_MARGIN}x below 2mnd = {full_flops:.3g}"
    if gram_cond is not None and gram_cond > MAX_GRAM_COND:
        return "full", f"full: cond(G) = {gram_cond:.3g} > {MAX_GRAM_COND:g}, a conditional W(0) would not be exact"
    cond = "not computed" if gram_cond is None else f"{gram_cond:.3g}"
    return "conditional", f"conditional: 4n³+mn² = {cond_flops:.3g} flops vs 2mnd = {full_flops:.3g}, cond(G) = {cond}"


def draw_seeded(
    init: SeededInit, factors: Sequence[Tensor], draw: str = "auto"
) -> tuple[SeededInit | ConditionalInit, str]:
    """The initial weights a seeded trainer uses, and why: ``init`` itself or its :class:`ConditionalInit`.

    Args:
        init: Seed, width and ``d``.
        factors: Training factors ``[n, d_k]``.
        draw: ``"auto"`` (:func:`choose_draw`) or one of :data:`DRAWS`.

    Returns:
        ``(initial weights, reason)``.
    """
    if draw != "auto" and draw not in DRAWS:
        raise ValueError(f"unknown draw {draw!r}; choose 'auto' or one of {DRAWS}")
    factors = tuple(factors)
    n = factors[0].shape[0]
    if draw == "full":
        return init, "draw='full' requested"
    if draw == "conditional":
        return ConditionalInit.draw(init, factors), "draw='conditional' requested"
    choice, reason = choose_draw(init.m, n, init.d)
    if choice == "full":
        return init, reason
    # cheap enough: now pay O(n^3) for the condition number
    cond = gram_condition(gram_matrix([f.to(torch.float64) for f in factors]))
    choice, reason = choose_draw(init.m, n, init.d, cond)
    return (ConditionalInit.draw(init, factors, gram_cond=cond) if choice == "conditional" else init), reason


def initial_preactivations(
    init: SeededInit | ConditionalInit | ExplicitInit,
    factors: Sequence[Tensor],
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Tensor:
    """``Z(0) = W(0) X^T`` computed from the factors, streaming ``W(0)`` in row blocks.

    .. math::  Z_{ri}(0) = \\langle w_r(0), x_i \\rangle = u_i^\\top W_r(0)\\, v_i

    A :class:`ConditionalInit` asked for its own training factors returns its drawn ``Z(0)``
    (no ``d``-dependent work); for other points it is streamed like the rest.

    Each block of rows (a multiple of :data:`~quicktrain.kron.model.ROW_BLOCK`, one generator
    seed per :data:`ROW_BLOCK` rows) is contracted with all factors at once by
    :func:`preactivations` (one matmul against the last factor, then one batched
    matrix-vector product per remaining factor); there is no Python loop over rows. ``x`` is
    never formed; peak extra memory is about ``chunk_elems`` elements (at least one
    :data:`ROW_BLOCK` of rows).

    Args:
        init: Initial weights (``init.d`` must equal ``Π d_k``).
        factors: K tensors ``[n, d_k]``.
        chunk_elems: Element budget of one block of ``W(0)`` plus its partial contraction.

    Returns:
        ``Z(0)`` of shape ``[m, n]`` in the factors' dtype/device.
    """
    dims = [f.shape[1] for f in factors]
    n, d = factors[0].shape[0], math.prod(dims)
    if d != init.d:
        raise ValueError(f"init.d = {init.d} but the factors give d = Π {dims} = {d}; rebuild the init")
    ref = factors[0]
    if isinstance(init, ConditionalInit) and init.has_factors(factors):
        return init.z0.to(device=ref.device, dtype=ref.dtype)
    rows = max(1, chunk_elems // (d + (d // dims[-1]) * n) // ROW_BLOCK) * ROW_BLOCK
    out = torch.empty(init.m, n, dtype=ref.dtype, device=ref.device)
    # a seeded W(0) is drawn into one reused block (warm memory; a fresh block per chunk page-faults)
    buf = torch.empty(rows, d, dtype=ref.dtype) if isinstance(init, SeededInit) and ref.device.type == "cpu" else None
    for s in range(0, init.m, rows):
        e = min(init.m, s + rows)
        w = init.fill_(buf[: e - s], s) if buf is not None else init.rows(s, e, dtype=ref.dtype, device=ref.device)
        out[s:e] = preactivations(w, factors)
    return out


class _PhaseClock:
    """Adds the seconds between successive :meth:`lap` calls to ``profile[phase]`` (no-op without one)."""

    def __init__(self, profile: dict[str, float] | None, device: torch.device) -> None:
        self.profile, self.device = profile, device
        self.t = self._now() if profile is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.profile is not None:
            t = self._now()
            self.profile[phase] = self.profile.get(phase, 0.0) + t - self.t
            self.t = t


class KronSGD:
    """Kronecker SGD trainer for the two-layer shifted-ReLU network.

    Args:
        factors: K tensors ``[n, d_k]`` (float32/float64, one device); ``x_i = torch.kron(u_i, v_i)``.
        y: Targets ``[n]``.
        m: Width.
        b: Threshold ``b >= 0`` of the shifted ReLU.
        lr: Step size ``η``.
        seed: Seed of ``W(0)`` and ``a``; the dense reference built from :attr:`init`
            (``KronMLP.from_init(trainer.init, ...)``) starts from identical weights.
            :meth:`from_weights` takes explicit ones.
        draw: How the seeded ``W(0)`` is drawn: ``"auto"`` (default, :func:`choose_draw` from
            ``m``, ``n``, ``d`` and ``cond(G)``), ``"conditional"`` (``Z(0) ~ N(0, G)`` directly,
            ``W(0)`` only on materialisation; :class:`ConditionalInit`) or ``"full"`` (draw ``W(0)``
            and contract it; :class:`SeededInit`). The two give different samples of the same
            law; :attr:`draw` and :attr:`draw_reason` say which one was used.
        path: Activated-neuron search, ``"auto"`` (default: :func:`~quicktrain.kron.search.choose_path`
            from ``m``, ``n`` and the fraction of ``Z(0)`` above ``b``), ``"scan"``, ``"blocks"`` or
            ``"tree"`` (the paper's structure). All paths give the same trajectory; :attr:`path` and
            :attr:`path_reason` say which one runs and why.
        chunk_elems: Memory budget (elements) for streaming ``W(0)`` at initialisation.

    Example:
        >>> from quicktrain.kron.data import make_teacher
        >>> ds = make_teacher(32, (4, 4))
        >>> sgd = KronSGD(ds.factors, ds.y, m=64, b=0.5, lr=0.1)
        >>> out = sgd.step(torch.arange(8))
        >>> out.pred.shape, sgd.path
        (torch.Size([8]), 'scan')
    """

    def __init__(
        self,
        factors: Sequence[Tensor],
        y: Tensor,
        *,
        m: int,
        b: float,
        lr: float,
        seed: int = 0,
        path: str = "auto",
        draw: str = "auto",
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    ) -> None:
        factors = check_factors(factors, y)
        check_positive("m", m, integer=True)
        init = SeededInit(m, math.prod(f.shape[1] for f in factors), seed)
        self._setup(factors, y, init, b, lr, path, chunk_elems, draw)

    @classmethod
    def from_weights(
        cls,
        factors: Sequence[Tensor],
        y: Tensor,
        W0: Tensor,  # noqa: N803 - the paper's symbol
        a: Tensor,
        *,
        b: float,
        lr: float,
        path: str = "auto",
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    ) -> KronSGD:
        """The fast trainer started from explicit initial weights ``W(0)`` and output weights ``a``.

        .. math::  Z(0) = W(0) X^\\top,\\qquad f(W, x, a) = \\frac{1}{\\sqrt m}
                   \\sum_r a_r \\max(\\langle w_r, x\\rangle - b, 0)

        Steps equal those of ``DenseSGD(KronMLP(W0, a, b), factors, y, lr=lr)``. ``W0`` is
        contracted with the factors once (``O(m n d)``, BLAS) and then kept by reference only
        to materialise ``W`` (:meth:`weight`, :meth:`predict_new`); the step never reads it.

        Args:
            factors: K tensors ``[n, d_k]``.
            y: Targets ``[n]``.
            W0: ``[m, d]`` initial hidden weights, ``d = Π d_k``, rows in ``torch.kron`` layout.
            a: ``[m]`` output weights (the paper's are ``±1``; any finite values work).
            b: Threshold ``b >= 0``.
            lr: Step size ``η``.
            path: ``"auto"``, ``"scan"``, ``"blocks"`` or ``"tree"`` (as in the constructor).
            chunk_elems: Memory budget (elements) for streaming ``W0`` at initialisation.

        Returns:
            A :class:`KronSGD` at step 0.
        """
        factors = check_factors(factors, y)
        init = ExplicitInit(W0, a)
        d = math.prod(f.shape[1] for f in factors)
        if init.d != d:
            raise ValueError(
                f"W0 has {init.d} columns but the factors give d = Π {[f.shape[1] for f in factors]} = {d}; "
                "pass W0 of shape [m, d]"
            )
        self = cls.__new__(cls)
        self._setup(factors, y, init, b, lr, path, chunk_elems, "given")
        return self

    def _setup(
        self,
        factors: tuple[Tensor, ...],
        y: Tensor,
        init: SeededInit | ExplicitInit,
        b: float,
        lr: float,
        path: str,
        chunk_elems: int,
        draw: str,
    ) -> None:
        self.b = check_threshold(b)
        check_positive("lr", lr)
        check_positive("chunk_elems", chunk_elems, integer=True)
        if path != "auto" and path not in PATHS:
            raise ValueError(f"unknown path {path!r}; choose 'auto' or one of {PATHS}")
        self.lr, self.m = float(lr), init.m
        self.dims = tuple(f.shape[1] for f in factors)
        ref = factors[0]
        self.n = ref.shape[0]
        t0 = time.perf_counter()
        self.a = init.signs(dtype=ref.dtype, device=ref.device)
        self.gram = gram_matrix(factors)
        if isinstance(init, SeededInit):
            init, self.draw_reason = draw_seeded(init, factors, draw)
        else:
            self.draw_reason = "W0 given (from_weights)"
        self.init = init
        z0 = initial_preactivations(init, factors, chunk_elems=chunk_elems)
        self.active_fraction = float((z0 > self.b).sum()) / z0.numel()
        auto, reason = choose_path(self.m, self.n, self.active_fraction)
        self.path = auto if path == "auto" else path
        self.path_reason = reason if path == "auto" else f"path={path!r} requested ({reason.split(':')[0]})"
        self.search = make_search(self.path, z0, self.b)
        self.coef = torch.zeros(self.m, self.n, dtype=ref.dtype, device=ref.device)
        self.y = y
        self.steps = 0
        self.init_seconds = time.perf_counter() - t0

    def use_path(self, path: str) -> None:
        """Switch the activated-neuron search to ``path`` (rebuilt from the current ``Z``, ``O(m n)``).

        The trajectory does not change (all paths return the same pairs in the same order).
        """
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
        self.search = make_search(path, self.Z, self.b)
        self.path, self.path_reason = path, f"path={path!r} set by use_path"

    @property
    def draw(self) -> str:
        """How ``W(0)`` was drawn: ``"conditional"``, ``"full"`` or ``"given"`` (:meth:`from_weights`)."""
        if isinstance(self.init, ConditionalInit):
            return "conditional"
        return "full" if isinstance(self.init, SeededInit) else "given"

    def __repr__(self) -> str:
        return (
            f"KronSGD(m={self.m}, n={self.n}, dims={self.dims}, b={self.b:g}, lr={self.lr:g}, "
            f"path={self.path!r}, steps={self.steps})"
        )

    # ------------------------------------------------------------ properties
    @property
    def Z(self) -> Tensor:  # noqa: N802 - the paper's symbol
        """Current pre-activations ``Z_ri = ⟨w_r(t), x_i⟩``, ``[m, n]`` (view; read-only)."""
        return self.search.leaves

    @property
    def device(self) -> torch.device:
        """Device of all state tensors."""
        return self.gram.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of all state tensors."""
        return self.gram.dtype

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def predict(self, idx: Tensor) -> Tensor:
        """Predictions ``f(W(t), x_i, a)`` on training points ``idx`` (no update)."""
        idx = check_indices(idx, self.n, self.device)
        act = self.search.find(idx)
        return predictions_from_active(act.pos, act.neuron, act.z, self.a, self.b, idx.numel(), self.m)

    @torch.no_grad()
    def step(self, idx: Tensor, *, profile: dict[str, float] | None = None) -> StepResult:
        """One SGD step on the batch of training points ``idx`` (no length-``d`` work).

        Args:
            idx: ``[B]`` indices into the training set (duplicates allowed).
            profile: If given, seconds spent in each phase (``search``, ``forward_backward``,
                ``update_Z``, ``refresh``, ``update_C``) are added to it (device-synchronised;
                for benchmarks, it slows the step).

        Returns:
            :class:`StepResult` with predictions and loss *before* the update.
        """
        clock = _PhaseClock(profile, self.device)
        idx = check_indices(idx, self.n, self.device)
        # search + forward: only the activated neurons S_i
        act = self.search.find(idx)
        clock.lap("search")
        pred = predictions_from_active(act.pos, act.neuron, act.z, self.a, self.b, idx.numel(), self.m)
        resid = pred - self.y[idx]
        loss = squared_loss(pred, self.y[idx])
        # backward: coefficient c_ri of x_i in the update of w_r, for each active pair
        coef = update_coefficients(resid[act.pos], self.a[act.neuron], self.lr, self.m)
        # C_B ∈ R^{|R|×|B|}; (row, pos) pairs are distinct, duplicates of idx sit in separate columns
        cb = torch.zeros(act.touched.numel(), idx.numel(), dtype=self.dtype, device=self.device)
        cb[act.row, act.pos] = coef
        clock.lap("forward_backward")
        # Z[R, :] += C_B G[B, :] through the Gram matrix, then let the structure catch up
        g_rows = self.gram[idx]
        self.search.add_rows_(act.touched, cb @ g_rows)
        clock.lap("update_Z")
        self.search.refresh_(act.touched, cb, g_rows)
        clock.lap("refresh")
        # keep W(t) = W(0) + C X materialisable: C[r, idx_p] += c_rp for the P pairs only
        self.coef.view(-1).index_add_(0, act.neuron * self.n + idx[act.pos], coef)
        clock.lap("update_C")
        self.steps += 1
        return StepResult(pred, loss, n_active=act.pos.numel(), n_touched=act.touched.numel())

    # ------------------------------------------------------- materialisation
    def _check_train_factors(self, factors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        factors = check_factors(factors)
        dims = tuple(f.shape[1] for f in factors)
        if dims != self.dims or factors[0].shape[0] != self.n:
            raise ValueError(
                f"factors have n = {factors[0].shape[0]}, dims = {dims} but the trainer was built with "
                f"n = {self.n}, dims = {self.dims}; pass the training factors"
            )
        g = gram_matrix(factors).to(self.gram)
        tol = 1e-4 if self.dtype == torch.float32 else 1e-9
        if not torch.allclose(g, self.gram, rtol=tol, atol=tol):
            raise ValueError("factors do not reproduce the training Gram matrix; pass the training factors")
        return factors

    @torch.no_grad()
    def weight(self, factors: Sequence[Tensor], *, chunk: int = 256) -> Tensor:
        """Materialise ``W(t) = W(0) + C X`` (``[m, d]``; d-dependent, on request only).

        .. math::  w_r(t) = w_r(0) + \\sum_{i=1}^{n} C_{ri}\\, x_i

        Args:
            factors: The training factors (validated against the stored Gram matrix).
            chunk: Data points per block of explicit ``x_i`` rows.

        Returns:
            Tensor ``[m, d]``.
        """
        factors = self._check_train_factors(factors)
        w = self.init.weight(dtype=self.dtype, device=self.device)
        for s in range(0, self.n, chunk):
            w += self.coef[:, s : s + chunk] @ kron_rows([f[s : s + chunk] for f in factors])
        return w

    def model(self, factors: Sequence[Tensor]) -> KronMLP:
        """The trained network as an ``nn.Module`` (materialises ``W``)."""
        return KronMLP(self.weight(factors), self.a.clone(), self.b)

    @torch.no_grad()
    def predict_new(self, new_factors: Sequence[Tensor], train_factors: Sequence[Tensor]) -> Tensor:
        """Predictions on unseen Kronecker points without materialising ``W``.

        .. math::  \\langle w_r(t), x \\rangle = \\langle w_r(0), x\\rangle
                   + \\sum_i C_{ri} \\langle x_i, x\\rangle

        The first term streams ``W(0)`` (``O(m d n_new)``, like initialisation); the second
        uses the cross Gram matrix of the factors.

        Args:
            new_factors: K tensors ``[n_new, d_k]``.
            train_factors: The training factors.

        Returns:
            ``[n_new]`` predictions.
        """
        new_factors = check_factors(new_factors)
        train_factors = self._check_train_factors(train_factors)
        if tuple(f.shape[1] for f in new_factors) != self.dims:
            raise ValueError(
                f"new factors have dims {tuple(f.shape[1] for f in new_factors)} but the trainer uses "
                f"{self.dims}; new points must have the same factor layout"
            )
        z = initial_preactivations(self.init, new_factors)
        cross = None
        for f, g in zip(train_factors, new_factors, strict=True):
            cross = f @ g.T if cross is None else cross * (f @ g.T)
        z += self.coef @ cross
        return shifted_relu(z, self.b).T @ self.a / math.sqrt(self.m)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: Z, G, C, a, y, hyper-parameters, path, init and step count."""
        return {
            "Z": self.Z.clone(),
            "gram": self.gram.clone(),
            "coef": self.coef.clone(),
            "a": self.a.clone(),
            "y": self.y.clone(),
            "b": self.b,
            "lr": self.lr,
            "m": self.m,
            "dims": self.dims,
            "init": self.init,
            "path": self.path,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (shapes must match this trainer; the saved path is kept)."""
        if tuple(state["dims"]) != self.dims or state["m"] != self.m or state["Z"].shape != self.Z.shape:
            raise ValueError(
                "state_dict was saved by a trainer with different m/dims/n; build a matching one"
            )
        self.b, self.lr, self.steps = float(state["b"]), float(state["lr"]), int(state["steps"])
        self.init, self.path = state["init"], state["path"]
        self.path_reason = f"path={self.path!r} restored from a state_dict"
        self.draw_reason = f"draw={self.draw!r} restored from a state_dict"
        self.gram = state["gram"].to(self.device, self.dtype)
        self.coef = state["coef"].to(self.device, self.dtype, copy=True)
        self.a = state["a"].to(self.device, self.dtype)
        self.y = state["y"].to(self.device, self.dtype)
        self.search = make_search(self.path, state["Z"].to(self.device, self.dtype), self.b)
