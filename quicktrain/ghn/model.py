"""The Graph HyperNetwork: Graphormer layers over a network's graph, then decoders to parameter tensors.

GHN-3 (Knyazev et al., ICML 2023, Sec. 3) replaces GHN-2's gated GNN (Knyazev et al., NeurIPS 2021) by
Graphormer layers (Ying et al., 2021): node features are type + shape + degree embeddings, and self-attention
is biased by learned embeddings of forward and backward shortest-path distances. Shapes are embedded as in
GHN-2's shape encoder (Sec. 4: one embedding per dimension, fine bins for small sizes, concatenated). A
GHN-2/3 convolutional decoder (GHN-2 Sec. 4, GHN-3 Sec. 3: a linear layer to ``[h0, k, k]``, then 1x1 convs
to ``[out * in, k, k]``) maps each node embedding to a ``[out, in, k, k]`` chunk; tensors larger than the
chunk are assembled from tiles decoded with a tile-position code (so tiles differ instead of repeating);
the classifier gets its own predictor (GHN-2's ``class_layer_predictor``), and predicted tensors are
normalised by their fan-in (GHN-2 Sec. 4, "operation-dependent normalisation").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph import NUM_TYPES, Graph, PrimType

_WEIGHT_TYPES = {PrimType.CONV, PrimType.CONV_DW, PrimType.CONV_GROUP, PrimType.CONV_DIL, PrimType.LINEAR}
_CONV_TYPES = {PrimType.CONV, PrimType.CONV_DW, PrimType.CONV_GROUP, PrimType.CONV_DIL}
_NORM_TYPES = {PrimType.BN, PrimType.LN, PrimType.GN}
_TYPES = list(PrimType)


def _shape_bins() -> Tensor:
    """Bin values of GHN-2's shape encoder, refined: exact up to 16, then steps of 4, 8, 32, 128.

    GHN-2 (``ShapeEncoder``) uses exact small kernels and channel steps of 8 / 16 / 32; steps of 4 up to 64
    tell 16 from 20 from 24 channels, and exact bins up to 16 tell 5x5 from 7x7 kernels.
    """
    vals = (
        list(range(0, 17))
        + list(range(20, 65, 4))
        + list(range(72, 257, 8))
        + list(range(288, 1025, 32))
        + list(range(1152, 8193, 128))
    )
    return torch.tensor(vals, dtype=torch.long)


SHAPE_BINS = _shape_bins()
SHAPE_BUCKETS = len(SHAPE_BINS)
TILE_FREQS = 8  # sinusoidal frequencies per tile axis


@dataclass(frozen=True)
class GHNConfig:
    """Sizes of a GHN; ``T``/``S``/``M`` follow GHN-3's tiny/small/medium widths (Table 1).

    Attributes:
        hid: node embedding width.
        heads: attention heads per layer.
        layers: Graphormer layers.
        chunk: ``(out, in, k, k)`` of one decoded tile; larger tensors are assembled from tiles.
        chunk_1d: length of one decoded tile of a 1-D tensor (norm weights, biases).
        dec_hid: hidden widths ``(h0, h1)`` of the convolutional decoder (GHN-3: ``(4 hid, 8 hid)``).
        tile_limit: distinct tiles per dimension (each decoded with its own tile code); beyond it tiles repeat,
            which bounds the decoding cost of huge tensors.
        sp_cutoff: shortest-path distances above this share one "far" embedding.
        max_degree: in/out degrees are clipped to this.
        max_input_dist: distances from the input node are clipped to this.
        graph_info: ``False`` masks node types, distances and degrees (the "no graph" ablation).
    """

    hid: int = 64
    heads: int = 8
    layers: int = 3
    chunk: tuple[int, int, int, int] = (64, 64, 7, 7)
    chunk_1d: int = 64
    dec_hid: tuple[int, int] = (128, 256)
    tile_limit: int = 4
    sp_cutoff: int = 16
    max_degree: int = 16
    max_input_dist: int = 64
    graph_info: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chunk"] = list(self.chunk)
        d["dec_hid"] = list(self.dec_hid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GHNConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown GHN config keys {sorted(unknown)}; this quicktrain cannot read them")
        d = dict(d)
        for key in ("chunk", "dec_hid"):
            if key in d:
                d[key] = tuple(d[key])
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
    "T": GHNConfig(hid=64, heads=8, layers=3, chunk=(64, 64, 7, 7), chunk_1d=64, dec_hid=(128, 256)),
    "S": GHNConfig(hid=128, heads=16, layers=5, chunk=(64, 64, 7, 7), chunk_1d=128, dec_hid=(256, 512)),
    "M": GHNConfig(hid=192, heads=16, layers=8, chunk=(64, 64, 7, 7), chunk_1d=192, dec_hid=(384, 768)),
}


def ghn_config(size: str, **overrides) -> GHNConfig:
    """The config of size ``T``, ``S`` or ``M``, with ``overrides`` applied."""
    if size not in SIZES:
        raise ValueError(f"Unknown GHN size {size!r}; choose from {sorted(SIZES)}")
    return replace(SIZES[size], **overrides)


def shape_bucket(v: Tensor) -> Tensor:
    """Index of the nearest bin of :data:`SHAPE_BINS` for each dimension size (``0`` = absent dimension).

    Sizes beyond the last bin share the last bucket; ties go to the smaller bin.
    """
    bins = SHAPE_BINS.to(v.device)
    v = v.clamp(min=0, max=int(bins[-1]))
    hi = torch.searchsorted(bins, v).clamp(max=len(bins) - 1)
    lo = (hi - 1).clamp(min=0)
    return torch.where((v - bins[lo]).abs() <= (bins[hi] - v).abs(), lo, hi)


def tile_code(index: Tensor) -> Tensor:
    """Sinusoidal code ``[..., 2 F]`` of tile indices (Transformer position encoding, Vaswani et al. Sec. 3.5).

    .. math:: c(a)_{2f} = \\sin(a / 2^{f}),\\quad c(a)_{2f+1} = \\cos(a / 2^{f}),\\quad f = 0..F-1
    """
    freqs = 2.0 ** -torch.arange(TILE_FREQS, dtype=torch.float32, device=index.device)
    ang = index.float().unsqueeze(-1) * freqs
    return torch.stack([ang.sin(), ang.cos()], -1).flatten(-2)


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
    _dense: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

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

    def dense(self) -> tuple[Tensor, Tensor]:
        """All rows ``[N, N]`` (``uint8``), computed once and kept: small graphs are attended densely every step."""
        if self._dense is None:
            if self.far > 255:
                raise ValueError(f"distance buckets up to {self.far} do not fit uint8; lower sp_cutoff")
            fw, bw = self.rows(0, self.n)
            self._dense = (fw.to(torch.uint8), bw.to(torch.uint8))
        return self._dense

    def pairs(self, buckets: int) -> Tensor:
        """``[N^2]`` pair buckets ``buckets * d(i -> j) + d(j -> i)`` (row-major), from :meth:`dense`."""
        fw, bw = self.dense()
        return (fw.long() * buckets + bw.long()).flatten()

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
DENSE_NODES = 1024  # graphs up to this size keep their dense distances and are attended in one call


class GraphormerLayer(nn.Module):
    """Pre-norm Graphormer layer with shortest-path attention bias (GHN-3 Eq. 2, Graphormer Eq. 6).

    .. math::
        A_{ij} = \\frac{(h_i W_Q)(h_j W_K)^\\top}{\\sqrt{d}}
                 + b^{fw}_{\\phi(i \\to j)} + b^{bw}_{\\phi(j \\to i)}

    where :math:`\\phi` is the (clipped) shortest-path distance; then ``h += softmax(A) V W_O`` and
    ``h += MLP(LN(h))``. Attention is exact and full (every node attends to every node of its graph), per
    graph: small graphs in one call with a cached dense bias, large ones per block of query rows with the bias
    built from :class:`DistanceBias`: no ``[N, N]`` tensor is materialised, so a 3,500-node ResNet-998 graph
    needs ``O(block * N)`` memory.
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

    def forward(
        self,
        h: Tensor,
        biases: list[DistanceBias],
        pairs: list[Tensor | None] | None = None,
        *,
        block: int = ATTN_BLOCK,
    ) -> Tensor:
        """``h [sum N_g, hid]``: the nodes of all graphs, concatenated in the order of ``biases``.

        ``pairs[g]``: for a small graph, its ``[N^2]`` pair buckets ``B d(i -> j) + d(j -> i)`` into the table
        ``b^{fw}[u] + b^{bw}[v]`` of all ``B^2`` pairs (:meth:`DistanceBias.pairs`): its whole bias is one
        row gather, whose backward is one ``index_add_`` (``nn.Embedding``'s dense backward sorts the indices
        and was 20x slower on CPU here), and attention is ``baddbmm``, softmax, ``bmm``: SDPA's CPU path for a
        float mask adds a "safe softmax" (``isneginf``, ``all``, ``where`` over every score) that cost as much
        as the softmax. Graphs get one call each: padding several into one batch was slower, as the softmax,
        not the call, dominates. ``None``: blocks of query rows from the sparse distances.
        """
        n_all, d = h.shape
        if n_all != sum(b.n for b in biases):
            raise ValueError(f"h has {n_all} nodes but the graphs have {sum(b.n for b in biases)}")
        pairs = pairs if pairs is not None else [None] * len(biases)
        heads, dh = self.heads, d // self.heads
        q, k, v = self.qkv(self.ln1(h)).reshape(n_all, 3, heads, dh).permute(1, 2, 0, 3)
        table = (self.sp_fw.weight[:, None, :] + self.sp_bw.weight[None, :, :]).flatten(0, 1)  # [B^2, heads]
        parts: list[Tensor] = []
        start = 0
        for bias, pair in zip(biases, pairs, strict=True):
            qg, kg, vg = (t[:, start : start + bias.n] for t in (q, k, v))
            if pair is not None:
                mask = table.index_select(0, pair).t().view(heads, bias.n, bias.n)
                att = torch.baddbmm(mask, qg, kg.transpose(1, 2), alpha=dh**-0.5).softmax(-1)
                parts.append(torch.bmm(att, vg))
            else:
                for r0 in range(0, bias.n, block):
                    r1 = min(bias.n, r0 + block)
                    fw, bw = bias.rows(r0, r1)
                    mask = (self.sp_fw(fw) + self.sp_bw(bw)).permute(2, 0, 1)  # [heads, rows, N]
                    parts.append(F.scaled_dot_product_attention(qg[:, r0:r1], kg, vg, attn_mask=mask))
            start += bias.n
        att = torch.cat(parts, 1).transpose(0, 1).reshape(n_all, d)
        h = h + self.proj(att)
        return h + self.mlp(self.ln2(h))


class ConvDecoder(nn.Module):
    """GHN-2/GHN-3 convolutional decoder: node embedding -> ``[out, in, k, k]`` tile (GHN-2 Sec. 4).

    .. math::
        z = \\mathrm{ReLU}(W_0 e + b_0) \\in \\mathbb{R}^{h_0 \\times k \\times k},\\quad
        T = W_2\\,\\mathrm{ReLU}(W_1 z) \\in \\mathbb{R}^{(o \\cdot i) \\times k \\times k}

    (``W_1``, ``W_2`` are 1x1 convolutions, i.e. per-position linear maps). A tile only needs the centre
    ``kh x kw`` positions of ``z`` and the ``o x i`` corner of ``T``; :meth:`forward` decodes all tiles of a
    meta-batch at once: ``W_0`` once per kernel size (its rows for those positions), ``W_1`` once, and ``W_2``
    once per input width ``i`` (all ``co`` output rows: slicing ``o`` as well would mean one weight copy per
    ``(o, i)`` pair, ~38 MB per meta-batch, and that gather and its backward cost more than the spare rows).
    GHN-2's dedicated classifier predictor maps the ``out`` axis of a 1x1 tile to the class count:
    ``W_c\\,\\mathrm{ReLU}(T)`` (:meth:`classify`).
    """

    def __init__(self, hid: int, dec_hid: tuple[int, int], chunk: tuple[int, int, int, int], classes: int) -> None:
        super().__init__()
        h0, h1 = dec_hid
        self.co, self.ci, self.k, _ = chunk
        self.h0 = h0
        self.fc = nn.Linear(hid, h0 * self.k * self.k)
        self.conv1 = nn.Linear(h0, h1)
        self.out = nn.Linear(h1, self.co * self.ci)
        # unit-variance raw outputs at init (fan-in normalisation then gives He-like tensors), no shared bias
        nn.init.normal_(self.out.weight, std=1.0 / math.sqrt(h1 * 0.5))
        nn.init.zeros_(self.out.bias)
        self.classifier = nn.Linear(self.co, classes) if classes > 0 else None

    def forward(self, e: Tensor, kernels: list[tuple[int, int]], widths: list[int]) -> list[Tensor]:
        """Decoded tiles for tile embeddings ``e [T, hid]``: tile ``t`` is ``kernels[t]`` positions by
        ``widths[t]`` inputs; tiles of one width must be consecutive.

        Returns one ``[rows, co, i]`` per run of width ``i``: the run's tiles' positions in order (row-major
        within a tile), each row ``T[:, :i, y, x]``. ``W_0``'s rows are gathered per kernel size (a 1x1 tile
        needs 1 of the ``k^2`` positions) and the rows reordered from kernel-size to width order in one gather.
        """
        dev, k, h0 = e.device, self.k, self.h0
        by_kernel: dict[tuple[int, int], list[int]] = {}
        for t, kt in enumerate(kernels):
            by_kernel.setdefault(kt, []).append(t)
        pos = {
            kt: [(y + (k - kt[0]) // 2) * k + x + (k - kt[1]) // 2 for y in range(kt[0]) for x in range(kt[1])]
            for kt in by_kernel
        }  # centre positions of the k x k grid, row-major
        fc_rows = [torch.tensor([c * k * k + p for c in range(h0) for p in pos[kt]], device=dev) for kt in by_kernel]
        idx = torch.cat(fc_rows)
        fcw = self.fc.weight.index_select(0, idx).split([len(r) for r in fc_rows])
        fcb = self.fc.bias.index_select(0, idx).split([len(r) for r in fc_rows])
        zs, order = [], []  # z rows per kernel size, and which (tile, position) each row is
        for (kt, ts), w, b in zip(by_kernel.items(), fcw, fcb, strict=True):
            p = len(pos[kt])
            zs.append(
                torch.relu(F.linear(e.index_select(0, torch.tensor(ts, device=dev)), w, b))
                .view(len(ts), h0, p)
                .transpose(1, 2)
            )
            order += [(t, q) for t in ts for q in range(p)]
        row = {tq: r for r, tq in enumerate(order)}
        by_width = [row[(t, q)] for t, kt in enumerate(kernels) for q in range(kt[0] * kt[1])]
        z = torch.cat([z.reshape(-1, h0) for z in zs]).index_select(0, torch.tensor(by_width, device=dev))
        z = torch.relu(self.conv1(z))  # [R, h1]
        runs: dict[int, int] = {}  # width -> rows
        for kt, i in zip(kernels, widths, strict=True):
            runs[i] = runs.get(i, 0) + kt[0] * kt[1]
        narrow = [i for i in runs if i < self.ci]
        if narrow:  # the rows of every narrow width in one gather (its backward is one index_add_)
            rows = [
                (torch.arange(self.co, device=dev)[:, None] * self.ci + torch.arange(i, device=dev)).flatten()
                for i in narrow
            ]
            idx = torch.cat(rows)
            ws = iter(self.out.weight.index_select(0, idx).split([len(r) for r in rows]))
            bs = iter(self.out.bias.index_select(0, idx).split([len(r) for r in rows]))
        out = []
        for i, zi in zip(runs, z.split(list(runs.values())), strict=True):
            w, b = (next(ws), next(bs)) if i < self.ci else (self.out.weight, self.out.bias)
            out.append(F.linear(zi, w, b).view(len(zi), self.co, i))
        return out

    def classify(self, t: Tensor) -> Tensor:
        """Classifier tiles ``[R, classes, i]`` from 1x1 tiles ``t [R, co, i]``."""
        if self.classifier is None:
            raise ValueError("this GHN has no classifier predictor (no DatasetInfo)")
        return self.classifier(torch.relu(t).transpose(1, 2)).transpose(1, 2)


@dataclass
class ParamJob:
    """How one parameter node is decoded: its route, target shape and tile grid.

    Routes: ``"nd"`` (conv/linear/other >= 2-D tensors, viewed as ``[o, i, kh, kw]``), ``"1d"``,
    ``"cls"`` (the classifier weight ``[classes, features]``) and ``"cls_b"`` (its bias).
    """

    node: int
    name: str
    shape: tuple[int, ...]
    ptype: PrimType
    route: str
    is_last: bool
    view: tuple[int, int, int, int] = (1, 1, 1, 1)  # (o, i, kh, kw) the tensor is decoded as
    scale: float = 1.0  # depth scaling of residual branch outputs (:func:`residual_branch_ends`)
    squash: str = "linear"  # the tensor is ``factor * squash(w)``: :func:`norm_rule` and ``scale`` ...
    factor: float = 1.0  # ... (the rule's factor times ``scale``)


@dataclass
class PreparedGraph:
    """A graph's GHN inputs computed once (meta-training reuses them every step its architecture is drawn)."""

    graph: Graph
    feats: dict[str, Tensor]
    bias: DistanceBias
    jobs: list[ParamJob] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.graph.num_nodes


class GHN(nn.Module):
    """Graph HyperNetwork: ``graph -> {parameter name: predicted tensor}`` in one forward pass.

    Node features (GHN-3 Eq. 1, Graphormer's centrality encoding, GHN-2's shape encoder):

    .. math::
        h_i^{(0)} = E_{type}[t_i] + [E^{(1)}_{s}[b(s_{i1})] \\,\\|\\, \\dots \\,\\|\\, E^{(4)}_{s}[b(s_{i4})]]
                    + E_{in}[\\deg^-_i] + E_{out}[\\deg^+_i] + E_{dist}[d(\\text{input} \\to i)]

    (``b`` = :func:`shape_bucket`, ``||`` = concatenation of four ``hid/4`` embeddings), then ``layers``
    :class:`GraphormerLayer` s, a final LayerNorm, and the decoders. A tensor larger than one tile is
    decoded tile by tile from ``h_i + P [c(a) || c(b)]`` (``c`` = :func:`tile_code` of the tile's out/in
    position, ``P`` learned), so its tiles differ.
    """

    def __init__(self, config: GHNConfig, dataset: DatasetInfo | None = None) -> None:
        super().__init__()
        self.config = config
        self.dataset = dataset  # configuration (saved in checkpoints), not training state
        c = config
        if c.hid % 4:
            raise ValueError(f"hid {c.hid} must be divisible by 4 (four shape embeddings of hid/4)")
        self.type_embed = nn.Embedding(NUM_TYPES, c.hid)
        self.shape_embed = nn.ModuleList([nn.Embedding(SHAPE_BUCKETS, c.hid // 4) for _ in range(4)])
        self.deg_in = nn.Embedding(c.max_degree + 1, c.hid)
        self.deg_out = nn.Embedding(c.max_degree + 1, c.hid)
        self.input_dist = nn.Embedding(c.max_input_dist + 2, c.hid)
        for emb in [self.type_embed, self.deg_in, self.deg_out, self.input_dist]:
            nn.init.normal_(emb.weight, std=0.02 * math.sqrt(c.hid) / math.sqrt(8))
        for emb in self.shape_embed:  # concatenated, not summed: unit-ish scale per slice
            nn.init.normal_(emb.weight, std=0.5)
        self.layers = nn.ModuleList([GraphormerLayer(c.hid, c.heads, c.sp_cutoff + 2) for _ in range(c.layers)])
        self.ln = nn.LayerNorm(c.hid)
        classes = dataset.num_classes if dataset is not None else 0
        self.decoder = ConvDecoder(c.hid, c.dec_hid, c.chunk, classes)
        self.tile_proj = nn.Linear(4 * TILE_FREQS, c.hid, bias=False)
        nn.init.normal_(self.tile_proj.weight, std=0.5)
        self.decoder_1d = nn.Sequential(nn.Linear(c.hid, c.dec_hid[0]), nn.GELU(), nn.Linear(c.dec_hid[0], c.chunk_1d))
        nn.init.normal_(self.decoder_1d[-1].weight, std=1.0 / math.sqrt(c.dec_hid[0] * 0.25))
        nn.init.zeros_(self.decoder_1d[-1].bias)
        self.class_bias = nn.Linear(c.hid, classes) if classes else None
        # learnable log-gain per node type on predicted weights: output scales (e.g. of logits) adapt fast
        self.log_gain = nn.Parameter(torch.zeros(NUM_TYPES))

    # ----------------------------------------------------------------------------------------------------
    def prepare(self, graph: Graph | PreparedGraph) -> PreparedGraph:
        """Everything the GHN needs from ``graph`` that does not depend on its weights (cacheable)."""
        if isinstance(graph, PreparedGraph):
            return graph
        c = self.config
        dev = self.type_embed.weight.device
        deg_in, deg_out = graph.degrees()
        in_dist = graph.input_dist.clone()
        in_dist[in_dist < 0] = c.max_input_dist + 1
        feats = {
            "types": graph.node_types,
            "shapes": shape_bucket(graph.node_shapes),
            "deg_in": deg_in.clamp(max=c.max_degree),
            "deg_out": deg_out.clamp(max=c.max_degree),
            "in_dist": in_dist.clamp(max=c.max_input_dist + 1),
        }
        feats = {k: v.to(dev) for k, v in feats.items()}
        bias = DistanceBias.from_graph(graph, c.sp_cutoff + 1, dev, use_distances=c.graph_info)
        return PreparedGraph(graph, feats, bias, self._plan(graph))

    def _plan(self, g: Graph) -> list[ParamJob]:
        last = last_layer_nodes(g)
        ends, n_sums = residual_branch_ends(g)
        res_scale = min(1.0, math.sqrt(FREE_SUMS / max(1, n_sums)))
        classes = self.dataset.num_classes if self.dataset is not None else -1
        jobs = []
        for ni, pname in enumerate(g.param_names):
            if pname is None:
                continue
            shape = tuple(int(v) for v in g.node_shapes[ni] if v > 0)
            ptype = _TYPES[int(g.node_types[ni])]
            is_last = ni in last
            if len(shape) <= 1:
                route = "cls_b" if is_last and ptype is PrimType.BIAS and shape == (classes,) else "1d"
                view = (shape[0] if shape else 1, 1, 1, 1)
            else:
                if ptype in _CONV_TYPES and len(shape) in (3, 4):
                    o, i, *ks = shape
                    view = (o, i, *((1, ks[0]) if len(ks) == 1 else ks))
                else:
                    view = (math.prod(shape[:-1]), shape[-1], 1, 1)
                cls = is_last and ptype in _WEIGHT_TYPES and view[0] == classes and view[2:] == (1, 1)
                route = "cls" if cls else "nd"
            scale = res_scale if ni in ends and not is_last else 1.0
            squash, factor = norm_rule(ptype, shape, is_last=is_last)
            jobs.append(ParamJob(ni, pname, shape, ptype, route, is_last, view, scale, squash, factor * scale))
        return jobs

    def node_features(self, graph: Graph | PreparedGraph) -> tuple[Tensor, DistanceBias]:
        """Initial embeddings ``[N, hid]`` and the sparse attention distances of one graph."""
        p = self.prepare(graph)
        f = p.feats
        h = torch.cat([emb(f["shapes"][:, k]) for k, emb in enumerate(self.shape_embed)], 1)
        if self.config.graph_info:
            h = (
                h
                + self.type_embed(f["types"])
                + self.deg_in(f["deg_in"])
                + self.deg_out(f["deg_out"])
                + self.input_dist(f["in_dist"])
            )
        else:  # ablation: no types, degrees or distances, only parameter shapes
            h = h + self.type_embed(torch.full_like(f["types"], PrimType.MASK.id))
        return h, p.bias

    def embed(self, graphs: list[Graph] | list[PreparedGraph]) -> list[Tensor]:
        """Node embeddings ``[N_g, hid]`` of each graph after the Graphormer layers.

        The graphs' nodes are concatenated (no padding); attention stays within each graph. Graphs of at most
        :data:`DENSE_NODES` nodes are attended in one call each, with their dense distances kept.
        """
        prepared = [self.prepare(g) for g in graphs]
        feats = [self.node_features(p) for p in prepared]
        h = torch.cat([f[0] for f in feats])
        biases = [f[1] for f in feats]
        buckets = self.config.sp_cutoff + 2
        pairs = [b.pairs(buckets) if b.n <= DENSE_NODES else None for b in biases]
        for layer in self.layers:
            h = layer(h, biases, pairs)
        return list(self.ln(h).split([p.n for p in prepared]))

    def forward(self, graphs: Graph | PreparedGraph | list) -> list[dict[str, Tensor]]:
        """Predict every supported parameter of each graph's network.

        Returns:
            one ``{parameter name: tensor}`` dict per graph (gradients flow back to the GHN).
        """
        if isinstance(graphs, (Graph, PreparedGraph)):
            graphs = [graphs]
        out: list[dict[str, Tensor]] = [{} for _ in graphs]
        for gi, name, w in self.iter_predictions(graphs):
            out[gi][name] = w
        return out

    def iter_predictions(
        self, graphs: list[Graph] | list[PreparedGraph], *, decode_batch: int = 1024
    ) -> Iterator[tuple[int, str, Tensor]]:
        """Yield ``(graph index, parameter name, tensor)`` one tensor at a time.

        Tensors are decoded in groups of about ``decode_batch`` tiles; within a group, tiles of one size are
        decoded in one call. A consumer that writes each tensor into its model straight away (as
        :func:`~quicktrain.ghn.predict_into` does) never holds more than one group of predictions, which keeps
        huge models within memory.
        """
        prepared = [self.prepare(g) for g in graphs]
        h = torch.cat(self.embed(prepared))
        offsets = [0]
        for p in prepared[:-1]:
            offsets.append(offsets[-1] + p.n)
        embs = (h, offsets)
        group: list[tuple[int, ParamJob]] = []
        tiles = 0
        for gi, p in enumerate(prepared):
            for job in p.jobs:
                group.append((gi, job))
                tiles += math.prod(self._grid(job))
                if tiles >= decode_batch:
                    yield from self._decode_group(embs, group)
                    group, tiles = [], 0
        if group:
            yield from self._decode_group(embs, group)

    def _grid(self, job: ParamJob) -> tuple[int, int]:
        """Distinct tiles along out and in (at most ``tile_limit`` each)."""
        c = self.config
        lim = c.tile_limit
        o, i = job.view[:2]
        if job.route == "1d":
            return min(lim, math.ceil(o / c.chunk_1d)), 1
        if job.route == "cls_b":
            return 1, 1
        co, ci = c.chunk[:2]
        return (1 if job.route == "cls" else min(lim, math.ceil(o / co))), min(lim, math.ceil(i / ci))

    def _decode_group(
        self, embs: tuple[Tensor, list[int]], group: list[tuple[int, ParamJob]]
    ) -> Iterator[tuple[int, str, Tensor]]:
        """Decode ``group``'s tensors (``embs``: all graphs' node embeddings and graph offsets) all at once.

        Each route is one decoder call for the whole group (the conv decoder: one ``W_2`` product per input
        width), normalised row by row (:meth:`_normalize`), then cut into tiles with ``split``/``unbind``:
        one backward op each, where indexing per tile would give every tile a full-size zero-filled gradient.
        A tensor is assembled from views of its tiles. Tiles of one input width are kept together, classifier
        tiles last within their width, so the decoder's runs are contiguous.
        """
        h, offsets = embs
        c = self.config
        co, ci, k, _ = c.chunk
        dev, lim = h.device, c.tile_limit
        conv: list[tuple[int, int, int, int, int, int, int]] = []  # (j, a, b, o, i, kh, kw) per conv tile
        vec: list[tuple[int, int]] = []  # (j, a) of each 1-D tile
        cls_b: list[int] = []
        for j, (_, job) in enumerate(group):
            ga, gb = self._grid(job)
            o, i, kh, kw = job.view
            if job.route == "1d":
                vec += [(j, a) for a in range(ga)]
            elif job.route == "cls_b":
                cls_b.append(j)
            else:
                ob, ib = min(o, ga * co), min(i, gb * ci)
                kt = (1, 1) if job.route == "cls" else (min(kh, k), min(kw, k))
                conv += [
                    (j, a, b, min(co, ob - a * co), min(ci, ib - b * ci), *kt) for a in range(ga) for b in range(gb)
                ]
        conv.sort(key=lambda t: (t[4], group[t[0]][1].route == "cls"))

        def nodes(js: list[int]) -> Tensor:
            return h.index_select(0, torch.tensor([offsets[group[j][0]] + group[j][1].node for j in js], device=dev))

        grid = torch.stack(torch.meshgrid(torch.arange(lim), torch.arange(lim), indexing="ij"), -1).view(-1, 2)
        codes = self.tile_proj(tile_code(grid.to(dev)).flatten(1).to(h.dtype))  # [lim^2, hid]: tile (a, b) at a lim + b
        tiles: dict[int, dict[tuple[int, int], Tensor]] = {j: {} for j in range(len(group))}
        if conv:
            e = nodes([t[0] for t in conv]) + codes[torch.tensor([a * lim + b for _, a, b, *_ in conv], device=dev)]
            runs: dict[int, list[int]] = {}  # input width -> conv tiles
            for t, tile in enumerate(conv):
                runs.setdefault(tile[4], []).append(t)
            outs = self.decoder(e, [(kh, kw) for *_, kh, kw in conv], [t[4] for t in conv])
            size = [kh * kw for *_, kh, kw in conv]
            for ts, out in zip(runs.values(), outs, strict=True):
                nd = [t for t in ts if group[conv[t][0]][1].route != "cls"]
                n_nd = sum(size[t] for t in nd)
                plain, head = out.split([n_nd, len(out) - n_nd])
                if nd:
                    jobs = [group[conv[t][0]][1] for t in nd for _ in range(size[t])]
                    for t, w in zip(nd, self._normalize(plain, jobs).split([size[t] for t in nd]), strict=True):
                        j, a, b, o, i, kh, kw = conv[t]
                        # [o, i, kh, kw] in channels-last memory: what the predicted convolutions run in
                        w = w[:, :o].transpose(0, 1).reshape(o, kh, kw, i).permute(0, 3, 1, 2)
                        tiles[j][(a, b)] = w
                if len(head):
                    cls = ts[len(nd) :]
                    head = self._normalize(self.decoder.classify(head), [group[conv[t][0]][1] for t in cls])
                    for t, w in zip(cls, head.unbind(0), strict=True):
                        tiles[conv[t][0]][(conv[t][1], conv[t][2])] = w
        if vec:
            codes_1d = codes[torch.tensor([a * lim for _, a in vec], device=dev)]
            out = self._normalize(self.decoder_1d(nodes([j for j, _ in vec]) + codes_1d), [group[j][1] for j, _ in vec])
            for (j, a), w in zip(vec, out.unbind(0), strict=True):
                ob = min(group[j][1].view[0], self._grid(group[j][1])[0] * c.chunk_1d)  # decoded length
                tiles[j][(a, 0)] = w[: min(c.chunk_1d, ob - a * c.chunk_1d)]
        if cls_b:
            if self.class_bias is None:
                raise ValueError("this GHN has no classifier predictor (no DatasetInfo)")
            out = self._normalize(self.class_bias(nodes(cls_b)), [group[j][1] for j in cls_b])
            for j, w in zip(cls_b, out.unbind(0), strict=True):
                tiles[j][(0, 0)] = w
        for j, (gi, job) in enumerate(group):
            yield gi, job.name, self._assemble(job, tiles[j])

    def _normalize(self, y: Tensor, jobs: list[ParamJob]) -> Tensor:
        """:func:`normalize_param`, the residual depth scale and the learned type gain (tensors of >= 2 dims) of
        each row's tensor, applied to decoded rows ``y [R, ...]`` (``jobs[r]``: row ``r``'s tensor).

        All three are elementwise, so they commute with assembling tiles (repeats; kernels are zero-padded
        only in ``"linear"`` tensors, where ``0`` stays ``0``) and are applied to whole decoder outputs.
        """
        view = (-1,) + (1,) * (y.dim() - 1)
        kinds = [job.squash for job in jobs]
        out = None
        for kind in dict.fromkeys(kinds):
            v = _SQUASH[kind](y)
            if out is None:
                out = v
            else:
                out = torch.where(torch.tensor([q == kind for q in kinds], device=y.device).view(view), v, out)
        gain = torch.cat([self.log_gain, self.log_gain.new_zeros(1)])  # index NUM_TYPES: no gain
        idx = torch.tensor([job.ptype.id if len(job.shape) >= 2 else NUM_TYPES for job in jobs], device=y.device)
        coef = torch.tensor([job.factor for job in jobs], dtype=y.dtype, device=y.device) * gain[idx].exp()
        return out * coef.view(view)

    def _assemble(self, job: ParamJob, tiles: dict[tuple[int, int], Tensor]) -> Tensor:
        """Concatenate a tensor's tiles, repeat the block beyond ``tile_limit`` tiles, fit kernel and shape."""
        ga, gb = self._grid(job)
        o, i, kh, kw = job.view
        if job.route in ("1d", "cls_b"):
            w = torch.cat([tiles[(a, 0)] for a in range(ga)]) if ga > 1 else tiles[(0, 0)]
            return _repeat_to(w, (o,)).reshape(job.shape)
        rows = [torch.cat([tiles[(a, b)] for b in range(gb)], 1) if gb > 1 else tiles[(a, 0)] for a in range(ga)]
        w = torch.cat(rows, 0) if ga > 1 else rows[0]
        if job.route == "cls":
            w = w.unsqueeze(-1).unsqueeze(-1)
        w = _repeat_to(w, (o, i, *w.shape[2:]))
        w = _fit_dim(_fit_dim(w, 2, kh), 3, kw)
        return w.reshape(job.shape)


FREE_SUMS = 8  # residual sums a network may have before its branch outputs are scaled down


def residual_branch_ends(g: Graph) -> tuple[set[int], int]:
    """Weight/norm nodes whose output enters a sum (directly or through their bias node, which is included),
    and the number of sum nodes.

    A predicted network with ``S`` residual sums of similar branches adds ``S`` nearly equal terms: its
    activations grow like ``S`` (the predicted ResNet-998 started at loss 71). Like Fixup (Zhang et al., 2019)
    and SkipInit (De & Smith, 2020), which down-weight residual branches with depth, the GHN multiplies the
    last weight or norm scale of every branch by

    .. math:: \\min\\big(1, \\sqrt{S_0 / S}\\big),\\qquad S_0 = 8,

    so that the variance of the residual stream grows like ``S_0`` instead of ``S``; networks with up to
    ``S_0`` sums (most of the meta-training space) are unchanged.
    """
    n = g.num_nodes
    types = g.node_types.tolist()
    sum_id, bias_id = PrimType.SUM.id, PrimType.BIAS.id
    succ: list[list[int]] = [[] for _ in range(n)]
    for a, b in g.edges.t().tolist():
        succ[a].append(b)
    sums = {i for i in range(n) if types[i] == sum_id}
    scalable = {t.id for t in _NORM_TYPES | _WEIGHT_TYPES}
    ends = set()
    for u in range(n):
        if types[u] not in scalable:
            continue
        for v in succ[u]:
            if v in sums:
                ends.add(u)
            elif types[v] == bias_id and len(succ[v]) == 1 and succ[v][0] in sums:
                ends.update((u, v))  # the branch's bias is part of its output
    return ends, len(sums)


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


def _repeat_to(x: Tensor, size: tuple[int, ...]) -> Tensor:
    if tuple(x.shape) == tuple(size):  # no slicing op: its backward would allocate a zero-filled copy
        return x
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


def norm_rule(ptype: PrimType, shape: tuple[int, ...], *, is_last: bool = False) -> tuple[str, float]:
    """``(squash, factor)`` of the fan-in-aware normalisation of a predicted tensor of ``shape``:
    ``W <- factor * squash(W)`` (GHN-2 Sec. 4, operation-dependent normalisation).

    .. math::
        W \\leftarrow W \\sqrt{\\beta / \\text{fan\\_in}},\\qquad
        \\text{fan\\_in} = \\prod_{k \\ge 1} s_k,\\quad
        \\beta = 2 \\text{ (ReLU follows)},\\ 1 \\text{ (depthwise conv, classifier)}

    norm weights :math:`\\gamma = 2\\,\\sigma(\\gamma/2) \\in (0, 2)`,
    biases :math:`b = \\tanh(b / 5) \\in (-1, 1)`.
    Other parameters (position tables, class tokens, scales): ``W / sqrt(shape[-1])``.
    """
    if ptype in _WEIGHT_TYPES and len(shape) >= 2:
        beta = 1.0 if (is_last or ptype is PrimType.CONV_DW) else 2.0
        return "linear", math.sqrt(beta / math.prod(shape[1:]))
    if ptype in _NORM_TYPES or (ptype is PrimType.SCALE and len(shape) <= 1):
        return "sigmoid", 2.0
    if len(shape) <= 1:
        return "tanh", 1.0
    return "linear", 1.0 / math.sqrt(shape[-1])


_SQUASH = {"linear": lambda w: w, "sigmoid": lambda w: torch.sigmoid(0.5 * w), "tanh": lambda w: torch.tanh(0.2 * w)}


def normalize_param(w: Tensor, ptype: PrimType, *, is_last: bool = False) -> Tensor:
    """``w`` normalised by :func:`norm_rule` (the decoder applies the same rule to whole decoded rows)."""
    squash, factor = norm_rule(ptype, tuple(w.shape), is_last=is_last)
    return factor * _SQUASH[squash](w)


def predicted_param_regularizer(params: list[dict[str, Tensor]]) -> Tensor:
    """GHN-3's regulariser on predicted parameters (GHN-3 Sec. 4, ``predparam_wd``, used with λ = 3e-5).

    .. math::
        R = \\frac{1}{M} \\sum_{m=1}^{M} \\sum_{W \\in \\theta_m} \\lVert W \\rVert_F

    averaged over the ``M`` networks of a meta-batch; the meta-loss adds ``λ R``.
    """
    norms = [torch.stack(torch._foreach_norm(list(p.values()))).sum() for p in params if p]  # one op per network
    if not norms:
        raise ValueError("no predicted parameters to regularise")
    return torch.stack(norms).mean()


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
    "residual_branch_ends",
    "norm_rule",
    "normalize_param",
    "predicted_param_regularizer",
    "tile_code",
    "ConvDecoder",
    "PreparedGraph",
    "ParamJob",
]
