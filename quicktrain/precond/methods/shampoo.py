"""Shampoo (Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018).

A parameter of order ``k`` (a vector ``k=1``, a Linear weight ``k=2``, a Conv2d weight ``k=4``) gets one
statistic per axis, the gradient contracted with itself over all other axes, summed over steps (or averaged
with ``ema_decay``), and the update contracts the gradient with each statistic's ``-1/(2k)`` power
(Alg. 2 of the paper):

.. math::
    L^{(i)}_t = L^{(i)}_{t-1} + G_{t,(i)} G_{t,(i)}^\\top, \\qquad
    \\Delta W = G_t \\times_1 (L^{(1)}_t + \\epsilon I)^{-1/2k} \\cdots \\times_k (L^{(k)}_t + \\epsilon I)^{-1/2k}

(for a matrix: ``(L + εI)^{-1/4} G (R + εI)^{-1/4}``; ``ε`` is ``damping``, or ``damping · λ_max`` with
``relative_eps``). The roots are computed every ``inverse_interval`` steps by ``eigh`` in float64, batched over
all statistics of the same size. Axes of length 1 or longer than ``max_dim`` keep the identity (the paper's
treatment of large dimensions).

Blocking and grafting follow Distributed Shampoo (Shi et al., "A Distributed Data-Parallel PyTorch
Implementation of the Distributed Shampoo Optimizer", 2023, §3.1 and §2.2): every axis longer than
``block_size`` is cut into blocks of at most that length, and each block of the parameter is a parameter of
its own (its statistics are ``block_size²`` at most, so a ``[128, 3136]`` weight costs seven ``128²`` and seven
``≤ 512²`` roots instead of a ``3136²`` one). With ``grafting`` each block's Shampoo direction ``S_b`` takes the
norm of another method's step ``D_b`` on the same block, ``Δ_b = ‖D_b‖ / ‖S_b‖ · S_b``: ``sgd`` (``D = G``) or
``adam`` (``D = G / (√v̂ + 10⁻⁸)``, ``v ← β₂ v + (1-β₂) G²`` bias-corrected, ``β₂ = 0.999``; RMSprop's
direction, as the optimizer's momentum is applied after the maker).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from quicktrain.precond.grafting import Grafting
from quicktrain.precond.makers import check_common, check_method, check_unsupported, due, trainable_params
from quicktrain.precond.registry import register
from quicktrain.precond.representations import ema, first_nonfinite
from quicktrain.train.hooks import unwrap

__all__ = ["ShampooGradients"]


class ShampooGradients:
    """Shampoo gradient maker (see the module docstring).

    Args:
        model: the model (possibly DDP-wrapped; the gradient it preconditions is already rank-averaged).
        loss_fn: any loss.
        damping: ``ε`` added to every eigenvalue of every statistic.
        curvature_interval: update the statistics every this many steps.
        inverse_interval: recompute the inverse roots every this many steps.
        warmup: update both every step before this step.
        ema_decay: None sums the statistics as the paper does; a value averages them.
        ignore_modules: names/types/objects whose parameters keep the plain gradient.
        unsupported: validated only: Shampoo preconditions a parameter of any module by its shape.
        max_dim: axes (of a block) longer than this are not preconditioned.
        relative_eps: use ``ε · λ_max(L)`` instead of ``ε`` (the reference implementation's ridge).
        block_size: cut axes longer than this into blocks (None: no blocking).
        grafting: ``none``, ``sgd`` or ``adam``: the norm each block's step takes.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, damping: float = 1e-4,
                 curvature_interval: int = 1, inverse_interval: int = 1, warmup: int = 0,
                 ema_decay: float | None = None, ignore_modules: Iterable[Any] = (), unsupported: str = "error",
                 max_dim: int = 4096, relative_eps: bool = False, block_size: int | None = 1024,
                 grafting: str = "none") -> None:
        check_common(damping, curvature_interval, inverse_interval, warmup, ema_decay)
        check_unsupported(unsupported)
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be an integer >= 1 or None, got {block_size!r}")
        self.model, self.loss_fn = model, loss_fn
        self.damping, self.ema_decay, self.max_dim, self.relative_eps = damping, ema_decay, max_dim, relative_eps
        self.curvature_interval, self.inverse_interval, self.warmup = curvature_interval, inverse_interval, warmup
        self.grafting = Grafting(grafting)
        self.params = trainable_params(unwrap(model), ignore_modules)
        self.blocks = {n: _blocks(_shape(p), block_size) for n, p in self.params.items()}
        self.axes = {n: [[i for i, sl in enumerate(b) if 1 < sl.stop - sl.start <= max_dim] for b in blocks]
                     for n, blocks in self.blocks.items()}
        self.stats: dict[str, list[dict[str, Tensor]]] = {}
        self.roots: dict[str, list[dict[str, Tensor]]] = {}
        self.step = 0

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(inputs)
        loss = self.loss_fn(logits, targets)
        loss.backward()
        t = self.step
        grads = {}
        for name, p in self.params.items():
            if p.grad is None:
                raise RuntimeError(f"parameter {name!r} has no gradient; pass ignore_modules=[...] for it")
            grads[name] = p.grad.reshape(_shape(p))
        if due(t, self.curvature_interval, self.warmup) or not self.stats:
            self._update_statistics(grads)
        if due(t, self.inverse_interval, self.warmup) or not self.roots:
            self._update_roots()
        for name, p in self.params.items():
            g, blocks = grads[name], self.blocks[name]
            graft = self.grafting.direction(name, g, t)
            if len(blocks) == 1 and graft is None:
                out = _contract(g, self.roots[name][0])
            else:
                out = torch.empty_like(g)
                for idx, roots in zip(blocks, self.roots[name], strict=True):
                    s = _contract(g[idx], roots)
                    if graft is not None:  # Δ_b = ‖D_b‖/‖S_b‖ · S_b
                        s = s * Grafting.scale([s], [graft[idx]])
                    out[idx] = s
            p.grad = out.reshape(p.shape).contiguous()
        self._check(t)
        self.step += 1
        return loss.detach(), logits.detach()

    def _update_statistics(self, grads: dict[str, Tensor]) -> None:
        for name, g in grads.items():
            per_block = self.stats.setdefault(name, [{} for _ in self.blocks[name]])
            for idx, axes, st in zip(self.blocks[name], self.axes[name], per_block, strict=True):
                gb = g[idx]
                for i in axes:
                    other = [j for j in range(gb.dim()) if j != i]
                    new = torch.tensordot(gb, gb, dims=(other, other))
                    old = st.get(str(i))
                    st[str(i)] = (new if old is None else old + new) if self.ema_decay is None \
                        else ema(old, new, self.ema_decay)

    def _update_roots(self) -> None:
        """All ``(L + εI)^{-1/2k}`` with one batched float64 ``eigh`` per statistic size."""
        by_size: dict[int, list[tuple[str, int, str, float]]] = {}
        for name, per_block in self.stats.items():
            order = len(_shape(self.params[name]))
            for b, st in enumerate(per_block):
                for key, m in st.items():
                    by_size.setdefault(m.shape[0], []).append((name, b, key, -1.0 / (2 * order)))
        self.roots = {name: [{} for _ in self.blocks[name]] for name in self.params}
        for items in by_size.values():
            mats = torch.stack([self.stats[n][b][k] for n, b, k, _ in items]).double()
            s, u = torch.linalg.eigh(0.5 * (mats + mats.transpose(-1, -2)))
            s = s.clamp_min(0.0)
            eps = self.damping * s[:, -1:].clamp_min(1e-30) if self.relative_eps else self.damping
            power = torch.tensor([pw for *_, pw in items], dtype=s.dtype, device=s.device).unsqueeze(-1)
            roots = (u * ((s + eps) ** power).unsqueeze(-2)) @ u.transpose(-1, -2)
            for (n, b, k, _), r in zip(items, roots, strict=True):
                self.roots[n][b][k] = r.to(self.stats[n][b][k].dtype)

    def _check(self, t: int) -> None:
        bad = first_nonfinite([(n, p.grad) for n, p in self.params.items()])
        if bad is not None:
            raise FloatingPointError(f"shampoo: non-finite update of {bad!r} at step {t}; raise the damping")

    def state_dict(self) -> dict[str, Any]:
        return {"method": "shampoo", "step": self.step, "stats": self.stats, "roots": self.roots,
                "second_moment": self.grafting.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_method(state, "shampoo")
        self.step = int(state["step"])
        dev = {n: p.device for n, p in self.params.items()}
        for key in ("stats", "roots"):
            setattr(self, key, {n: [{k: v.to(dev[n]) for k, v in d.items()} for d in blocks]
                                for n, blocks in state[key].items()})
        self.grafting.load_state_dict(state["second_moment"], dev)


def _blocks(shape: tuple[int, ...], block_size: int | None) -> list[tuple[slice, ...]]:
    """The blocks of a tensor of ``shape`` whose sides are at most ``block_size`` (one block when None)."""
    if block_size is None:
        return [tuple(slice(0, d) for d in shape)]
    cuts = [[slice(i, min(i + block_size, d)) for i in range(0, d, block_size)] for d in shape]
    return list(itertools.product(*cuts))


def _contract(g: Tensor, roots: dict[str, Tensor]) -> Tensor:
    """``g ×_1 R_1 ⋯ ×_k R_k`` (identity on the axes without a root)."""
    out = g
    for i in range(g.dim()):  # contracting axis 0 each time cycles the axes back into order
        key = str(i)
        out = torch.tensordot(out, roots[key], dims=([0], [0])) if key in roots else out.movedim(0, -1)
    return out


def _shape(p: Tensor) -> tuple[int, ...]:
    return tuple(p.shape) if p.dim() > 0 else (1,)


@register("shampoo")
def shampoo(model: nn.Module, loss_fn: nn.Module, **config: Any) -> ShampooGradients:
    """Shampoo; see :class:`ShampooGradients` for options."""
    return ShampooGradients(model, loss_fn, **config)
