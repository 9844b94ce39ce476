"""Output channels of chain models (the registry's ``mlp`` and ``cnn``): find, mask and remove them.

A hidden Linear/Conv2d layer (the *producer*) feeds, possibly through a BatchNorm and an element-wise
activation/pooling, exactly one next Linear/Conv2d (the *consumer*). Zeroing a channel's weight row, bias and
BatchNorm scale and shift makes its activation exactly zero (``ReLU(0) = 0``, pooling of zeros is zero), so
deleting the channel from the producer, the BatchNorm and the consumer's inputs gives a smaller model with the
same outputs as the masked one (:func:`mask_channels` vs :func:`shrink`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quicktrain.models.small import MLP, SmallCNN
from quicktrain.precond import KRON_TYPES
from quicktrain.train.hooks import unwrap

__all__ = ["STRUCTURED_MODELS", "ChannelGroup", "channel_groups", "mask_channels", "shrink"]

# Models that are plain chains of Linear/Conv2d (+ BatchNorm) layers, so a channel's removal is local.
STRUCTURED_MODELS: tuple[type[nn.Module], ...] = (MLP, SmallCNN)


@dataclass(frozen=True)
class ChannelGroup:
    """The output channels of one hidden Linear/Conv2d layer and what they feed.

    Attributes:
        producer: name of the Linear/Conv2d whose output channels are scored/removed.
        norm: name of the BatchNorm right after it, or None.
        consumer: name of the next Linear/Conv2d, whose input channels are removed with them.
        features: inputs of the consumer per channel (``H·W`` when a conv's output is flattened into a Linear).
    """

    producer: str
    norm: str | None
    consumer: str
    features: int


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The hidden layers of a chain model (the registry's ``mlp`` and ``cnn``), in order.

    Raises:
        ValueError: for other models, whose channels may feed residual additions or several consumers.
    """
    inner = unwrap(model)
    if not isinstance(inner, STRUCTURED_MODELS):
        raise ValueError(f"structured (channel) pruning supports the registry's 'mlp' and 'cnn' (plain chains of "
                         f"layers), not {type(inner).__name__}; prune unstructured instead (drop --structured)")
    layers = [(n, m) for n, m in inner.named_modules() if isinstance(m, (*KRON_TYPES, nn.BatchNorm2d))]
    weights = [i for i, (_, m) in enumerate(layers) if isinstance(m, KRON_TYPES)]
    groups = []
    for i, j in zip(weights[:-1], weights[1:], strict=True):
        (pname, prod), (cname, cons) = layers[i], layers[j]
        norm = layers[i + 1][0] if j == i + 2 else None
        width = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
        fan_in = cons.in_features if isinstance(cons, nn.Linear) else cons.in_channels
        if fan_in % width or (isinstance(cons, nn.Conv2d) and (fan_in != width or cons.groups != 1)):
            raise ValueError(f"layer {cname!r} takes {fan_in} inputs, not a multiple of {pname!r}'s {width} "
                             "channels; this model is not a plain chain")
        groups.append(ChannelGroup(pname, norm, cname, fan_in // width))
    return groups


@torch.no_grad()
def mask_channels(model: nn.Module, keep: dict[str, Tensor]) -> None:
    """Zero, in place, every channel not in ``keep[producer]``: its weight row, bias and BatchNorm scale/shift."""
    inner = unwrap(model)
    for group in channel_groups(inner):
        if group.producer not in keep:
            continue
        for name in (group.producer, group.norm):
            if name is None:
                continue
            module = inner.get_submodule(name)
            drop = torch.ones(module.weight.shape[0], dtype=torch.bool, device=module.weight.device)
            drop[keep[group.producer]] = False
            for p in module.parameters(recurse=False):
                p[drop] = 0


def _smaller(module: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None) -> nn.Module:
    """A copy of a Linear/Conv2d/BatchNorm2d keeping output rows ``out_idx`` and input columns ``in_idx``."""
    w = module.weight.detach()
    f = {"device": w.device, "dtype": w.dtype}
    if isinstance(module, nn.BatchNorm2d):
        new = nn.BatchNorm2d(len(out_idx), eps=module.eps, momentum=module.momentum, affine=module.affine,
                             track_running_stats=module.track_running_stats, **f)
        state = {k: v[out_idx] if v.dim() == 1 else v for k, v in module.state_dict().items()}
        new.load_state_dict(state)
        return new
    w = w if out_idx is None else w[out_idx]
    w = w if in_idx is None else w[:, in_idx]
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias, **f)
    else:
        new = nn.Conv2d(w.shape[1], w.shape[0], module.kernel_size, module.stride, module.padding, module.dilation,
                        bias=bias, padding_mode=module.padding_mode, **f)
    new.weight.copy_(w)
    if bias:
        new.bias.copy_(module.bias.detach() if out_idx is None else module.bias.detach()[out_idx])
    return new


@torch.no_grad()
def shrink(model: nn.Module, keep: dict[str, Tensor]) -> nn.Module:
    """A smaller copy of a chain model without the channels missing from ``keep``.

    Args:
        model: a chain model (:func:`channel_groups`); not modified.
        keep: ``{producer name: indices of the output channels to keep}`` (producers not named keep all).

    Returns:
        The new model, whose outputs equal those of ``model`` after :func:`mask_channels` with the same ``keep``.
    """
    new = copy.deepcopy(unwrap(model))
    out_idx: dict[str, Tensor] = {}
    in_idx: dict[str, Tensor] = {}
    for group in channel_groups(new):
        if group.producer not in keep:
            continue
        k = torch.as_tensor(keep[group.producer]).sort().values
        if k.numel() == 0:
            raise ValueError(f"keep at least one channel of {group.producer!r}")
        out_idx[group.producer] = k
        if group.norm is not None:
            out_idx[group.norm] = k
        s = group.features
        in_idx[group.consumer] = (k[:, None] * s + torch.arange(s)).reshape(-1)
    for name in {*out_idx, *in_idx}:
        parent, _, child = name.rpartition(".")
        old = new.get_submodule(name)
        small = _smaller(old, out_idx.get(name), in_idx.get(name)).train(old.training)
        setattr(new.get_submodule(parent) if parent else new, child, small)
    return new
