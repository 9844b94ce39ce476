"""Dense Fisher blocks built from per-example gradients.

With ``U`` the rows ``∇θ_{kn}`` (per example ``n`` and backward vector ``k``, scaled so that ``F = U^T U``):

* :class:`LayerBlock` — the dense block of one module, solved by its Cholesky factor or, when rows are fewer than
  parameters, by Sherman–Morrison–Woodbury (SMW-NG, Ren & Goldfarb 2019; SENG, Yang et al. 2022, which
  sketches the rows by random subsampling);
* :class:`FullModel` — the dense Fisher of all parameters together (Cholesky or SMW).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from quicktrain.precond._math import damped_cholesky, smw_factor, smw_solve
from quicktrain.precond.capture import LayerBatch
from quicktrain.precond.distributed import all_gather_rows, all_reduce_mean
from quicktrain.precond.representations.base import Representation, ema

__all__ = ["FullModel", "LayerBlock", "flat_rows"]


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
