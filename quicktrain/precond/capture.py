"""Collect layer inputs and output gradients with hooks, and turn them into per-layer statistics.

:class:`LayerCapture` registers a forward hook on each module; the hook stores the module's input and puts a
pre-hook on the autograd node that produced the output, which receives ``∂(·)/∂output`` in every backward
pass of ``loss.backward()``. Extra passes (the Fisher's output vectors, a secant pass) go through
:meth:`LayerCapture.backward_to_outputs`, which asks autograd for the gradients at the recorded output *edges*
only: no parameter gradient is computed, and nodes below the first module are not run. Node hooks and edges
see the output as the module produced it, so later in-place ops (``ReLU(inplace=True)``) do not disturb them.
All handles are removed on exit. :class:`LayerBatch` turns the records of one module into the views the
representations need (Kronecker inputs/gradients, per-example gradients).

Supported module types: ``nn.Linear`` (any leading dims: extra dims are weight-sharing positions),
``nn.Conv2d`` (zeros padding, any stride/dilation/groups), ``nn.Embedding`` (no ``max_norm``, not sparse, no
``scale_grad_by_freq``), ``nn.BatchNorm1d/2d/3d``, ``nn.LayerNorm``, ``nn.GroupNorm``, and
``nn.MultiheadAttention`` as two weight-shared linear layers (:class:`AttentionProjection`).

``nn.MultiheadAttention`` never calls its ``out_proj`` module and keeps the input projection as bare
parameters: both are applied by ``F.linear`` inside ``F.multi_head_attention_forward``. While the attention
module runs, ``torch.nn.functional.linear`` is wrapped so that those two calls (recognised by their weight) are
recorded as the calls of two linear layers over the tokens, laid out batch first. (A ``TorchFunctionMode`` cannot
do it: it sees ``multi_head_attention_forward`` itself and runs its body with the mode switched off.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import functional as F  # noqa: N812

from quicktrain.precond._math import kfac_input_factor, kfac_output_factor, kron_per_example

__all__ = [
    "ATTENTION_TYPES",
    "AttentionProjection",
    "KRON_TYPES",
    "NORM_TYPES",
    "SUPPORTED_TYPES",
    "LayerBatch",
    "LayerCapture",
    "check_module",
    "kron_output",
]

KRON_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
SUPPORTED_TYPES = (*KRON_TYPES, nn.Embedding, *NORM_TYPES)
ATTENTION_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


class AttentionProjection(nn.Linear):
    """One projection of an ``nn.MultiheadAttention`` as a linear layer over its tokens, sharing the attention's
    parameters (``in_proj``: ``in_proj_weight``/``in_proj_bias``, ``[3E, E]``; ``out_proj``: ``out_proj``'s).

    It is not part of the model and is never called: :class:`LayerCapture` records the attention's own
    ``F.linear`` calls under it. Representations treat it as any ``nn.Linear`` whose leading dimensions (the
    tokens) are weight-sharing positions.

    Args:
        attention: the attention module (self-attention with packed projections, no ``bias_k``/``add_zero_attn``).
        which: ``in_proj`` or ``out_proj``.
    """

    def __init__(self, attention: nn.MultiheadAttention, which: str) -> None:
        weight, bias = ((attention.in_proj_weight, attention.in_proj_bias) if which == "in_proj"
                        else (attention.out_proj.weight, attention.out_proj.bias))
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.weight, self.bias = weight, bias
        self.which = which
        object.__setattr__(self, "attention", attention)  # a reference, not a child: the model owns it


def check_attention(name: str, module: nn.MultiheadAttention) -> None:
    """Raise ``ValueError`` naming the fix for attention options the projections' statistics do not model."""
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise ValueError(f"MultiheadAttention {name!r}: only packed projections (kdim = vdim = embed_dim) without "
                         "add_bias_kv/add_zero_attn are supported; pass ignore_modules=[...] for it")
    trainable = {p.requires_grad for p in module.parameters()}
    if len(trainable) > 1:
        raise ValueError(f"MultiheadAttention {name!r} has trainable and frozen parameters; freeze all or none")


def check_module(name: str, module: nn.Module) -> None:
    """Raise ``ValueError`` naming the fix when ``module`` has options the statistics do not model."""
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise ValueError(f"Conv2d {name!r} has padding_mode={module.padding_mode!r}; only 'zeros' is "
                         "supported; pass ignore_modules=[...] to leave it unpreconditioned")
    if isinstance(module, nn.Conv2d) and isinstance(module.padding, str) and module.padding != "valid":
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size,
                                                                             strict=True)):
            raise ValueError(f"Conv2d {name!r}: asymmetric 'same' padding is not supported; pad explicitly")
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse
                                             or module.scale_grad_by_freq):
        raise ValueError(f"Embedding {name!r} uses max_norm/sparse/scale_grad_by_freq, which are not supported")
    own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    frozen = [n for n, p in module.named_parameters(recurse=False) if not p.requires_grad]
    if own and frozen:
        raise ValueError(f"module {name!r} has trainable {own} and frozen {frozen} parameters; freeze all or "
                         "none of them, or pass ignore_modules=[...]")


# ------------------------------------------------------------------------------------------ capture
def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class _Call:
    input: Tensor
    output: Tensor | None = None
    edge: GradientEdge | None = None
    like: tuple[torch.Size, torch.dtype, torch.device] | None = None
    grads: list[Tensor] = field(default_factory=list)
    layout: Callable[[Tensor], Tensor] = _identity  # output-shaped tensor -> batch-first view

    def add_grad(self, g: Tensor | None) -> None:
        """Record one backward pass's gradient at the output (zeros where the output got none)."""
        if g is None:
            shape, dtype, device = self.like
            g = torch.zeros(shape, dtype=dtype, device=device)
        self.grads.append(self.layout(g.detach()))


class _ProjectionCalls:
    """While entered, ``F.linear`` records its calls whose weight is a watched attention projection's."""

    def __init__(self, capture: LayerCapture, by_weight: dict[int, str], tokens: int, batch: int) -> None:
        self.capture, self.by_weight, self.tokens, self.batch = capture, by_weight, tokens, batch
        self.linear = F.linear

    def __call__(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:  # noqa: A002
        out = self.linear(input, weight, bias)
        name = self.by_weight.get(id(weight))
        if name is not None:
            tokens, batch = self.tokens, self.batch

            def layout(t: Tensor) -> Tensor:
                # inputs are [L, N, E] (in_proj) or [L·N, E] (out_proj): both viewed as [N, L, ·]
                return t.reshape(tokens, batch, t.shape[-1]).transpose(0, 1)

            self.capture._record(name, input, out, layout)
        return out

    def __enter__(self) -> None:
        F.linear = self

    def __exit__(self, *exc: object) -> None:
        F.linear = self.linear


class LayerCapture:
    """Context manager recording inputs and output gradients of named modules.

    Args:
        modules: ``{name: module}`` to watch.
        keep_outputs: also keep each output (detached), e.g. for K-BFGS.

    Attributes:
        calls: ``{name: [call, ...]}``, one entry per forward call of the module; ``call.grads[k]`` is the
            gradient of the k-th backward pass at its output.
    """

    def __init__(self, modules: dict[str, nn.Module], *, keep_outputs: bool = False) -> None:
        self.modules = modules
        self.keep_outputs = keep_outputs
        self.calls: dict[str, list[_Call]] = {name: [] for name in modules}
        self._handles: list = []
        self._node_hooks_record = True  # off while backward_to_outputs records from its own results
        self._modes: list[tuple[nn.Module, _ProjectionCalls]] = []

    def __enter__(self) -> LayerCapture:
        projections: dict[int, dict[int, str]] = {}
        owners: dict[int, nn.Module] = {}
        for name, module in self.modules.items():
            if isinstance(module, AttentionProjection):
                owners[id(module.attention)] = module.attention
                projections.setdefault(id(module.attention), {})[id(module.weight)] = name
            else:
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        for key, attention in owners.items():
            self._handles.append(attention.register_forward_pre_hook(self._attention_enter(projections[key]),
                                                                     with_kwargs=True))
            self._handles.append(attention.register_forward_hook(self._attention_exit, always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        while self._modes:  # an exception inside an attention module's forward
            self._modes.pop()[1].__exit__()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            if not isinstance(out, Tensor):
                raise TypeError(f"module {name!r} returned {type(out).__name__}; only tensor outputs are supported")
            self._record(name, args[0], out)

        return hook

    def _record(self, name: str, x: Tensor, out: Tensor, layout: Callable[[Tensor], Tensor] = _identity) -> None:
        """One call of module ``name``: its input, and a hook on the node of its output for the gradients."""
        call = _Call(layout(x.detach()), layout(out.detach()) if self.keep_outputs else None, layout=layout)
        self.calls[name].append(call)
        node = out.grad_fn
        if node is None:
            return
        call.edge = get_gradient_edge(out)
        call.like = (out.shape, out.dtype, out.device)
        nr = out.output_nr

        def prehook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            if self._node_hooks_record:
                call.add_grad(grad_outputs[nr])

        self._handles.append(node.register_prehook(prehook))

    def _attention_enter(self, by_weight: dict[int, str]):
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            if not torch.is_grad_enabled():
                return
            names = ("query", "key", "value")
            qkv = [args[i] if i < len(args) else kwargs.get(names[i]) for i in range(3)]
            if not (qkv[0] is qkv[1] is qkv[2]) or qkv[0].dim() != 3:
                raise ValueError("MultiheadAttention: curvature statistics need batched self-attention, "
                                 "attn(x, x, x) with x of 3 dims; pass ignore_modules=[...] for cross-attention")
            x = qkv[0]
            batch, tokens = (x.shape[0], x.shape[1]) if module.batch_first else (x.shape[1], x.shape[0])
            calls = _ProjectionCalls(self, by_weight, tokens, batch)
            calls.__enter__()
            self._modes.append((module, calls))

        return hook

    def _attention_exit(self, module: nn.Module, args: tuple, out: object) -> None:
        if self._modes and self._modes[-1][0] is module:
            self._modes.pop()[1].__exit__()

    def backward_to_outputs(self, root: Tensor, vectors: Sequence[Tensor | None], *,
                            retain_graph: bool = True) -> None:
        """One extra backward pass per vector, from ``root`` down to the recorded module outputs only.

        Each pass appends ``vᵀ ∂root/∂out`` to every call's ``grads``, like a ``backward()`` through the node
        hooks would, but computes no parameter gradient and leaves ``.grad`` alone.

        Args:
            root: the tensor to differentiate (logits, or a scalar loss).
            vectors: ``grad_outputs`` of each pass (``None`` for a scalar ``root``).
            retain_graph: keep the graph after the last pass; ``False`` lets that pass free the activations
                as it goes, while the recorded gradients accumulate (a lower peak).
        """
        calls = [c for cs in self.calls.values() for c in cs if c.edge is not None]
        if not calls:
            return
        edges = [c.edge for c in calls]
        self._node_hooks_record = False
        try:
            for i, v in enumerate(vectors):
                last = i == len(vectors) - 1
                grads = torch.autograd.grad(root, edges, v, retain_graph=retain_graph or not last,
                                            allow_unused=True)
                for call, g in zip(calls, grads, strict=True):
                    call.add_grad(g)
        finally:
            self._node_hooks_record = True

    def batch(self, name: str, n: int, scale: float = 1.0, passes: slice = slice(None)) -> LayerBatch:
        """The :class:`LayerBatch` of module ``name`` over the backward passes ``passes``, whose gradients stand
        for ``scale`` times the recorded ones (the scale is folded into the statistics, not into copies)."""
        calls = self.calls[name]
        if not calls:
            raise RuntimeError(f"module {name!r} was not called in the forward pass; pass ignore_modules=[...] "
                               "for modules the model does not use")
        counts = {len(c.grads) for c in calls}
        if len(counts) != 1:
            raise RuntimeError(f"module {name!r}: its output received gradients in some backward passes only")
        return LayerBatch(self.modules[name], [c.input for c in calls], [c.grads[passes] for c in calls], n,
                          [c.output for c in calls], scale)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes inside record nothing (the loss backward of a Monte-Carlo or exact Fisher step,
        whose output gradients no statistic uses)."""
        self._node_hooks_record = False
        try:
            yield
        finally:
            self._node_hooks_record = True


# --------------------------------------------------------------------------------------- layer views
def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """The conv's zero padding per side, ``(p_h, p_w)`` (``'valid'`` and symmetric ``'same'`` resolved)."""
    padding = module.padding
    if isinstance(padding, str):
        return (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in
                                                       zip(module.dilation, module.kernel_size, strict=True))
    return padding


def _conv_pad(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The conv input with its zero padding applied (``[N, C, H, W]``)."""
    padding = _conv_padding(module)
    return F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x


def _conv_length(module: nn.Conv2d, x: Tensor) -> int:
    """Number of output positions ``H_out·W_out`` of the conv on input ``x``."""
    padded = [s + 2 * p for s, p in zip(x.shape[-2:], _conv_padding(module), strict=True)]
    return math.prod((s - (k - 1) * d - 1) // st + 1 for s, k, d, st in
                     zip(padded, module.kernel_size, module.dilation, module.stride, strict=True))


def _conv_patch_mean(module: nn.Conv2d, x: Tensor, ones: bool) -> tuple[Tensor, int]:
    """The mean over positions of :func:`_conv_patches`, ``[N, 1, groups, d (+1)]``, and the number of
    positions, without building the patches:
    entry ``(c, i, j)`` is the mean of the input window that kernel offset ``(i, j)`` sees, one strided view of
    the padded input per offset (``kh·kw`` reductions of ``[N, C, H_out, W_out]`` instead of an
    ``[N, L, C·kh·kw]`` copy)."""
    x = _conv_pad(module, x)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    ho, wo = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1, (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
    cols = torch.stack([x[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]
                        .mean((-2, -1)) for i in range(kh) for j in range(kw)], dim=-1)  # [N, C, kh·kw]
    out = cols.reshape(x.shape[0], 1, module.groups, -1)  # (channel, kh, kw) order within a group
    return (torch.cat([out, out.new_ones(*out.shape[:-1], 1)], dim=-1) if ones else out), ho * wo


def _conv_windows(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The padded conv input's windows as a strided view ``[N, C, H_out, W_out, kh, kw]`` (no copy): entry
    ``(n, c, h, w, i, j)`` is what kernel offset ``(i, j)`` of channel ``c`` sees at output position ``(h, w)``."""
    x = _conv_pad(module, x)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    x = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)  # n, c, h_out, w_out, ekh, ekw
    return x[..., ::dh, ::dw] if dh > 1 or dw > 1 else x


def _conv_patches(module: nn.Conv2d, x: Tensor, ones: bool) -> Tensor:
    """Patches of a conv input as ``[N, L, groups, Cin/groups*kh*kw (+1)]``: the columns the conv multiplies by
    its weight, in the weight's (channel, kh, kw) order, with a trailing 1 per group when ``ones``.

    Built from strided ``Tensor.unfold`` views and a single copy (faster than ``F.unfold`` on CPU). One group,
    or a bias: copied into that layout (the bias column costs no second copy). Several groups without bias
    (depthwise convolutions): copied in im2col order ``[N, C, kh, kw, L]`` and returned as a view, so that
    positions stay innermost and the per-example, per-group products of
    :func:`~quicktrain.precond._math.kfac_factors` need no transposing copy.
    """
    x = _conv_windows(module, x)
    kh, kw = module.kernel_size
    n, c, ho, wo = x.shape[:4]
    groups = module.groups
    d = c // groups * kh * kw
    if groups > 1 and not ones:
        cols = x.permute(0, 1, 4, 5, 2, 3).contiguous()  # n, c, kh, kw, h_out, w_out
        return cols.view(n, groups, d, ho * wo).permute(0, 3, 1, 2)
    out = x.new_empty(n, ho * wo, groups, d + ones)
    dst = out.view(n, ho, wo, groups, d + ones)[..., :d].unflatten(-1, (c // groups, kh, kw))
    dst.copy_(x.permute(0, 2, 3, 1, 4, 5).unflatten(3, (groups, c // groups)))
    if ones:
        out[..., d] = 1.0
    return out


def _conv_columns(module: nn.Conv2d, x: Tensor) -> Tensor:
    """im2col of a one-group conv input as ``[C·kh·kw, N·L]``: row ``(c, i, j)`` (the weight's order) holds the
    input that kernel offset ``(i, j)`` of channel ``c`` sees at every position of every example.

    One copy from strided ``Tensor.unfold`` views into the ``[C, kh, kw, N, H_out, W_out]`` layout, whose
    innermost runs are output rows (the ``[N, L, C·kh·kw]`` layout of :func:`_conv_patches` gathers runs of
    ``kw`` entries and took 3–5× longer), so that the Gram matrix of the patches is one matrix product with
    no transposing copy."""
    x = _conv_windows(module, x)
    kh, kw = module.kernel_size
    n, c, ho, wo = x.shape[:4]
    cols = x.new_empty(c, kh, kw, n, ho, wo)
    cols.copy_(x.permute(1, 4, 5, 0, 2, 3))
    return cols.view(c * kh * kw, n * ho * wo)


def _conv_row_columns(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The width half of im2col for a conv of row stride 1, ``Y = [C, kw, N, H + (kh-1)·dh, W_out]``:
    ``Y[c, j, n, u, w]`` is input row ``u`` of channel ``c`` as kernel column ``j`` sees it at output column
    ``w`` (zero beyond the ``H`` input rows: the gap keeps a shift by whole rows inside one example).

    Kernel row ``i`` at output row ``h`` reads row ``u = h + i·dh - p_h`` of ``Y``, so the patches are ``Y``'s
    rows shifted by ``i`` and :func:`_conv_row_factor` needs ``kw`` copies of the input, not ``kh·kw``."""
    (kh, kw), (dh, dw), sw = module.kernel_size, module.dilation, module.stride[1]
    pw = _conv_padding(module)[1]
    x = F.pad(x, (pw, pw, 0, (kh - 1) * dh))
    x = x.unfold(3, (kw - 1) * dw + 1, sw)[..., ::dw]  # n, c, rows, w_out, kw
    cols = x.new_empty(x.shape[1], kw, x.shape[0], x.shape[2], x.shape[3])
    cols.copy_(x.permute(1, 4, 0, 2, 3))
    return cols


def _conv_row_factor(module: nn.Conv2d, xs: Sequence[Tensor], n: int, ones: bool, max_elements: int) -> Tensor:
    r"""K-FAC's ``A = (1/N) Σ_{n,l} a_{nl} a_{nl}ᵀ`` of a one-group conv of row stride 1 without its patches.

    With ``Y`` of :func:`_conv_row_columns` and ``a_i = i·d_h - p_h``, the block of kernel rows ``(i, i')``
    (every channel and kernel column at once) is

    .. math:: B_{ii'} = \frac1N \sum_n \sum_{h < H_{out}} Y_{h+a_i} Y_{h+a_{i'}}^\top
        = \frac1N \sum_n \Big(\sum_{u} - \sum_{u \notin [a_i, a_i + H_{out})}\Big) Y_u Y_{u+\delta}^\top,
        \quad \delta = (i'-i)\,d_h

    (``u`` over the rows with ``0 ≤ u, u+δ < H``): the full sum of rows ``δ`` apart is one product of ``Y``
    flattened to ``[C·kw, T]`` with itself shifted by ``δ·W_out`` entries (the zero gap rows drop the pairs
    across examples), shared by every ``i`` with the same ``δ``; the rows outside a window are ``p_h`` or
    fewer, a small product each. ``kh`` large products of ``(C·kw)² T`` instead of one of ``(C·kh·kw)² N·L``:
    ``kw/kh`` of the copies and ``1/kh`` of the multiply-adds of the explicit patches. ``B_{i'i} = B_{ii'}ᵀ``.
    """
    (kh, kw), dh = module.kernel_size, module.dilation[0]
    ph = _conv_padding(module)[0]
    c = module.in_channels
    d = c * kh * kw
    blocks = xs[0].new_zeros(kh, kh, c * kw, c * kw)
    sums = xs[0].new_zeros(c, kw, kh) if ones else None
    for x in xs:
        h = x.shape[2]
        ho = h + 2 * ph - (kh - 1) * dh
        step = max(1, max_elements // (c * kw * x.shape[3] * (h + (kh - 1) * dh)))
        for i0 in range(0, x.shape[0], step):
            y = _conv_row_columns(module, x[i0:i0 + step])  # [C, kw, n, rows, W_out]
            wo = y.shape[4]
            flat = y.view(c * kw, -1)
            for di in range(kh):
                shift = di * dh
                full = flat[:, :flat.shape[1] - shift * wo] @ flat[:, shift * wo:].T
                for i in range(kh - di):
                    lo, hi = i * dh - ph, i * dh - ph + ho  # the rows kernel row i reads
                    block = blocks[i, i + di]
                    block.add_(full, alpha=1.0 / n)
                    for u0, u1 in ((0, min(lo, h - shift)), (max(hi, 0), h - shift)):
                        if u1 > u0:  # rows outside the window: taken back out
                            a = y[:, :, :, u0:u1].reshape(c * kw, -1)
                            b = y[:, :, :, u0 + shift:u1 + shift].reshape(c * kw, -1)
                            block.addmm_(a, b.T, alpha=-1.0 / n)
            if sums is not None:
                per_row = y.sum((2, 4))  # [C, kw, rows]
                for i in range(kh):
                    lo, hi = max(i * dh - ph, 0), min(i * dh - ph + ho, h)
                    sums[:, :, i].add_(per_row[:, :, lo:hi].sum(-1), alpha=1.0 / n)
    for i in range(kh):
        for i2 in range(i):
            blocks[i, i2] = blocks[i2, i].T
    out = x.new_empty(d + ones, d + ones)
    out[:d, :d] = blocks.view(kh, kh, c, kw, c, kw).permute(2, 0, 3, 4, 1, 5).reshape(d, d)
    if sums is not None:
        out[:d, d] = out[d, :d] = sums.transpose(1, 2).reshape(d)
    return out


def _kron_input(module: nn.Module, x: Tensor, with_bias: bool = True) -> Tensor:
    """Layer input as ``[N, L, groups, d_in]`` (with a trailing 1 per group when the layer has a bias)."""
    ones = module.bias is not None and with_bias
    if isinstance(module, nn.Conv2d):
        return _conv_patches(module, x if x.dim() == 4 else x.unsqueeze(0), ones)
    a = x.reshape(x.shape[0], -1, 1, x.shape[-1])
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if ones else a


def kron_output(module: nn.Module, t: Tensor) -> Tensor:
    """An output-shaped tensor of a Linear/Conv2d (the output or its gradient) as ``[N, L, groups, d_out]``."""
    if isinstance(module, nn.Linear):
        return t.reshape(t.shape[0], -1, 1, t.shape[-1])
    if t.dim() == 3:
        t = t.unsqueeze(0)
    n, c = t.shape[:2]
    return t.reshape(n, module.groups, c // module.groups, -1).permute(0, 3, 1, 2)


def _norm_xhat(module: nn.Module, x: Tensor) -> Tensor:
    """Normalised input ``x̂`` of a norm layer laid out as ``[N, U, P]`` (units, positions)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        batch_stats = module.training or not module.track_running_stats
        xhat = F.batch_norm(x, None if batch_stats else module.running_mean,
                            None if batch_stats else module.running_var, training=batch_stats, eps=module.eps)
    elif isinstance(module, nn.GroupNorm):
        xhat = F.group_norm(x, module.num_groups, eps=module.eps)
    else:
        return _norm_grad(module, F.layer_norm(x, module.normalized_shape, eps=module.eps))
    return xhat.reshape(x.shape[0], x.shape[1], -1)


def _norm_grad(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradient of a norm layer laid out as ``[N, U, P]``."""
    if isinstance(module, nn.LayerNorm):
        return g.reshape(g.shape[0], -1, math.prod(module.normalized_shape)).transpose(1, 2)
    return g.reshape(g.shape[0], g.shape[1], -1)


def _scaled(t: Tensor, scale: float) -> Tensor:
    """``t *= scale`` in place on a tensor computed here (nothing when the scale is 1)."""
    return t if scale == 1.0 else t.mul_(scale)


def _cat(ts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` that returns a single tensor as it is instead of copying it."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


class LayerBatch:
    """Records of one module for one batch: inputs per call and, per call, K output gradients.

    Args:
        module: the module.
        inputs: its input per forward call.
        grads: ``grads[call][k]``: output gradient of backward vector ``k``, as recorded.
        n: batch size ``N``.
        outputs: outputs per call (or Nones).
        scale: the statistics' gradients are ``scale · grads`` (``√N`` for the empirical Fisher from the
            mean loss's backward). :meth:`kron_grads` and :meth:`embedding_grads` return the recorded
            gradients, which their users scale in the (smaller) statistic; the per-example views are scaled.
    """

    def __init__(self, module: nn.Module, inputs: list[Tensor], grads: list[list[Tensor]], n: int,
                 outputs: list[Tensor | None] | None = None, scale: float = 1.0) -> None:
        self.module, self.inputs, self.grads, self.n, self.scale = module, inputs, grads, n, scale
        self.outputs = outputs or [None] * len(inputs)
        self.k = len(grads[0])

    def kron_inputs(self, with_bias: bool = True) -> Tensor:
        """``[N, L, groups, d_in]`` with calls concatenated along ``L`` (bias column unless ``with_bias=False``)."""
        return _cat([_kron_input(self.module, x, with_bias) for x in self.inputs], 1)

    def kron_input_chunks(self, with_bias: bool = True, max_elements: int = 1 << 22) -> Iterator[Tensor]:
        """:meth:`kron_inputs` in consecutive chunks of examples of at most ``max_elements`` entries (at least one
        example each), so that the patch copy of a convolution never holds the whole batch at once."""
        m = self.module
        if isinstance(m, nn.Conv2d) and self.inputs[0].dim() == 3:  # one unbatched example
            yield self.kron_inputs(with_bias)
            return
        n = self.inputs[0].shape[0]
        per_example = sum(_kron_input(m, x[:1], with_bias).numel() for x in self.inputs)
        step = max(1, max_elements // per_example)
        for i in range(0, n, step):
            yield _cat([_kron_input(m, x[i:i + step], with_bias) for x in self.inputs], 1)

    def kron_length(self) -> int:
        """Weight-sharing positions ``L`` of a Linear/Conv2d per example, over all calls."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            return sum(_conv_length(m, x) for x in self.inputs)
        return sum(x.numel() // (x.shape[0] * x.shape[-1]) for x in self.inputs)

    def kron_input_factor(self, with_bias: bool = True, max_elements: int = 1 << 20) -> Tensor:
        """K-FAC's ``A = (1/N) Σ_{n,l} a_{nl} a_{nl}ᵀ`` (expand setting) over all calls, ``[groups, d_in, d_in]``.

        A one-group convolution accumulates ``A += (1/N) P Pᵀ`` with ``addmm_`` over chunks of at most
        ``max_elements`` patch entries, ``P`` the :func:`_conv_columns` of a chunk of examples; the bias block
        is ``(1/N) Σ_{n,l} a_{nl}`` (the row sums of ``P``) and ``L``. Other layers take the Gram matrix of
        :meth:`kron_input_chunks`.
        """
        m, n = self.module, self.n
        if not (isinstance(m, nn.Conv2d) and m.groups == 1 and self.inputs[0].dim() == 4):
            fa = None
            for chunk in self.kron_input_chunks(with_bias, max_elements):
                fa = kfac_input_factor(chunk, n) if fa is None else fa.add_(kfac_input_factor(chunk, n))
            return fa
        ones = m.bias is not None and with_bias
        if m.stride[0] == 1:
            out = _conv_row_factor(m, self.inputs, n, ones, max_elements)
            if ones:
                out[-1, -1] = self.kron_length()
            return out.unsqueeze(0)
        x0 = self.inputs[0]
        d = m.in_channels * math.prod(m.kernel_size)
        out = x0.new_zeros(d + ones, d + ones)
        gram, sums = out[:d, :d], (out[:d, d] if ones else None)
        for x in self.inputs:
            length = _conv_length(m, x)
            step = max(1, max_elements // (d * length))
            for i in range(0, x.shape[0], step):
                cols = _conv_columns(m, x[i:i + step])
                gram.addmm_(cols, cols.T, alpha=1.0 / n)
                if sums is not None:
                    sums.add_(cols.sum(1), alpha=1.0 / n)
        if sums is not None:
            out[d, :d] = sums
            out[d, d] = self.kron_length()
        return out.unsqueeze(0)

    def kron_output_factor(self) -> Tensor:
        """K-FAC's ``G = (s²/L) Σ_{k,n,l} g_{knl} g_{knl}ᵀ`` (expand setting, ``s`` the :attr:`scale`, ``L`` the
        positions of all calls), ``[groups, d_out, d_out]``. A one-group convolution's gradients ``[K·N, C, L]``
        enter as recorded, one batched product over examples, when ``C ≤ L`` (its ``[K·N, C, C]`` products are
        then no larger than the ``[K·N·L, C]`` copy of the other layout)."""
        m = self.module
        if not (isinstance(m, nn.Conv2d) and m.groups == 1 and self.inputs[0].dim() == 4
                and m.out_channels <= min(_conv_length(m, x) for x in self.inputs)):
            g = self.kron_grads()
            return kfac_output_factor(g, g.shape[1], self.scale)
        out = None
        for gs in self.grads:
            for g in gs:
                v = g.reshape(g.shape[0], g.shape[1], -1)
                fg = torch.bmm(v, v.transpose(1, 2)).sum(0)
                out = fg if out is None else out.add_(fg)
        return out.mul_(self.scale**2 / self.kron_length()).unsqueeze(0)

    def head(self, m: int) -> LayerBatch:
        """The records of the first ``m`` examples as a batch of its own: ``n = m`` and the scale times
        ``√(N/m)``, so that its statistics are the sub-batch's own (each estimator's ``1/N`` becomes ``1/m``)."""
        if m >= self.n:
            return self
        return LayerBatch(self.module, [x[:m] for x in self.inputs], [[g[:m] for g in gs] for gs in self.grads],
                          m, [None if o is None else o[:m] for o in self.outputs], self.scale * math.sqrt(self.n / m))

    def kron_input_means(self, with_bias: bool = True) -> Tensor:
        """:meth:`kron_inputs` averaged over the positions of all calls, ``[N, 1, groups, d_in]`` (conv patches
        are never built: see :func:`_conv_patch_mean`)."""
        m, ones = self.module, self.module.bias is not None and with_bias
        if isinstance(m, nn.Conv2d):
            means, sizes = zip(*(_conv_patch_mean(m, x if x.dim() == 4 else x.unsqueeze(0), ones)
                                 for x in self.inputs), strict=True)
        else:
            a = [_kron_input(m, x, with_bias) for x in self.inputs]
            means, sizes = [t.mean(1, keepdim=True) for t in a], [t.shape[1] for t in a]
        if len(means) == 1:
            return means[0]
        return sum(mu * (s / sum(sizes)) for mu, s in zip(means, sizes, strict=True))

    def kron_grads(self) -> Tensor:
        """``[K*N, L, groups, d_out]``, unscaled (multiply by :attr:`scale`)."""
        return _cat([_cat([kron_output(self.module, g) for g in gs], 0) for gs in self.grads], 1)

    def kron_per_example(self) -> Tensor:
        """Per-example gradients of a Linear/Conv2d as matrices ``[K*N, groups, d_out, d_in(+1)]`` (see
        :func:`~quicktrain.precond._math.kron_per_example`)."""
        return _scaled(kron_per_example(self.kron_inputs(), self.kron_grads()), self.scale)

    def embedding_inputs(self) -> tuple[Tensor, int]:
        """Token indices ``[N, L]`` over all calls and the number of positions per example ``L``."""
        idx = _cat([x.reshape(x.shape[0], -1) for x in self.inputs], 1)
        return idx, idx.shape[1]

    def embedding_grads(self) -> Tensor:
        """``[K*N, L, D]``, unscaled (multiply by :attr:`scale`)."""
        d = self.module.embedding_dim
        return _cat([_cat([g.reshape(g.shape[0], -1, d) for g in gs], 0) for gs in self.grads], 1)

    def unit_grads(self) -> Tensor:
        """Per-example (weight, bias) gradients of each unit of a norm layer, ``[K*N, U, 1 or 2]``."""
        outs = []
        for x, gs in zip(self.inputs, self.grads, strict=True):
            xhat = _norm_xhat(self.module, x)
            for g in gs:
                gg = _norm_grad(self.module, g)
                cols = [(gg * xhat).sum(-1)] if self.module.weight is not None else []
                if self.module.bias is not None:
                    cols.append(gg.sum(-1))
                outs.append(torch.stack(cols, dim=-1))
        k = self.k
        per_call = [_cat(outs[i * k:(i + 1) * k], 0) for i in range(len(self.inputs))]
        return _scaled(torch.stack(per_call).sum(0), self.scale)

    def per_example_grads(self) -> dict[str, Tensor]:
        """Per-example (and per backward vector) parameter gradients ``{name: [K*N, *shape]}``.

        For a Kronecker layer ``∇W_n = Σ_l g_{nl} a_{nl}^T``; for an embedding the rows of the tokens used;
        for norm layers ``(Σ_l g x̂, Σ_l g)`` per unit. BatchNorm in training mode couples examples through
        the batch statistics; this treats the statistics as constants (exact for ``N=1`` or eval mode).
        """
        m = self.module
        if isinstance(m, KRON_TYPES):
            mat = self.kron_per_example()
            out = {}
            if m.bias is not None:
                out["bias"] = mat[..., -1].reshape(mat.shape[0], *m.bias.shape)
                mat = mat[..., :-1]
            out["weight"] = mat.reshape(mat.shape[0], *m.weight.shape)
            return out
        if isinstance(m, nn.Embedding):
            idx, _ = self.embedding_inputs()
            g = self.embedding_grads()
            kn = g.shape[0]
            idx = idx.repeat(kn // idx.shape[0], 1)
            pe = g.new_zeros(kn, m.num_embeddings, m.embedding_dim)
            rows = torch.arange(kn, device=g.device).unsqueeze(1).expand_as(idx)
            pe.index_put_((rows.reshape(-1), idx.reshape(-1)), g.reshape(-1, m.embedding_dim), accumulate=True)
            if m.padding_idx is not None:
                pe[:, m.padding_idx] = 0
            return {"weight": _scaled(pe, self.scale)}
        if isinstance(m, NORM_TYPES):
            ug = self.unit_grads()
            out, i = {}, 0
            for pname in ("weight", "bias"):
                p = getattr(m, pname)
                if p is not None:
                    out[pname] = ug[..., i].reshape(ug.shape[0], *p.shape)
                    i += 1
            return out
        raise TypeError(f"no per-example gradients for {type(m).__name__}")
