"""Computational graph of any ``nn.Module``, traced from one forward pass (GHN-2 Sec. 3, GHN-3 Sec. 3).

Why the autograd graph and not ``torch.fx``: ``fx`` symbolic tracing fails on data-dependent Python control
flow, which many torchvision models have (shape asserts in ViT/Swin, ``if`` on input sizes), and it sees
modules, not the tensor ops that actually ran. One real forward pass records every op that touched a
parameter, whatever Python produced it, and walking ``grad_fn.next_functions`` from the output recovers
the data flow (GHN-2's ``Graph`` does the same). Cost: one forward pass on a single example.

Nodes are (a) one node per parameter tensor (conv/linear weights, biases, norm weights, embeddings) and
(b) one node per parameter-free op that matters (input, pooling, global pooling, sum, concat, gating
product, attention softmax). Every other op (activations, reshapes, dropout) is transparent: its inputs are
wired straight to its consumers. Edges follow the data flow, input to output.

Shortest paths are stored sparsely: only pairs at forward distance ``<= sp_cutoff`` are kept, so memory is
``O(N * reach)`` rather than ``O(N^2)`` for huge graphs; the GHN treats missing pairs as "far".
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

MAX_DIMS = 4  # parameter tensors with more dimensions are unsupported (reported, default init kept)


class PrimType(StrEnum):
    """Primitive node types; the integer id of a type is its position in this enum (stable: append only)."""

    INPUT = "input"
    CONV = "conv"
    CONV_DW = "conv_dw"  # depthwise convolution, groups = in channels (separable convs: conv_dw -> conv 1x1)
    CONV_DIL = "conv_dil"  # dilated convolution
    LINEAR = "linear"
    BN = "bn"
    LN = "ln"
    GN = "gn"  # group / instance norm
    BIAS = "bias"
    EMBED = "embed"  # parameter added or concatenated to activations: positional encodings, class tokens
    SCALE = "scale"  # parameter multiplied with activations: layer scale, PReLU
    PARAM = "param"  # any other parameter (e.g. a relative-position table)
    MAX_POOL = "max_pool"
    AVG_POOL = "avg_pool"
    GLOBAL_POOL = "global_pool"
    SUM = "sum"
    CONCAT = "concat"
    MUL = "mul"  # product of two activations (squeeze-excite gating, GLU)
    SOFTMAX = "softmax"  # attention softmax / fused attention
    MASK = "mask"  # not a real type: the ablation that hides node types
    CONV_GROUP = "conv_group"  # grouped convolution, 1 < groups < in channels (ResNeXt, ShuffleNet)

    @property
    def id(self) -> int:
        return _TYPE_IDS[self]


_TYPE_IDS = {t: i for i, t in enumerate(PrimType)}
NUM_TYPES = len(_TYPE_IDS)

# autograd function name (without the trailing "Backward<n>") -> type of its parameter-free op node
_OP_TYPES: dict[str, PrimType] = {
    "MaxPool2DWithIndices": PrimType.MAX_POOL,
    "MaxPool1DWithIndices": PrimType.MAX_POOL,
    "MaxPool3DWithIndices": PrimType.MAX_POOL,
    "AvgPool2D": PrimType.AVG_POOL,
    "AvgPool1D": PrimType.AVG_POOL,
    "AvgPool3D": PrimType.AVG_POOL,
    "AdaptiveMaxPool2D": PrimType.MAX_POOL,
    "AdaptiveAvgPool2D": PrimType.AVG_POOL,
    "AdaptiveAvgPool1D": PrimType.AVG_POOL,
    "Mean": PrimType.GLOBAL_POOL,
    "Add": PrimType.SUM,
    "Cat": PrimType.CONCAT,
    "Stack": PrimType.CONCAT,
    "Mul": PrimType.MUL,
    "Softmax": PrimType.SOFTMAX,
    "ScaledDotProductFlashAttentionForCpu": PrimType.SOFTMAX,
    "ScaledDotProductEfficientAttention": PrimType.SOFTMAX,
    "ScaledDotProductFlashAttention": PrimType.SOFTMAX,
    "ScaledDotProductCudnnAttention": PrimType.SOFTMAX,
    "ScaledDotProductAttentionMath": PrimType.SOFTMAX,
}
# ops whose node is kept only when two or more activations meet (``x + bias`` is not a sum node)
_NEEDS_TWO_INPUTS = {PrimType.SUM, PrimType.CONCAT, PrimType.MUL}
# autograd function name -> type of the weight-like parameters it consumes
_PARAM_TYPES: dict[str, PrimType] = {
    "Convolution": PrimType.CONV,
    "Addmm": PrimType.LINEAR,
    "Mm": PrimType.LINEAR,
    "Bmm": PrimType.LINEAR,
    "Matmul": PrimType.LINEAR,
    "Linear": PrimType.LINEAR,
    "NativeBatchNorm": PrimType.BN,
    "CudnnBatchNorm": PrimType.BN,
    "NativeLayerNorm": PrimType.LN,
    "NativeGroupNorm": PrimType.GN,
    "Add": PrimType.EMBED,
    "Cat": PrimType.EMBED,
    "Mul": PrimType.SCALE,
    "Prelu": PrimType.SCALE,
    "PreluKernel": PrimType.SCALE,
    "Embedding": PrimType.EMBED,
}
_NORM_TYPES = {PrimType.BN, PrimType.LN, PrimType.GN}


@dataclass
class Graph:
    """Directed acyclic graph of a network (GHN-2 Sec. 3: nodes = ops with their parameter shapes).

    Attributes:
        node_names: parameter name for parameter nodes, ``"<type>:<k>"`` for op nodes.
        node_types: ``[N]`` int64 type ids (:class:`PrimType` positions).
        node_shapes: ``[N, 4]`` int64 parameter shapes, right-padded with 0 (op nodes: all 0).
        param_names: for each node, the parameter it predicts, or ``None``.
        edges: ``[2, E]`` int64 data-flow edges ``src -> dst``.
        sp_index: ``[2, P]`` pairs ``(i, j)`` with ``0 < d(i -> j) <= sp_cutoff``.
        sp_dist: ``[P]`` their forward shortest-path distances ``d(i -> j)``.
        sp_cutoff: the cutoff used for ``sp_index``.
        input_dist: ``[N]`` distance from the input node (``-1`` when unreachable).
        unsupported: names of parameters the GHN does not predict (not reached by the forward pass or
            more than 4 dimensions); they keep their default initialisation.
        output_shape: shape of the traced output for one example (the class count is its last entry).
    """

    node_names: list[str]
    node_types: Tensor
    node_shapes: Tensor
    param_names: list[str | None]
    edges: Tensor
    sp_index: Tensor
    sp_dist: Tensor
    sp_cutoff: int
    input_dist: Tensor
    unsupported: list[str] = field(default_factory=list)
    output_shape: tuple[int, ...] = ()

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    def degrees(self) -> tuple[Tensor, Tensor]:
        """In- and out-degrees ``([N], [N])`` (Graphormer's centrality, GHN-3 Eq. 3)."""
        n = self.num_nodes
        ones = torch.ones(self.edges.shape[1], dtype=torch.long)
        deg_in = torch.zeros(n, dtype=torch.long).index_add_(0, self.edges[1], ones)
        deg_out = torch.zeros(n, dtype=torch.long).index_add_(0, self.edges[0], ones)
        return deg_in, deg_out

    def dense_distances(self, far: int) -> Tensor:
        """Dense ``[N, N]`` forward distances ``D[i, j] = d(i -> j)``, with ``far`` beyond the cutoff.

        ``D[i, i] = 0``. Only for graphs whose ``N^2`` fits memory; the sparse form is the stored one.
        """
        n = self.num_nodes
        dist = torch.full((n, n), far, dtype=torch.long)
        dist[self.sp_index[0], self.sp_index[1]] = self.sp_dist
        dist.fill_diagonal_(0)
        return dist

    def to_dict(self) -> dict:
        """Compact readable form: ``{name: (type, shape, [successor names])}``, used to compare graphs."""
        succ: dict[int, list[str]] = {i: [] for i in range(self.num_nodes)}
        for s, d in self.edges.t().tolist():
            succ[s].append(self.node_names[d])
        return {
            name: (_TYPE_LIST[t].value, tuple(x for x in shape if x > 0), sorted(succ[i]))
            for i, (name, t, shape) in enumerate(
                zip(self.node_names, self.node_types.tolist(), self.node_shapes.tolist(), strict=True)
            )
        }


_TYPE_LIST = list(PrimType)


def _fn_name(fn) -> str:
    name = fn.name()
    cut = name.rfind("Backward")
    return name[:cut] if cut > 0 else name


def _param_node_type(fn, fn_name: str, p: Tensor) -> PrimType:
    """Type of parameter ``p`` consumed by autograd function ``fn`` (weight-like vs bias)."""
    base = _PARAM_TYPES.get(fn_name, PrimType.PARAM)
    if base is PrimType.CONV:
        if p.dim() <= 1:
            return PrimType.BIAS
        groups = getattr(fn, "_saved_groups", 1)
        dilation = getattr(fn, "_saved_dilation", (1,))
        if groups > 1:
            # weight [out, in / groups, k, k]: one input channel per group means depthwise
            return PrimType.CONV_DW if p.shape[1] == 1 else PrimType.CONV_GROUP
        if any(d > 1 for d in dilation):
            return PrimType.CONV_DIL
        return PrimType.CONV
    if base is PrimType.LINEAR:
        return PrimType.LINEAR if p.dim() >= 2 else PrimType.BIAS
    if base in _NORM_TYPES:
        return base if _is_weight_of_pair(p, fn) else PrimType.BIAS
    if base is PrimType.EMBED and p.dim() <= 1:
        return PrimType.BIAS
    return base


def _is_weight_of_pair(p: Tensor, fn) -> bool:
    # Norm functions list (input, weight, bias) in next_functions; the first parameter met is the weight.
    for child, _ in fn.next_functions:
        if child is not None and hasattr(child, "variable"):
            return child.variable is p
    return True


def model_to_graph(
    model: nn.Module,
    example_inputs: Tensor,
    *,
    sp_cutoff: int = 16,
) -> Graph:
    """Trace ``model`` on one example and return its :class:`Graph`.

    The model runs once in eval mode on ``example_inputs[:1]`` (restoring its mode and ``requires_grad``
    flags afterwards); its buffers are not changed in eval mode.

    Args:
        model: any module taking one tensor.
        example_inputs: a batch ``[B, ...]`` shaped like the model's input.
        sp_cutoff: keep forward shortest paths up to this length (sparse form).

    Returns:
        The graph; ``graph.unsupported`` lists parameters that keep their default initialisation.
    """
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() < 2:
        raise ValueError(
            "example_inputs must be a batch tensor [B, C, H, W] (or [B, ...]) shaped like the model's input, "
            f"got {type(example_inputs).__name__} of shape {getattr(example_inputs, 'shape', None)}"
        )
    params = dict(model.named_parameters())
    order = {name: i for i, name in enumerate(params)}
    by_id = {id(p): name for name, p in params.items()}
    was_training = model.training
    flags = {name: p.requires_grad for name, p in params.items()}
    x = example_inputs[:1].detach().clone().requires_grad_(True)
    try:
        model.eval()
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            out = model(x)
    finally:
        model.train(was_training)
        for name, p in params.items():
            p.requires_grad_(flags[name])
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor) or out.grad_fn is None:
        raise ValueError(f"{type(model).__name__} output does not depend on its input; cannot trace a graph")

    # Iterative post-order over the autograd graph (children = earlier ops), safe for 10^4-deep nets.
    post: list = []
    seen: set[int] = set()
    stack = [(out.grad_fn, False)]
    while stack:
        fn, expanded = stack.pop()
        if expanded:
            post.append(fn)
            continue
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        stack.append((fn, True))
        for child, _ in fn.next_functions:
            if child is not None and id(child) not in seen:
                stack.append((child, False))

    names: list[str] = []
    types: list[PrimType] = []
    shapes: list[tuple[int, ...]] = []
    pnames: list[str | None] = []
    edges: set[tuple[int, int]] = set()
    param_node: dict[str, int] = {}
    depends: dict[int, bool] = {}  # does this fn's output depend on the input?
    psets: dict[int, list[str]] = {}  # parameters feeding a parameter-only subtree
    outs: dict[int, tuple[int, ...]] = {}  # graph nodes carrying this fn's output
    op_count = 0

    def new_node(name: str, t: PrimType, shape: tuple[int, ...], pname: str | None) -> int:
        names.append(name)
        types.append(t)
        shapes.append(shape)
        pnames.append(pname)
        return len(names) - 1

    input_node = -1
    for fn in post:
        key = id(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf tensor
            var = fn.variable
            if var is x:
                input_node = new_node("input", PrimType.INPUT, tuple(x.shape[1:]), None)
                depends[key], outs[key], psets[key] = True, (input_node,), []
            else:
                name = by_id.get(id(var))
                depends[key], outs[key], psets[key] = False, (), [name] if name else []
            continue
        children = [c for c, _ in fn.next_functions if c is not None]
        dep_children = [c for c in children if depends.get(id(c), False)]
        if not dep_children:  # parameter-only subtree (e.g. a transposed weight): pass parameters up
            depends[key], outs[key] = False, ()
            psets[key] = sorted({n for c in children for n in psets.get(id(c), [])}, key=order.get)
            continue
        depends[key], psets[key] = True, []
        in_nodes = sorted({n for c in dep_children for n in outs[id(c)]})
        fname = _fn_name(fn)
        fparams = sorted(
            {n for c in children if not depends.get(id(c), False) for n in psets.get(id(c), [])},
            key=order.get,
        )
        chain: list[int] = []
        for pname in fparams:
            if pname in param_node:  # shared weights: one node per tensor
                chain.append(param_node[pname])
                continue
            p = params[pname]
            if p.dim() > MAX_DIMS:
                continue
            node = new_node(pname, _param_node_type(fn, fname, p), tuple(p.shape), pname)
            param_node[pname] = node
            chain.append(node)
        op_type = _OP_TYPES.get(fname)
        keep = op_type is not None
        if op_type in _NEEDS_TWO_INPUTS:  # x + bias, x * scale: the parameter node stands for the op
            keep = len(dep_children) >= 2 or (op_type is PrimType.CONCAT and bool(fparams))
        if keep:
            chain.append(new_node(f"{op_type.value}:{op_count}", op_type, (), None))
            op_count += 1
        if not chain:
            outs[key] = tuple(in_nodes)
            continue
        for u in in_nodes:
            if u != chain[0]:
                edges.add((u, chain[0]))
        for a, b in zip(chain[:-1], chain[1:], strict=True):
            if a != b:
                edges.add((a, b))
        outs[key] = (chain[-1],)
    if input_node < 0:
        raise ValueError(f"{type(model).__name__}'s output does not depend on its input through autograd")

    unsupported = [n for n in params if n not in param_node]
    edge_t = torch.tensor(sorted(edges), dtype=torch.long).reshape(-1, 2).t().contiguous()
    sp_index, sp_dist = shortest_paths(len(names), edge_t, cutoff=sp_cutoff)
    input_dist = bfs_distances(len(names), edge_t, input_node)
    node_shapes = torch.zeros(len(names), MAX_DIMS, dtype=torch.long)
    for i, s in enumerate(shapes):
        if pnames[i] is not None and s:
            node_shapes[i, : len(s)] = torch.tensor(s)
    return Graph(
        node_names=names,
        node_types=torch.tensor([t.id for t in types], dtype=torch.long),
        node_shapes=node_shapes,
        param_names=pnames,
        edges=edge_t,
        sp_index=sp_index,
        sp_dist=sp_dist,
        sp_cutoff=sp_cutoff,
        input_dist=input_dist,
        unsupported=unsupported,
        output_shape=tuple(out.shape[1:]),
    )


def _adjacency(n: int, edges: Tensor) -> list[list[int]]:
    adj: list[list[int]] = [[] for _ in range(n)]
    for s, d in edges.t().tolist():
        adj[s].append(d)
    return adj


def bfs_distances(n: int, edges: Tensor, source: int) -> Tensor:
    """Forward hop distances ``d(source -> j)`` for all ``j`` (``-1`` when unreachable); ``O(N + E)``."""
    adj = _adjacency(n, edges)
    dist = [-1] * n
    dist[source] = 0
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if dist[v] < 0:
                dist[v] = dist[u] + 1
                queue.append(v)
    return torch.tensor(dist, dtype=torch.long)


def shortest_paths(n: int, edges: Tensor, *, cutoff: int) -> tuple[Tensor, Tensor]:
    """Sparse forward shortest paths: all pairs ``(i, j)`` with ``0 < d(i -> j) <= cutoff``.

    .. math::
        d(i \\to j) = \\min\\{\\,|p| : p \\text{ a directed path } i \\leadsto j\\,\\}

    computed by one BFS per source truncated at depth ``cutoff`` (GHN-3 Sec. 3 uses forward and backward
    distances ``d(i -> j)`` and ``d(j -> i)`` as attention biases; the backward one is the transpose).
    Cost ``O(N * reach)`` time and memory instead of a dense ``O(N^2)`` matrix.

    Returns:
        ``(index [2, P], dist [P])``.
    """
    if cutoff < 1:
        raise ValueError(f"sp_cutoff must be >= 1, got {cutoff}")
    adj = _adjacency(n, edges)
    src: list[int] = []
    dst: list[int] = []
    dist: list[int] = []
    for s in range(n):
        seen = {s}
        frontier = [s]
        for depth in range(1, cutoff + 1):
            nxt = []
            for u in frontier:
                for v in adj[u]:
                    if v not in seen:
                        seen.add(v)
                        nxt.append(v)
                        src.append(s)
                        dst.append(v)
                        dist.append(depth)
            if not nxt:
                break
            frontier = nxt
    return torch.tensor([src, dst], dtype=torch.long).reshape(2, -1), torch.tensor(dist, dtype=torch.long)


__all__ = ["Graph", "PrimType", "NUM_TYPES", "model_to_graph", "shortest_paths", "bfs_distances"]
