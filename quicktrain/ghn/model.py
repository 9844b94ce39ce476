"""The Graph HyperNetwork: Graphormer layers over a network's graph, then decoders to parameter tensors.

GHN-3 (Knyazev et al., ICML 2023, Sec. 3) replaces GHN-2's gated GNN (Knyazev et al., NeurIPS 2021) by
Graphormer layers (Ying et al., 2021): node features are type + shape + degree embeddings, and self-attention
is biased by learned embeddings of forward and backward shortest-path distances. A decoder maps each node
embedding to a fixed-size chunk that is tiled/sliced to the parameter's shape (GHN-2 Sec. 4, "tiling"), and
predicted tensors are normalised by their fan-in (GHN-2 Sec. 4, "operation-dependent normalisation").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph import NUM_TYPES, Graph, PrimType

_WEIGHT_TYPES = {PrimType.CONV, PrimType.CONV_DW, PrimType.CONV_DIL, PrimType.LINEAR}
_NORM_TYPES = {PrimType.BN, PrimType.LN, PrimType.GN}
_TYPES = list(PrimType)
SHAPE_BUCKETS = 24


@dataclass(frozen=True)
class GHNConfig:
    """Sizes of a GHN; ``T``/``S``/``M`` follow GHN-3's tiny/small/medium widths (Table 1).

    Attributes:
        hid: node embedding width.
        heads: attention heads per layer.
        layers: Graphormer layers.
        chunk: ``(out, in, k, k)`` of the decoded chunk for weights; tiled/sliced to any shape.
        chunk_1d: length of the decoded vector for 1-D tensors (norm weights, biases).
        dec_hid: hidden width of the decoders.
        sp_cutoff: shortest-path distances above this share one "far" embedding.
        max_degree: in/out degrees are clipped to this.
        max_input_dist: distances from the input node are clipped to this.
        graph_info: ``False`` masks node types, distances and degrees (the "no graph" ablation).
    """

    hid: int = 64
    heads: int = 8
    layers: int = 3
    chunk: tuple[int, int, int, int] = (16, 16, 5, 5)
    chunk_1d: int = 64
    dec_hid: int = 128
    sp_cutoff: int = 16
    max_degree: int = 16
    max_input_dist: int = 64
    graph_info: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chunk"] = list(self.chunk)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GHNConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown GHN config keys {sorted(unknown)}; this quicktrain cannot read them")
        d = dict(d)
        if "chunk" in d:
            d["chunk"] = tuple(d["chunk"])
        return cls(**d)


@dataclass(frozen=True)
class DatasetInfo:
    """The data a GHN was meta-trained for; predicting for another input shape or class count is an error."""

    name: str
    in_shape: tuple[int, int, int]
    num_classes: int

    def to_dict(self) -> dict:
        return {"name": self.name, "in_shape": list(self.in_shape), "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        return cls(str(d["name"]), tuple(int(v) for v in d["in_shape"]), int(d["num_classes"]))


SIZES: dict[str, GHNConfig] = {
    "T": GHNConfig(hid=64, heads=8, layers=3, chunk=(16, 16, 5, 5), chunk_1d=64, dec_hid=128),
    "S": GHNConfig(hid=128, heads=16, layers=5, chunk=(32, 32, 5, 5), chunk_1d=128, dec_hid=256),
    "M": GHNConfig(hid=192, heads=16, layers=8, chunk=(32, 32, 7, 7), chunk_1d=192, dec_hid=384),
}


def ghn_config(size: str, **overrides) -> GHNConfig:
    """The config of size ``T``, ``S`` or ``M``, with ``overrides`` applied."""
    if size not in SIZES:
        raise ValueError(f"Unknown GHN size {size!r}; choose from {sorted(SIZES)}")
    return replace(SIZES[size], **overrides)


def shape_bucket(v: Tensor) -> Tensor:
    """Bucket of a dimension size: ``0`` for absent, ``1 + floor(log2 v)`` otherwise (capped)."""
    b = torch.where(v > 0, 1 + torch.log2(v.clamp(min=1).float()).floor().long(), torch.zeros_like(v))
    return b.clamp(max=SHAPE_BUCKETS - 1)


@dataclass
class DistanceBias:
    """Shortest-path distances of one graph in sparse form, expanded to dense rows one query block at a time.

    GHN-3 (Sec. 3) biases attention by ``b^{fw}[d(i -> j)] + b^{bw}[d(j -> i)]``. Only pairs within the cutoff
    have a distance other than "far", so the graph stores them sparsely (``O(N * reach)``); a query block
    ``[start, stop)`` needs dense rows ``d(i -> :)`` and ``d(: -> i)`` for ``i`` in the block, i.e. the pairs whose
    source (forward) or destination (backward) lies in the block. Both lists are kept sorted by that node so a
    block is one ``searchsorted`` slice. Memory per block: ``O(block * N)`` instead of ``O(N^2)`` per graph.

    Attributes:
        n: number of nodes.
        far: bucket of pairs beyond the cutoff (and of every pair in the no-graph ablation).
        self_dist: bucket of ``d(i -> i)``: 0, or ``far`` in the no-graph ablation.
        fw: ``(row, col, dist)`` with ``d(row -> col) = dist``, sorted by ``row``.
        bw: ``(row, col, dist)`` with ``d(col -> row) = dist``, sorted by ``row``.
    """

    n: int
    far: int
    self_dist: int
    fw: tuple[Tensor, Tensor, Tensor]
    bw: tuple[Tensor, Tensor, Tensor]

    @classmethod
    def from_graph(cls, graph: Graph, far: int, device: torch.device, *, use_distances: bool = True) -> DistanceBias:
        """Sorted sparse distances of ``graph`` clipped to ``far`` (all pairs "far" when not ``use_distances``)."""
        if use_distances:
            src, dst = graph.sp_index[0], graph.sp_index[1]
            dist = graph.sp_dist.clamp(max=far)
        else:
            src = dst = dist = torch.zeros(0, dtype=torch.long)

        def by_row(row: Tensor, col: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            order = torch.argsort(row, stable=True)
            return row[order].to(device), col[order].to(device), dist[order].to(device)

        return cls(graph.num_nodes, far, 0 if use_distances else far, by_row(src, dst), by_row(dst, src))

    def rows(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Dense ``[stop - start, N]`` buckets of ``d(i -> j)`` and ``d(j -> i)`` for ``i`` in ``[start, stop)``."""
        dev = self.fw[0].device
        out = []
        for row, col, dist in (self.fw, self.bw):
            block = torch.full((stop - start, self.n), self.far, dtype=torch.long, device=dev)
            lo, hi = torch.searchsorted(row, torch.tensor([start, stop], device=dev)).tolist()
            block[row[lo:hi] - start, col[lo:hi]] = dist[lo:hi]
            idx = torch.arange(stop - start, device=dev)
            block[idx, idx + start] = self.self_dist
            out.append(block)
        return out[0], out[1]


ATTN_BLOCK = 512  # query rows per attention block: memory O(ATTN_BLOCK * N * heads) per layer


class GraphormerLayer(nn.Module):
    """Pre-norm Graphormer layer with shortest-path attention bias (GHN-3 Eq. 2, Graphormer Eq. 6).

    .. math::
        A_{ij} = \\frac{(h_i W_Q)(h_j W_K)^\\top}{\\sqrt{d}}
                 + b^{fw}_{\\phi(i \\to j)} + b^{bw}_{\\phi(j \\to i)}

    where :math:`\\phi` is the (clipped) shortest-path distance; then ``h += softmax(A) V W_O`` and
    ``h += MLP(LN(h))``. Attention is exact and full (every node attends to every node of its graph), but it
    is computed per graph and per block of query rows, with the bias built from :class:`DistanceBias`: no
    ``[N, N]`` tensor is materialised, so a 3,500-node ResNet-998 graph needs ``O(block * N)`` memory.
    """

    def __init__(self, hid: int, heads: int, sp_buckets: int) -> None:
        super().__init__()
        if hid % heads:
            raise ValueError(f"hid {hid} must be divisible by heads {heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(hid)
        self.qkv = nn.Linear(hid, 3 * hid)
        self.proj = nn.Linear(hid, hid)
        self.ln2 = nn.LayerNorm(hid)
        self.mlp = nn.Sequential(nn.Linear(hid, 2 * hid), nn.GELU(), nn.Linear(2 * hid, hid))
        self.sp_fw = nn.Embedding(sp_buckets, heads)
        self.sp_bw = nn.Embedding(sp_buckets, heads)
        nn.init.zeros_(self.sp_fw.weight)
        nn.init.zeros_(self.sp_bw.weight)

    def forward(self, h: Tensor, biases: list[DistanceBias], *, block: int = ATTN_BLOCK) -> Tensor:
        """``h [sum N_g, hid]``: the nodes of all graphs, concatenated in the order of ``biases``."""
        n_all, d = h.shape
        if n_all != sum(b.n for b in biases):
            raise ValueError(f"h has {n_all} nodes but the graphs have {sum(b.n for b in biases)}")
        q, k, v = self.qkv(self.ln1(h)).reshape(n_all, 3, self.heads, d // self.heads).permute(1, 2, 0, 3)
        att: list[Tensor] = []
        start = 0
        for bias in biases:
            kg, vg = k[:, start : start + bias.n], v[:, start : start + bias.n]
            for r0 in range(0, bias.n, block):
                r1 = min(bias.n, r0 + block)
                fw, bw = bias.rows(r0, r1)
                mask = (self.sp_fw(fw) + self.sp_bw(bw)).permute(2, 0, 1)  # [heads, rows, N]
                att.append(F.scaled_dot_product_attention(q[:, start + r0 : start + r1], kg, vg, attn_mask=mask))
            start += bias.n
        h = h + self.proj(torch.cat(att, 1).transpose(0, 1).reshape(n_all, d))
        return h + self.mlp(self.ln2(h))


class GHN(nn.Module):
    """Graph HyperNetwork: ``graph -> {parameter name: predicted tensor}`` in one forward pass.

    Node features (GHN-3 Eq. 1 and Graphormer's centrality encoding):

    .. math::
        h_i^{(0)} = E_{type}[t_i] + \\sum_{k=1}^{4} E^{(k)}_{shape}[\\lfloor\\log_2 s_{ik}\\rfloor]
                    + E_{in}[\\deg^-_i] + E_{out}[\\deg^+_i] + E_{dist}[d(\\text{input} \\to i)]

    then ``layers`` :class:`GraphormerLayer` s, a final LayerNorm, and the decoders.
    """

    def __init__(self, config: GHNConfig, dataset: DatasetInfo | None = None) -> None:
        super().__init__()
        self.config = config
        self.dataset = dataset  # configuration (saved in checkpoints), not training state
        c = config
        self.type_embed = nn.Embedding(NUM_TYPES, c.hid)
        self.shape_embed = nn.ModuleList([nn.Embedding(SHAPE_BUCKETS, c.hid) for _ in range(4)])
        self.deg_in = nn.Embedding(c.max_degree + 1, c.hid)
        self.deg_out = nn.Embedding(c.max_degree + 1, c.hid)
        self.input_dist = nn.Embedding(c.max_input_dist + 2, c.hid)
        for emb in [self.type_embed, self.deg_in, self.deg_out, self.input_dist, *self.shape_embed]:
            nn.init.normal_(emb.weight, std=0.02 * math.sqrt(c.hid) / math.sqrt(8))
        self.layers = nn.ModuleList(
            [GraphormerLayer(c.hid, c.heads, c.sp_cutoff + 2) for _ in range(c.layers)]
        )
        self.ln = nn.LayerNorm(c.hid)
        co, ci, k1, k2 = c.chunk
        self.decoder = nn.Sequential(
            nn.Linear(c.hid, c.dec_hid), nn.GELU(), nn.Linear(c.dec_hid, co * ci * k1 * k2)
        )
        # learnable log-gain per node type on predicted weights: output scales (e.g. of logits) adapt fast
        self.log_gain = nn.Parameter(torch.zeros(NUM_TYPES))
        self.decoder_1d = nn.Sequential(
            nn.Linear(c.hid, c.dec_hid), nn.GELU(), nn.Linear(c.dec_hid, c.chunk_1d)
        )
        # unit-variance raw outputs at init (so fan-in normalisation gives He-like tensors) and no shared
        # output bias (it would make every layer's prediction share one pattern)
        for dec in (self.decoder, self.decoder_1d):
            nn.init.normal_(dec[-1].weight, std=1.0 / math.sqrt(c.dec_hid * 0.25))
            nn.init.zeros_(dec[-1].bias)

    # ----------------------------------------------------------------------------------------------------
    def node_features(self, graph: Graph) -> tuple[Tensor, DistanceBias]:
        """Initial embeddings ``[N, hid]`` and the sparse attention distances of one graph."""
        c = self.config
        dev = self.type_embed.weight.device
        types = graph.node_types.to(dev)
        h = sum(emb(shape_bucket(graph.node_shapes[:, k].to(dev))) for k, emb in enumerate(self.shape_embed))
        if c.graph_info:
            deg_in, deg_out = graph.degrees()
            in_dist = graph.input_dist.clone()
            in_dist[in_dist < 0] = c.max_input_dist + 1
            h = (
                h
                + self.type_embed(types)
                + self.deg_in(deg_in.clamp(max=c.max_degree).to(dev))
                + self.deg_out(deg_out.clamp(max=c.max_degree).to(dev))
                + self.input_dist(in_dist.clamp(max=c.max_input_dist + 1).to(dev))
            )
        else:  # ablation: no types, degrees or distances, only parameter shapes
            h = h + self.type_embed(torch.full_like(types, PrimType.MASK.id))
        return h, DistanceBias.from_graph(graph, c.sp_cutoff + 1, dev, use_distances=c.graph_info)

    def embed(self, graphs: list[Graph]) -> list[Tensor]:
        """Node embeddings ``[N_g, hid]`` of each graph after the Graphormer layers.

        The graphs' nodes are concatenated (no padding); attention stays within each graph.
        """
        feats = [self.node_features(g) for g in graphs]
        h = torch.cat([f[0] for f in feats])
        biases = [f[1] for f in feats]
        for layer in self.layers:
            h = layer(h, biases)
        return list(self.ln(h).split([g.num_nodes for g in graphs]))

    def forward(self, graphs: Graph | list[Graph]) -> list[dict[str, Tensor]]:
        """Predict every supported parameter of each graph's network.

        Returns:
            one ``{parameter name: tensor}`` dict per graph (gradients flow back to the GHN).
        """
        if isinstance(graphs, Graph):
            graphs = [graphs]
        out: list[dict[str, Tensor]] = [{} for _ in graphs]
        for gi, name, w in self.iter_predictions(graphs):
            out[gi][name] = w
        return out

    def iter_predictions(
        self, graphs: list[Graph], *, decode_batch: int = 1024
    ) -> Iterator[tuple[int, str, Tensor]]:
        """Yield ``(graph index, parameter name, tensor)`` one tensor at a time.

        Decoding is batched by route (tensors with >= 2 dims vs 1-D tensors) in groups of ``decode_batch``
        nodes; each decoded chunk is tiled/sliced to its tensor's shape and normalised. A consumer that writes
        each tensor into its model straight away (as :func:`~quicktrain.ghn.predict_into` does) never holds
        more than one group of predictions, which keeps huge models within memory.
        """
        embs = self.embed(graphs)
        jobs: dict[str, list[tuple[int, int]]] = {"nd": [], "1d": []}
        last: list[set[int]] = []
        for gi, g in enumerate(graphs):
            last.append(last_layer_nodes(g))
            for ni, pname in enumerate(g.param_names):
                if pname is not None:
                    jobs["nd" if int((g.node_shapes[ni] > 0).sum()) >= 2 else "1d"].append((gi, ni))
        for route, dec in (("nd", self.decoder), ("1d", self.decoder_1d)):
            todo = jobs[route]
            for start in range(0, len(todo), decode_batch):
                group = todo[start : start + decode_batch]
                raw = dec(torch.stack([embs[gi][ni] for gi, ni in group]))
                for row, (gi, ni) in enumerate(group):
                    g = graphs[gi]
                    shape = tuple(int(v) for v in g.node_shapes[ni] if v > 0)
                    ptype = _TYPES[int(g.node_types[ni])]
                    w = tile_to_shape(raw[row], shape, self.config.chunk, ptype)
                    w = normalize_param(w, ptype, is_last=ni in last[gi])
                    if w.dim() >= 2:
                        w = w * self.log_gain[ptype.id].exp()
                    yield gi, g.param_names[ni], w


def last_layer_nodes(g: Graph) -> set[int]:
    """Nodes whose output is the network output: no successor, or only a final bias node (``beta = 1``)."""
    n = g.num_nodes
    out_deg = torch.zeros(n, dtype=torch.long).index_add_(0, g.edges[0], torch.ones_like(g.edges[0]))
    sinks = set(torch.nonzero(out_deg == 0).flatten().tolist())
    last = set(sinks)
    bias = PrimType.BIAS.id
    for s, d in g.edges.t().tolist():
        if d in sinks and int(g.node_types[d]) == bias and out_deg[s] == 1:
            last.add(s)
    return last


def tile_to_shape(
    raw: Tensor, shape: tuple[int, ...], chunk: tuple[int, int, int, int], ptype: PrimType
) -> Tensor:
    """Tile or slice one decoded chunk to ``shape`` (GHN-2 Sec. 4, "tiling"; GHN-3 keeps it).

    * 4-D conv weights ``[o, i, kh, kw]`` from the chunk ``[co, ci, k, k]``: repeat along ``o`` and ``i``
      ``ceil(o/co)``, ``ceil(i/ci)`` times and slice; kernels smaller than ``k`` are centre-cropped, larger
      ones get the chunk in their centre and zeros around it. 3-D conv weights are ``[o, i, 1, kw]``.
    * other tensors with >= 2 dims: viewed as ``[prod(shape[:-1]), shape[-1]]`` (conv-free: linear weights,
      position tables) and tiled from the chunk seen as a ``[co, ci*k*k]`` matrix.
    * 1-D / scalar tensors from the 1-D chunk ``[L]``: repeated ``ceil(n/L)`` times and sliced.

    Args:
        raw: ``[co*ci*k*k]`` or ``[L]`` decoder output for one node.
        shape: the target shape.
        chunk: ``(co, ci, k, k)``.
        ptype: the node's type (decides the conv route for 3-D/4-D tensors).
    """
    co, ci, k1, k2 = chunk
    if len(shape) <= 1:
        n = shape[0] if shape else 1
        return _repeat_to(raw, (n,)).reshape(shape)
    if ptype in {PrimType.CONV, PrimType.CONV_DW, PrimType.CONV_DIL} and len(shape) in (3, 4):
        o, i, *ks = shape
        kh, kw = (1, ks[0]) if len(ks) == 1 else ks
        w = _repeat_to(raw.view(co, ci, k1, k2), (o, i, k1, k2))
        w = _fit_dim(_fit_dim(w, 2, kh), 3, kw)
        return w.reshape(shape)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return _repeat_to(raw.view(co, ci * k1 * k2), (rows, cols)).reshape(shape)


def _repeat_to(x: Tensor, size: tuple[int, ...]) -> Tensor:
    reps = [math.ceil(s / d) for s, d in zip(size, x.shape, strict=True)]
    if any(r > 1 for r in reps):
        x = x.repeat(*reps)
    return x[tuple(slice(0, s) for s in size)]


def _fit_dim(x: Tensor, dim: int, size: int) -> Tensor:
    """Centre-crop (``size < current``) or centre zero-pad (``size > current``) dimension ``dim``."""
    cur = x.shape[dim]
    if size == cur:
        return x
    if size < cur:
        start = (cur - size) // 2
        return x.narrow(dim, start, size)
    before = (size - cur) // 2
    return F.pad(x, _pad_arg(x.dim(), dim, before, size - cur - before))


def _pad_arg(ndim: int, dim: int, before: int, after: int) -> list[int]:
    pad = [0] * (2 * ndim)
    k = ndim - 1 - dim  # F.pad lists the last dimension first
    pad[2 * k], pad[2 * k + 1] = before, after
    return pad


def normalize_param(w: Tensor, ptype: PrimType, *, is_last: bool = False) -> Tensor:
    """Fan-in-aware normalisation of a predicted tensor (GHN-2 Sec. 4, operation-dependent normalisation).

    .. math::
        W \\leftarrow W \\sqrt{\\beta / \\text{fan\\_in}},\\qquad
        \\text{fan\\_in} = \\prod_{k \\ge 1} s_k,\\quad
        \\beta = 2 \\text{ (ReLU follows)},\\ 1 \\text{ (depthwise conv, classifier)}

    norm weights :math:`\\gamma = 2\\,\\sigma(\\gamma/2) \\in (0, 2)`,
    biases :math:`b = \\tanh(b / 5) \\in (-1, 1)`.
    Other parameters (position tables, class tokens, scales): ``W / sqrt(shape[-1])``.
    """
    if ptype in _WEIGHT_TYPES and w.dim() >= 2:
        beta = 1.0 if (is_last or ptype is PrimType.CONV_DW) else 2.0
        return w * math.sqrt(beta / (w[0].numel()))
    if ptype in _NORM_TYPES or (ptype is PrimType.SCALE and w.dim() <= 1):
        return 2.0 * torch.sigmoid(0.5 * w)
    if w.dim() <= 1:
        return torch.tanh(0.2 * w)
    return w / math.sqrt(w.shape[-1])


def predicted_param_regularizer(params: list[dict[str, Tensor]]) -> Tensor:
    """GHN-3's regulariser on predicted parameters (GHN-3 Sec. 4, ``predparam_wd``, used with λ = 3e-5).

    .. math::
        R = \\frac{1}{M} \\sum_{m=1}^{M} \\sum_{W \\in \\theta_m} \\lVert W \\rVert_F

    averaged over the ``M`` networks of a meta-batch; the meta-loss adds ``λ R``.
    """
    norms = [sum(torch.linalg.vector_norm(w) for w in p.values()) for p in params if p]
    if not norms:
        raise ValueError("no predicted parameters to regularise")
    return torch.stack([torch.as_tensor(n) for n in norms]).mean()


__all__ = [
    "ATTN_BLOCK",
    "DatasetInfo",
    "DistanceBias",
    "GHN",
    "GHNConfig",
    "GraphormerLayer",
    "SIZES",
    "ghn_config",
    "last_layer_nodes",
    "normalize_param",
    "predicted_param_regularizer",
    "tile_to_shape",
]
