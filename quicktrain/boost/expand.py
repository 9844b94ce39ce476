"""NetBooster's network expansion: turn a tiny network into a "deep giant" (Yu et al., 2023).

After each chosen layer :math:`L` (``Conv2d`` or ``Linear``, :math:`C` output channels, :math:`g` groups)
:func:`expand` inserts ``depth`` residual inverted-bottleneck blocks that act on every pixel (token) alone:

.. math::

    B(z) = z + \\mathrm{BN}_2\\big(P\\, \\phi_\\alpha(\\mathrm{BN}_1(E z))\\big),
    \\qquad E \\in \\mathbb{R}^{rC \\times C},\\ P \\in \\mathbb{R}^{C \\times rC}

with pointwise (1x1) expand :math:`E` and project :math:`P` (both grouped with the layer's :math:`g` groups,
so they are block diagonal: for a depthwise layer each channel gets its own tiny MLP), expansion ratio
:math:`r` and the PLT activation :math:`\\phi_\\alpha` (:mod:`quicktrain.boost.plt`). The giant computes
:math:`B_d \\circ \\dots \\circ B_1 \\circ L`; the block sits at :math:`L`'s output, i.e. before the
BatchNorm that follows :math:`L`, if any. At :math:`\\alpha = 1` each block is affine,
:math:`B(z) = M z + c`, and :func:`quicktrain.boost.contract` folds it exactly into :math:`L`.

With ``zero_init=True`` (default) :math:`\\gamma` of :math:`\\mathrm{BN}_2` starts at 0, so each block
starts as the identity and the giant computes the tiny network's function (the zero-init residual trick of
Goyal et al., 2017).

Eligibility: ``nn.Conv2d`` and ``nn.Linear`` (exact types). The composed bias :math:`c` must land
somewhere that keeps the tiny network's ``state_dict`` keys: in :math:`L`'s bias, or - when :math:`L`
has none - in the running mean of a BatchNorm that consumes :math:`L`'s output and nothing else (found by
tracing the model with ``torch.fx``). Layers where neither holds are skipped with a reason
(:func:`plan_expansion`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import Tensor, fx, nn

from .plt import PLTActivation

logger = logging.getLogger(__name__)

LayerSelection = Iterable[str] | Callable[[str, nn.Module], bool] | None
_ELIGIBLE_TYPES = (nn.Conv2d, nn.Linear)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


class ExpansionBlock(nn.Module):
    """One residual inverted bottleneck :math:`z + \\mathrm{BN}_2(P \\phi(\\mathrm{BN}_1(E z)))` per pixel.

    For ``kind="conv"`` it acts on ``[N, C, H, W]`` with grouped 1x1 convolutions; for ``kind="linear"``
    on ``[..., C]`` (any leading dims, flattened for the BatchNorms) with ``nn.Linear`` maps.

    Args:
        channels: :math:`C`, the channels of the layer it follows.
        hidden: :math:`rC`, the expanded width (a multiple of ``groups``).
        groups: groups of ``E`` and ``P`` (the layer's groups; 1 for linear).
        kind: ``"conv"`` or ``"linear"``.
        zero_init: start :math:`\\gamma` of :math:`\\mathrm{BN}_2` at 0 so the block is the identity.
        slope: initial PLT slope.
    """

    def __init__(
        self, channels: int, hidden: int, *, groups: int = 1, kind: str = "conv", zero_init: bool = True,
        slope: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in ("conv", "linear"):
            raise ValueError(f"Unknown block kind {kind!r}; choose from ['conv', 'linear']")
        if channels % groups or hidden % groups:
            raise ValueError(f"channels {channels} and hidden {hidden} must be multiples of groups {groups}")
        if kind == "linear" and groups != 1:
            raise ValueError(f"linear blocks have groups=1, got {groups}")
        self.kind = kind
        self.groups = groups
        if kind == "conv":
            self.expand = nn.Conv2d(channels, hidden, 1, groups=groups, bias=False)
            self.bn1: nn.Module = nn.BatchNorm2d(hidden)
            self.project = nn.Conv2d(hidden, channels, 1, groups=groups, bias=False)
            self.bn2: nn.Module = nn.BatchNorm2d(channels)
        else:
            self.expand = nn.Linear(channels, hidden, bias=False)
            self.bn1 = nn.BatchNorm1d(hidden)
            self.project = nn.Linear(hidden, channels, bias=False)
            self.bn2 = nn.BatchNorm1d(channels)
        self.act = PLTActivation(slope)
        if zero_init:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, z: Tensor) -> Tensor:
        channels = z.shape[1] if self.kind == "conv" else z.shape[-1]
        if self.training and z.numel() == channels:
            # BatchNorm's own error ("Expected more than 1 value per channel") names neither the block nor a fix.
            raise ValueError(
                f"a NetBooster block got one value per channel (input {tuple(z.shape)}, e.g. a batch of 1 on a "
                "1x1 map) in train mode, where its BatchNorms need at least 2: train the giant with batch size "
                ">= 2 (per device under DDP), or call .eval() to run single examples"
            )
        if self.kind == "conv":
            return z + self.bn2(self.project(self.act(self.bn1(self.expand(z)))))
        flat = z.reshape(-1, z.shape[-1])
        out = flat + self.bn2(self.project(self.act(self.bn1(self.expand(flat)))))
        return out.reshape(z.shape)


class BoostedLayer(nn.Module):
    """An original layer followed by its NetBooster blocks: ``blocks(layer(x))``.

    Attributes:
        layer: the original ``Conv2d``/``Linear`` (trained as part of the giant).
        blocks: ``nn.Sequential`` of :class:`ExpansionBlock`.
        bias_sink: qualified name (from the model root) of the BatchNorm that absorbs the composed bias
            when ``layer`` has no bias, else ``None``. Architecture metadata, not training state.
    """

    def __init__(self, layer: nn.Module, blocks: list[ExpansionBlock], bias_sink: str | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.blocks = nn.Sequential(*blocks)
        self.bias_sink = bias_sink

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.layer(x))

    def extra_repr(self) -> str:
        return f"bias_sink={self.bias_sink!r}" if self.bias_sink else ""


@dataclass
class ExpansionPlan:
    """Which layers :func:`expand` expands and which it skips, with reasons.

    Attributes:
        expanded: layer name -> qualified name of its bias-absorbing BatchNorm (``None`` if the layer has a
            bias of its own).
        skipped: layer name -> why it cannot be expanded (only ``Conv2d``/``Linear``-like modules appear).
    """

    expanded: dict[str, str | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """Human-readable table of the plan."""
        lines = [f"NetBooster expansion: {len(self.expanded)} layer(s) expanded, {len(self.skipped)} skipped"]
        for name, sink in self.expanded.items():
            lines.append(f"  + {name}" + (f"  (bias folds into {sink})" if sink else ""))
        for name, reason in self.skipped.items():
            lines.append(f"  - {name}: {reason}")
        return "\n".join(lines)


def _fx_usage(model: nn.Module) -> tuple[dict[str, int], dict[str, list[fx.Node]], str | None]:
    """Call counts and output users of every called module, from a ``torch.fx`` trace (or the error)."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure only limits what can be expanded
        return {}, {}, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    calls: dict[str, int] = {}
    users: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            users[node.target] = list(node.users)
    return calls, users, None


def _layer_reason(
    name: str, module: nn.Module, model: nn.Module, calls: dict[str, int], users: dict[str, list[fx.Node]],
    trace_error: str | None,
) -> tuple[str | None, str | None]:
    """``(bias_sink, None)`` if ``name`` can be expanded, else ``(None, reason)``."""
    # The owner check comes first: MultiheadAttention's out_proj is a Linear subclass, but the reason it
    # cannot be expanded is that the attention reads its weights and never calls it.
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if isinstance(parent, nn.MultiheadAttention):
        return None, "its weights are read directly by nn.MultiheadAttention, which never calls it"
    if type(module) not in _ELIGIBLE_TYPES:
        kind = "Conv2d" if isinstance(module, nn.Conv2d) else "Linear" if isinstance(module, nn.Linear) else None
        if kind:
            return None, f"{type(module).__name__} is a subclass of nn.{kind} whose forward may differ"
        return None, f"unsupported layer type {type(module).__name__} (only nn.Conv2d and nn.Linear)"
    if module.bias is not None:
        if not trace_error and calls.get(name, 0) == 0:
            return None, "never called in forward (torch.fx trace)"
        return None, None
    # No bias of its own: the composed bias c must go into the running mean of the next BatchNorm.
    out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    if trace_error:
        return None, (
            f"has no bias and the model could not be traced with torch.fx ({trace_error}), so no BatchNorm "
            "to absorb the block's bias can be found; select layers with a bias or make the model traceable"
        )
    if calls.get(name, 0) != 1:
        return None, f"has no bias and is called {calls.get(name, 0)} times in forward (need exactly once)"
    nxt = users.get(name, [])
    sink = nxt[0].target if len(nxt) == 1 and nxt[0].op == "call_module" else None
    sink_module = model.get_submodule(sink) if sink else None
    if not (
        isinstance(sink_module, _BN_TYPES) and sink_module.num_features == out
        and sink_module.track_running_stats and calls.get(sink, 0) == 1
    ):
        found = ", ".join(f"{n.op}:{n.target}" for n in nxt) or "nothing"
        return None, (
            f"has no bias and its output does not go only into a BatchNorm with running stats (it goes to "
            f"{found}), so the block's bias could not be folded without adding a bias parameter"
        )
    return sink, None


def plan_expansion(model: nn.Module, layers: LayerSelection = None) -> ExpansionPlan:
    """Decide which layers of ``model`` to expand, and why the others cannot be.

    Args:
        model: the tiny network (not modified).
        layers: ``None`` for every eligible ``Conv2d``/``Linear``; an iterable of qualified module names; or a
            predicate ``(name, module) -> bool`` over the candidate layers.

    Returns:
        The :class:`ExpansionPlan`. Candidates are modules that are ``Conv2d``/``Linear`` or any other
        convolution (reported as unsupported); modules inside already inserted blocks are reported as such.

    Raises:
        ValueError: if a name in ``layers`` does not exist or cannot be expanded (with the reason).
    """
    calls, users, trace_error = _fx_usage(model)
    named = dict(model.named_modules())
    inside_boost = {
        n for b_name, b in named.items() if isinstance(b, BoostedLayer) for n, _ in b.named_modules(prefix=b_name)
    }
    candidates = {
        n: m for n, m in named.items()
        if n and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and n not in inside_boost
    }
    explicit = layers is not None and not callable(layers)
    if explicit:
        wanted = list(layers)  # type: ignore[arg-type]
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise ValueError(f"Unknown layer(s) {unknown}; choose from {sorted(candidates)}")
        for n in wanted:
            if n in inside_boost:
                raise ValueError(f"layer {n!r} is already expanded (part of a NetBooster block)")
            if n not in candidates:
                raise ValueError(f"layer {n!r} is a {type(named[n]).__name__}; only nn.Conv2d/nn.Linear expand")
        selected = {n: candidates[n] for n in wanted}
    elif callable(layers):
        selected = {n: m for n, m in candidates.items() if layers(n, m)}
    else:
        selected = candidates
    plan = ExpansionPlan()
    for name, module in selected.items():
        sink, reason = _layer_reason(name, module, model, calls, users, trace_error)
        if reason is None:
            plan.expanded[name] = sink
        else:
            plan.skipped[name] = reason
    if explicit and plan.skipped:
        raise ValueError("cannot expand the selected layer(s):\n" + "\n".join(
            f"  {n}: {r}" for n, r in plan.skipped.items()))
    return plan


def _hidden_width(channels: int, ratio: float, groups: int) -> int:
    per_group = max(1, round(ratio * channels / groups))
    return per_group * groups


def expand(
    model: nn.Module,
    *,
    ratio: float = 4,
    depth: int = 1,
    layers: LayerSelection = None,
    zero_init: bool = True,
    slope: float = 0.0,
    plan: ExpansionPlan | None = None,
) -> nn.Module:
    """Return a deep giant: a copy of ``model`` with ``depth`` :class:`ExpansionBlock` s after each layer.

    Pure: ``model`` is not modified. Each chosen layer ``L`` is replaced by ``BoostedLayer(L, blocks)``; the
    giant's forward is the tiny network's with :math:`L \\mapsto B_d \\circ \\dots \\circ B_1 \\circ L`.
    Blocks get ``L``'s device and dtype. The plan (expanded / skipped with reasons) is logged at INFO.

    Args:
        model: the tiny network.
        ratio: expansion ratio :math:`r` (hidden width :math:`rC`, rounded to a multiple of the groups).
        depth: number of blocks inserted after each layer.
        layers: which layers (see :func:`plan_expansion`); ``None`` = all eligible.
        zero_init: start every block as the identity (giant function = tiny function).
        slope: initial PLT slope (0 = ReLU).
        plan: a precomputed plan for ``model`` (skips tracing); ``layers`` is then ignored.

    Returns:
        The giant (train/eval mode as ``model``).

    Raises:
        ValueError: for a bad ratio/depth, an explicit selection that cannot be expanded, or a plan that
            expands nothing.

    Example:
        >>> giant = expand(nn.Sequential(nn.Linear(4, 3)), ratio=2)
        >>> type(giant[0]).__name__
        'BoostedLayer'
    """
    if not ratio > 0:
        raise ValueError(f"expansion ratio must be > 0, got {ratio}")
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"expansion depth must be an integer >= 1, got {depth!r}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("expand the bare model, not its DistributedDataParallel wrapper (use model.module)")
    plan = plan or plan_expansion(model, layers)
    if not plan.expanded:
        raise ValueError("no layer can be expanded:\n" + plan.summary())
    logger.info(plan.summary())
    giant = copy.deepcopy(model)
    for name, sink in plan.expanded.items():
        layer = giant.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            channels, groups, kind = layer.out_channels, layer.groups, "conv"
        else:
            channels, groups, kind = layer.out_features, 1, "linear"
        hidden = _hidden_width(channels, ratio, groups)
        blocks = [
            ExpansionBlock(channels, hidden, groups=groups, kind=kind, zero_init=zero_init, slope=slope)
            for _ in range(depth)
        ]
        boosted = BoostedLayer(layer, blocks, bias_sink=sink)
        boosted.blocks.to(device=layer.weight.device, dtype=layer.weight.dtype)
        boosted.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        setattr(giant.get_submodule(parent_name) if parent_name else giant, child, boosted)
    return giant


def boosted_layers(model: nn.Module) -> dict[str, BoostedLayer]:
    """The :class:`BoostedLayer` modules of a giant by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BoostedLayer)}


def is_giant(model: nn.Module) -> bool:
    """Whether ``model`` contains expanded layers."""
    return bool(boosted_layers(model))


__all__ = [
    "BoostedLayer",
    "ExpansionBlock",
    "ExpansionPlan",
    "boosted_layers",
    "expand",
    "is_giant",
    "plan_expansion",
]
