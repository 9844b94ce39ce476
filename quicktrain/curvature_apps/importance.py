"""Parameter and channel importance from curvature (Optimal Brain Damage) and from magnitude.

LeCun, Denker & Solla, "Optimal Brain Damage", NeurIPS 1990, eqs. 5-6: with the loss expanded to second order
at a minimum and the curvature taken diagonal, deleting parameter ``i`` (``δθ_i = -θ_i``) costs

.. math:: s_i = \\tfrac12 F_{ii} \\theta_i^2 .

``F`` is any representation of :func:`quicktrain.precond.compute_curvature` (the ``exact`` Fisher is the
Gauss-Newton matrix, whose diagonal OBD computes). For K-FAC's block ``F_l ≈ A ⊗ G`` of a Linear/Conv2d layer,
acting on ``W̃ = [W, b]`` reshaped to ``[groups, d_out, d_in+1]`` (a conv's input index runs over
``(c_in, kh, kw)``, the bias is the last column), the diagonal is

.. math:: F_{(o,i),(o,i)} = G_{oo} A_{ii}, \\qquad \\text{i.e. } \\operatorname{diag}(F) = \\operatorname{diag}(G)
    \\operatorname{diag}(A)^\\top

mapped back to the weight's layout; for an Embedding ``diag(A) diag(G)^T`` over ``[V, D]``; for unit-wise
blocks ``F_u`` their diagonals.

Removing a whole output channel ``c`` (its weight row and bias, and the scale and shift of the BatchNorm that
follows) sets ``δθ = -θ`` on that group at once; the channel's OBD saliency is the quadratic form over the
group, which uses the off-diagonal curvature inside each layer (for a diagonal ``F`` it is the sum of the
group's ``s_i``; for K-FAC, ``½ G_{cc} θ̃_c^T A θ̃_c`` plus the BatchNorm unit's block):

.. math:: S_c = \\tfrac12 \\delta_c^\\top F \\delta_c, \\qquad
    \\delta_c = \\theta \\odot \\mathbb 1[\\text{channel } c].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quicktrain.curvature_apps.channels import ChannelGroup, channel_groups
from quicktrain.precond import (
    CurvatureEstimate,
    Diagonal,
    KronEmbedding,
    KronFactored,
    LayerBlock,
    Representation,
    UnitWise,
)
from quicktrain.train.hooks import unwrap

__all__ = [
    "channel_magnitude",
    "channel_saliency",
    "curvature_diagonal",
    "magnitude_scores",
    "obd_saliency",
]

def _split_kron(module: nn.Module, mat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """``[groups, d_out, d_in(+1)]`` back to ``{'weight', 'bias'}`` (inverse of ``kron_grad_matrix``)."""
    out = {}
    if "bias" in like:
        out["bias"] = mat[..., -1].reshape(like["bias"].shape)
        mat = mat[..., :-1]
    out["weight"] = mat.reshape(like["weight"].shape)
    return out


def _rep_diagonal(rep: Representation) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in rep.params.items()}
    if isinstance(rep, Diagonal):
        return dict(rep.D)
    if isinstance(rep, KronFactored):
        if rep.separate:
            raise NotImplementedError("the diagonal is defined for bias='augment' (compute_curvature's K-FAC)")
        diag = torch.diagonal(rep.G, dim1=-2, dim2=-1).unsqueeze(-1) * torch.diagonal(rep.A, dim1=-2, dim2=-1
                                                                                         ).unsqueeze(-2)
        return _split_kron(rep.module, diag, params)
    if isinstance(rep, KronEmbedding):
        return {"weight": rep.A.unsqueeze(1) * torch.diagonal(rep.G).unsqueeze(0)}
    if isinstance(rep, UnitWise):
        return rep._from_units(torch.diagonal(rep.F, dim1=-2, dim2=-1), params)
    if isinstance(rep, LayerBlock):
        diag = (rep.U * rep.U).sum(0) if rep.solver == "smw" else torch.diagonal(rep.F)
        parts = diag.split([params[n].numel() for n in rep.names])
        return {n: d.view_as(params[n]) for n, d in zip(rep.names, parts, strict=True)}
    raise TypeError(f"no diagonal for {type(rep).__name__}")


def curvature_diagonal(estimate: CurvatureEstimate) -> dict[str, Tensor]:
    """``F_ii`` of every parameter the estimate covers, by full parameter name, in the parameters' shapes."""
    out = {}
    for mname, rep in estimate.layers.items():
        for p, d in _rep_diagonal(rep).items():
            out[f"{mname}.{p}" if mname else p] = d
    return out


def obd_saliency(model: nn.Module, estimate: CurvatureEstimate) -> dict[str, Tensor]:
    """OBD saliency ``s_i = ½ F_ii θ_i²`` (LeCun et al. 1990, eq. 6) of every parameter the estimate covers.

    Args:
        model: the model whose parameters ``θ`` are scored (usually the one the estimate was computed on).
        estimate: its curvature, in any representation (see the module docstring for K-FAC's diagonal).

    Returns:
        ``{full parameter name: tensor of the parameter's shape}``.
    """
    params = dict(unwrap(model).named_parameters())
    return {k: 0.5 * d * params[k].detach().square() for k, d in curvature_diagonal(estimate).items()}


def magnitude_scores(model: nn.Module) -> dict[str, Tensor]:
    """The magnitude baseline ``|θ_i|`` of every trainable parameter."""
    return {k: p.detach().abs() for k, p in unwrap(model).named_parameters() if p.requires_grad}


def _channel_params(inner: nn.Module, group: ChannelGroup, c: int) -> dict[str, dict[str, Tensor]]:
    """``{module name: {param name: θ on channel c, 0 elsewhere}}`` of the producer and its norm."""
    out = {}
    for mname in (group.producer, group.norm):
        if mname is None:
            continue
        local = {}
        for pname, p in inner.get_submodule(mname).named_parameters(recurse=False):
            d = torch.zeros_like(p.detach())
            d[c] = p.detach()[c]
            local[pname] = d
        out[mname] = local
    return out


@torch.no_grad()
def channel_saliency(model: nn.Module, estimate: CurvatureEstimate) -> dict[str, Tensor]:
    """OBD saliency of removing each output channel, ``S_c = ½ δ_cᵀ F δ_c`` (see the module docstring).

    Args:
        model: a chain model (:func:`channel_groups`).
        estimate: its curvature, covering the hidden layers and their BatchNorms.

    Returns:
        ``{producer name: [out channels]}``.
    """
    inner = unwrap(model)
    out = {}
    for group in channel_groups(inner):
        width = inner.get_submodule(group.producer).weight.shape[0]
        scores = []
        for c in range(width):
            total = torch.zeros((), dtype=inner.get_submodule(group.producer).weight.dtype)
            for mname, local in _channel_params(inner, group, c).items():
                if mname not in estimate.layers:
                    raise ValueError(f"the curvature does not cover layer {mname!r}; compute it on all layers")
                fv = estimate.layers[mname].mvp(local)
                total = total + sum((fv[k] * v).sum() for k, v in local.items())
            scores.append(0.5 * total)
        out[group.producer] = torch.stack(scores)
    return out


def channel_magnitude(model: nn.Module) -> dict[str, Tensor]:
    """The baseline of Li et al. (ICLR 2017): the L1 norm of each output channel's weights."""
    inner = unwrap(model)
    return {g.producer: inner.get_submodule(g.producer).weight.detach().flatten(1).abs().sum(1)
            for g in channel_groups(inner)}
