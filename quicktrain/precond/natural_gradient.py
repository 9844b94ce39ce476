"""Natural-gradient representations built from per-example gradients.

With ``U`` the rows ``∇θ_{kn}`` (per example ``n`` and backward vector ``k``, scaled so that ``F = U^T U``),
each representation keeps a different part of ``F`` and solves against ``F + λI``:

* :class:`UnitWise` — 2×2 (weight, bias) blocks per unit of BatchNorm/LayerNorm/GroupNorm; per output unit
  ``[d_in, d_in]`` blocks of Linear/Conv2d; per token ``[D, D]`` blocks of an Embedding (Ollivier, 2015);
* :class:`Diagonal` — ``diag(F)``;
* :class:`LayerBlock` — the dense block of one module, solved by its Cholesky factor or, when rows are fewer than
  parameters, by Sherman–Morrison–Woodbury (SMW-NG, Ren & Goldfarb 2019; SENG, Yang et al. 2022, which
  sketches the rows by random subsampling);
* :class:`FullModel` — the dense Fisher of all parameters together (Cholesky or SMW).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from quicktrain.precond._math import damped_cholesky, damped_cholesky_inverse, smw_factor, smw_solve
from quicktrain.precond.representation import Representation, ema
from quicktrain.precond.stats import (
    KRON_TYPES,
    LayerBatch,
    all_gather_rows,
    all_reduce_mean,
    kron_grad_matrix,
    kron_set_grad,
)

__all__ = ["Diagonal", "FullModel", "LayerBlock", "UnitWise", "flat_rows"]


def flat_rows(batch: LayerBatch, names: list[str]) -> Tensor:
    """Per-example gradients of the parameters ``names`` flattened and concatenated: ``[K*N, P]``."""
    pe = batch.per_example_grads()
    return torch.cat([pe[n].reshape(pe[n].shape[0], -1) for n in names], dim=1)


def _flat(ts: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([ts[n].reshape(-1) for n in names])


def _set_flat(params: dict[str, nn.Parameter], names: list[str], v: Tensor) -> None:
    i = 0
    for n in names:
        p = params[n]
        p.grad = v[i:i + p.numel()].view_as(p).clone()
        i += p.numel()


class UnitWise(Representation):
    """Unit-wise natural gradient blocks (see the module docstring).

    .. math:: F_u = \\sum_{k,n} \\nabla\\theta_{u,kn} \\nabla\\theta_{u,kn}^\\top, \\qquad
        \\Delta\\theta_u = (F_u + \\lambda I)^{-1} \\nabla\\theta_u
    """

    _state = ("F", "F_inv")

    def _unit_rows(self, batch: LayerBatch) -> Tensor:
        m = self.module
        if isinstance(m, KRON_TYPES):
            return batch.kron_per_example()  # [KN, groups, o, i]
        if isinstance(m, nn.Embedding):
            return batch.per_example_grads()["weight"]  # [KN, V, D]
        return batch.unit_grads()  # [KN, U, c]

    def update(self, batch: LayerBatch, decay: float) -> None:
        rows = self._unit_rows(batch)
        f = torch.einsum("n...i,n...j->...ij", rows, rows)
        self.F = ema(self.F, all_reduce_mean(f), decay)

    def update_inverse(self, damping: float) -> None:
        self.F_inv = damped_cholesky_inverse(self.F, damping)

    def _to_units(self, vecs: dict[str, Tensor]) -> Tensor:
        m = self.module
        if isinstance(m, KRON_TYPES):
            return kron_grad_matrix(m, vecs["weight"], vecs.get("bias"))
        if isinstance(m, nn.Embedding):
            return vecs["weight"]
        return torch.stack([vecs[n].reshape(-1) for n in ("weight", "bias") if n in vecs], dim=-1)

    def _from_units(self, u: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
        m = self.module
        if isinstance(m, nn.Embedding):
            return {"weight": u}
        if isinstance(m, KRON_TYPES):
            out = {}
            if "bias" in like:
                out["bias"] = u[..., -1].reshape(like["bias"].shape)
                u = u[..., :-1]
            out["weight"] = u.reshape(like["weight"].shape)
            return out
        names = [n for n in ("weight", "bias") if n in like]
        return {n: u[..., i].reshape(like[n].shape) for i, n in enumerate(names)}

    def precondition(self, damping: float) -> None:
        grads = self.grads()
        u = (self.F_inv @ self._to_units(grads).unsqueeze(-1)).squeeze(-1)
        if isinstance(self.module, KRON_TYPES):
            kron_set_grad(self.module, u)
            return
        for n, t in self._from_units(u, grads).items():
            self.params[n].grad = t.contiguous()

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._from_units((self.F @ self._to_units(vecs).unsqueeze(-1)).squeeze(-1), vecs)


class Diagonal(Representation):
    """Diagonal Fisher ``diag(F) = Σ_{k,n} ∇θ_{kn}^2``; ``Δθ = ∇θ / (diag(F) + λ)``."""

    _state = ("D",)

    def update(self, batch: LayerBatch, decay: float) -> None:
        m = self.module
        if isinstance(m, nn.Linear) and batch.inputs[0].dim() == 2 and len(batch.inputs) == 1:
            a, g = batch.kron_inputs(), batch.kron_grads()  # one position: (g a^T)^2 = g^2 (a^2)^T
            g2 = g[:, 0, 0].square().reshape(-1, a.shape[0], g.shape[-1])  # [K, N, d_out]
            sq = torch.einsum("kno,ni->oi", g2, a[:, 0, 0].square())
            d = {"weight": sq[:, : m.in_features]}
            if m.bias is not None:
                d["bias"] = sq[:, -1]
        else:
            d = {n: t.square().sum(0) for n, t in batch.per_example_grads().items()}
        self.D = {n: ema(None if self.D is None else self.D[n], all_reduce_mean(d[n]), decay) for n in d}

    def update_inverse(self, damping: float) -> None:
        """Nothing to precompute."""

    def precondition(self, damping: float) -> None:
        for n, g in self.grads().items():
            self.params[n].grad = g / (self.D[n] + damping)

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.D[n] * v for n, v in vecs.items()}


def _subsample(rows: Tensor, max_rows: int | None, generator: torch.Generator | None) -> Tensor:
    """Random subset of ``max_rows`` rows rescaled by ``√(K/max_rows)`` (unbiased for ``U^T U``)."""
    if max_rows is None or rows.shape[0] <= max_rows:
        return rows
    idx = torch.randperm(rows.shape[0], generator=generator, device=rows.device)[:max_rows]
    return rows[idx] * math.sqrt(rows.shape[0] / max_rows)


class _DenseFisher:
    """The dense Fisher :class:`LayerBlock` and :class:`FullModel` share, kept for one of two solvers.

    ``cholesky`` keeps the moving average of the empirical Fisher ``F ← ema(F, rowsᵀ rows)`` (averaged over
    ranks) and the Cholesky factor of ``F + λI``, refreshed on inverse steps. ``smw`` keeps the rows of the
    latest batch (gathered over ranks), ``F = UᵀU``, and the factor of ``λI_K + U Uᵀ``, which belongs to those
    rows: it is refreshed at the first solve after them, whatever the inverse interval.
    """

    solver: str
    F: Tensor | None
    U: Tensor | None
    factor: Tensor | None

    def _update_rows(self, rows: Tensor, decay: float) -> None:
        """New statistics from one batch of per-example gradient ``rows`` ``[N, D]``."""
        if self.solver == "smw":
            self.U, self.factor = all_gather_rows(rows), None
        else:
            self.F = ema(self.F, all_reduce_mean(rows.T @ rows), decay)

    def update_inverse(self, damping: float) -> None:
        if self.solver == "cholesky":
            self.factor = damped_cholesky(self.F, damping)

    def _solve(self, g: Tensor, damping: float) -> Tensor:
        """``(F + λI)^{-1} g``: by Sherman–Morrison–Woodbury with ``F = UᵀU`` or from the Cholesky factor."""
        if self.solver == "smw":
            if self.factor is None:
                self.factor = smw_factor(self.U, damping)
            return smw_solve(self.U, g.unsqueeze(-1), damping, self.factor).squeeze(-1)
        return torch.cholesky_solve(g.unsqueeze(-1), self.factor).squeeze(-1)


class LayerBlock(_DenseFisher, Representation):
    """Dense Fisher block of all parameters of one module.

    Args:
        name: module name.
        module: any supported module.
        solver: ``cholesky`` (keeps ``F``, with moving average, and the Cholesky factor of ``F+λI``) or
            ``smw`` (keeps the rows of the latest batch and solves by SMW: ``(λI + U^T U)^{-1} g``).
        max_rows: ``smw`` only: subsample at most this many rows (SENG's sketch); None keeps all.
        max_dim: refuse dense blocks larger than this.
    """

    _state = ("F", "U", "factor")

    def __init__(self, name: str, module: nn.Module, solver: str = "cholesky", max_rows: int | None = None,
                 max_dim: int = 8192) -> None:
        super().__init__(name, module)
        if solver not in ("cholesky", "smw"):
            raise ValueError(f"Unknown solver {solver!r}; choose from ['cholesky', 'smw']")
        self.solver, self.max_rows = solver, max_rows
        self.names = list(self.params)
        size = sum(p.numel() for p in self.params.values())
        if solver == "cholesky" and size > max_dim:
            raise ValueError(f"layer {name!r} has {size} parameters, too many for a dense block (max_dim="
                             f"{max_dim}); use solver='smw' (smw_ng/seng) or a Kronecker method")
        self.generator: torch.Generator | None = None

    def update(self, batch: LayerBatch, decay: float) -> None:
        rows = flat_rows(batch, self.names)
        if self.solver == "smw":
            rows = _subsample(rows, self.max_rows, self.generator)
        self._update_rows(rows, decay)

    def precondition(self, damping: float) -> None:
        out = self._solve(_flat(self.grads(), self.names), damping)
        _set_flat(self.params, self.names, out)

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        v = _flat(vecs, self.names)
        out = self.U.T @ (self.U @ v) if self.solver == "smw" else self.F @ v
        res, i = {}, 0
        for n in self.names:
            res[n] = out[i:i + vecs[n].numel()].view_as(vecs[n])
            i += vecs[n].numel()
        return res


class FullModel(_DenseFisher):
    """Dense Fisher of every preconditioned parameter of the model together (``full_ng``, ``smw_ng``).

    Args:
        modules: ``{name: module}`` in a fixed order.
        solver: ``cholesky`` or ``smw``.
        max_dim: refuse dense matrices larger than this (``cholesky``).
    """

    def __init__(self, modules: dict[str, nn.Module], solver: str = "cholesky", max_dim: int = 8192) -> None:
        if solver not in ("cholesky", "smw"):
            raise ValueError(f"Unknown solver {solver!r}; choose from ['cholesky', 'smw']")
        self.modules, self.solver = modules, solver
        self.keys = [(m, n) for m, mod in modules.items() for n, p in mod.named_parameters(recurse=False)
                     if p.requires_grad]
        size = sum(getattr(modules[m], n).numel() for m, n in self.keys)
        if solver == "cholesky" and size > max_dim:
            raise ValueError(f"the model has {size} preconditioned parameters, too many for the dense Fisher "
                             f"(max_dim={max_dim}); use smw_ng or a layer-wise method")
        self.F: Tensor | None = None
        self.U: Tensor | None = None
        self.factor: Tensor | None = None

    def update(self, batches: dict[str, LayerBatch], decay: float) -> None:
        pes = {m: b.per_example_grads() for m, b in batches.items()}
        rows = torch.cat([pes[m][n].reshape(pes[m][n].shape[0], -1) for m, n in self.keys], dim=1)
        self._update_rows(rows, decay)

    def precondition(self, damping: float) -> None:
        params = [getattr(self.modules[m], n) for m, n in self.keys]
        for (m, n), p in zip(self.keys, params, strict=True):
            if p.grad is None:
                raise RuntimeError(f"parameter {m}.{n} has no gradient; pass ignore_modules=[{m!r}]")
        g = torch.cat([p.grad.reshape(-1) for p in params])
        out = self._solve(g, damping)
        i = 0
        for p in params:
            p.grad = out[i:i + p.numel()].view_as(p).clone()
            i += p.numel()

    def state_dict(self) -> dict[str, Tensor | None]:
        return {"F": self.F, "U": self.U, "factor": self.factor}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        device = getattr(self.modules[self.keys[0][0]], self.keys[0][1]).device
        for k in ("F", "U", "factor"):
            setattr(self, k, None if state[k] is None else state[k].to(device))
