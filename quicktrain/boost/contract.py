"""Exact contraction of a linearised giant back into the tiny network (NetBooster, Yu et al., 2023).

Once every PLT slope is 1, each inserted block is affine per pixel. With eval-mode BatchNorm
:math:`\\mathrm{BN}(z) = a \\odot z + b`, :math:`a = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}`,
:math:`b = \\beta - a \\odot \\mu` (running statistics), block :math:`B(z) = z + \\mathrm{BN}_2(P\\,
\\mathrm{BN}_1(E z))` is

.. math::

    B(z) = M z + c, \\qquad M = I + \\operatorname{diag}(a_2)\\, P \\operatorname{diag}(a_1)\\, E, \\qquad
    c = a_2 \\odot (P b_1) + b_2,

and ``depth`` blocks compose to :math:`M = M_d \\cdots M_1`, :math:`c = M_d(\\cdots(M_2 c_1 + c_2)\\cdots) +
c_d`. With :math:`E, P` grouped like the layer :math:`L`, :math:`M` is block diagonal over :math:`L`'s
groups, so for :math:`L(x) = W * x + b_L` (any kernel, stride, padding, dilation, groups)

.. math::

    M (W * x + b_L) + c = (M W) * x + (M b_L + c), \\qquad (MW)_{o} = \\textstyle\\sum_{o'} M_{o o'} W_{o'},

a layer of exactly :math:`L`'s shape. If :math:`L` has no bias, the constant goes into the running mean of
the BatchNorm that follows it: :math:`\\mathrm{BN}_{\\mu}(z + c) = \\mathrm{BN}_{\\mu - c}(z)`, exact in eval
mode (and in train mode the batch mean removes any constant anyway).

**Contraction uses eval-mode (running) BatchNorm statistics of the blocks**: the contracted model equals the
linearised giant in ``eval()`` mode. All composition runs in float64 and is cast back to the layer's dtype.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .expand import BoostedLayer, ExpansionBlock, boosted_layers
from .plt import plt_activations


def bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as a per-channel affine map ``(a, b)`` in float64: ``BN(z) = a * z + b``.

    .. math:: a = \\gamma / \\sqrt{\\sigma^2_\\text{run} + \\epsilon}, \\qquad b = \\beta - a\\, \\mu_\\text{run}

    Raises:
        ValueError: if the BatchNorm has no running statistics (its eval mode is not affine).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} has no running statistics; its eval-mode output is not a fixed affine map")
    var, mean = bn.running_var.double(), bn.running_mean.double()
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    b = -a * mean
    if bn.bias is not None:
        b = b + bn.bias.double()
    return a, b


def pointwise_matrix(module: nn.Module) -> Tensor:
    """The dense float64 matrix of a 1x1 (grouped) ``Conv2d`` or a ``Linear`` without bias.

    A grouped 1x1 convolution with weight ``[out, in/g, 1, 1]`` becomes the block-diagonal ``[out, in]``
    matrix with :math:`g` blocks of shape ``[out/g, in/g]``.
    """
    if isinstance(module, nn.Linear):
        return module.weight.double()
    g = module.groups
    w = module.weight.double().flatten(1)  # [out, in/g]
    return torch.block_diag(*w.reshape(g, w.shape[0] // g, w.shape[1]).unbind(0))


def block_affine(block: ExpansionBlock) -> tuple[Tensor, Tensor]:
    """``(M, c)`` of one linearised block, :math:`B(z) = Mz + c` (float64, eval-mode BatchNorms).

    .. math:: M = I + \\operatorname{diag}(a_2) P \\operatorname{diag}(a_1) E, \\qquad c = a_2 \\odot (P b_1) + b_2
    """
    a1, b1 = bn_affine(block.bn1)
    a2, b2 = bn_affine(block.bn2)
    e, p = pointwise_matrix(block.expand), pointwise_matrix(block.project)
    eye = torch.eye(p.shape[0], dtype=torch.float64, device=p.device)
    m = eye + (a2[:, None] * p) @ (a1[:, None] * e)
    c = a2 * (p @ b1) + b2
    return m, c


def blocks_affine(boosted: BoostedLayer) -> tuple[Tensor, Tensor]:
    """``(M, c)`` of all blocks of a :class:`BoostedLayer`, composed in order (float64)."""
    m, c = None, None
    for block in boosted.blocks:
        mb, cb = block_affine(block)
        m, c = (mb, cb) if m is None else (mb @ m, mb @ c + cb)
    assert m is not None and c is not None
    return m, c


def fold_affine(layer: nn.Module, m: Tensor, c: Tensor) -> tuple[nn.Module, Tensor | None]:
    """A copy of ``layer`` computing :math:`M\\,L(x) + c`, and the part of ``c`` it could not hold.

    .. math:: W' = M W \\ (\\text{over the flattened kernel of each output channel}), \\qquad b' = M b + c

    Returns:
        ``(new_layer, None)`` if ``layer`` has a bias; else ``(new_layer, c)`` - the caller must put ``c``
        into the following BatchNorm's running mean.
    """
    new = copy.deepcopy(layer)
    w = layer.weight.double()
    new_w = (m @ w.reshape(w.shape[0], -1)).reshape(w.shape)
    with torch.no_grad():
        new.weight.copy_(new_w.to(layer.weight.dtype))
        if layer.bias is None:
            return new, c
        new.bias.copy_((m @ layer.bias.double() + c).to(layer.bias.dtype))
    return new, None


def check_linearised(giant: nn.Module) -> None:
    """Raise unless every PLT activation of ``giant`` has slope exactly 1 (the blocks are affine).

    Raises:
        ValueError: naming the activations whose slope is below 1 and how to fix it.
    """
    bad = {n: a.negative_slope for n, a in plt_activations(giant).items() if a.negative_slope != 1.0}
    if bad:
        shown = ", ".join(f"{n}={s:.4g}" for n, s in list(bad.items())[:5])
        raise ValueError(
            f"cannot contract: {len(bad)} PLT activation(s) are not linear yet (slope < 1: {shown}"
            f"{', ...' if len(bad) > 5 else ''}); finish the PLT schedule or call "
            "quicktrain.boost.set_slope(giant, 1.0) - which changes the giant's function - and fine-tune first"
        )


def contract(giant: nn.Module) -> nn.Module:
    """Fold every linearised :class:`BoostedLayer` of ``giant`` back into its original layer.

    Pure: ``giant`` is not modified. The result has exactly the tiny network's modules, ``state_dict`` keys,
    shapes, parameter count and MACs, and equals the giant in ``eval()`` mode (uses the blocks' running
    BatchNorm statistics). Train/eval mode is kept.

    Args:
        giant: a model returned by :func:`quicktrain.boost.expand` (and trained), all PLT slopes 1.

    Returns:
        The contracted tiny network.

    Raises:
        ValueError: if a slope is below 1, if ``giant`` has no expanded layers, or if a bias sink is missing.
        TypeError: if ``giant`` is wrapped in ``DistributedDataParallel``.
    """
    if isinstance(giant, nn.parallel.DistributedDataParallel):
        raise TypeError("contract the bare model, not its DistributedDataParallel wrapper (use model.module)")
    layers = boosted_layers(giant)
    if not layers:
        raise ValueError("model has no expanded (BoostedLayer) layers; nothing to contract - is it the tiny model?")
    check_linearised(giant)
    tiny = copy.deepcopy(giant)
    with torch.no_grad():
        for name, boosted in boosted_layers(tiny).items():
            m, c = blocks_affine(boosted)
            new, leftover = fold_affine(boosted.layer, m, c)
            if leftover is not None:
                if boosted.bias_sink is None:
                    raise ValueError(f"layer {name!r} has no bias and no BatchNorm to absorb the block's bias")
                sink = tiny.get_submodule(boosted.bias_sink)
                sink.running_mean.copy_((sink.running_mean.double() - leftover).to(sink.running_mean.dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(tiny.get_submodule(parent_name) if parent_name else tiny, child, new)
    return tiny


__all__ = [
    "block_affine",
    "blocks_affine",
    "bn_affine",
    "check_linearised",
    "contract",
    "fold_affine",
    "pointwise_matrix",
]
