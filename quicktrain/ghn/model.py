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

import numpy as np
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
        sizes = [b.n for b in biases]  # split, not slices: one backward op each, not a zero-filled copy per graph
        for bias, pair, qg, kg, vg in zip(
            biases, pairs, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), strict=True
        ):
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
        att = torch.cat(parts, 1).transpose(0, 1).reshape(n_all, d)
        h = h + self.proj(att)
        return h + self.mlp(self.ln2(h))


class _PrefixLinear(torch.autograd.Function):
    """Linear maps with prefixes of one weight: run ``r`` of the rows of ``z`` (``rows[r]`` rows) gives
    ``z_r W[:n_r]^T + b[:n_r]``, ``n_r = lengths[r]``.

    One op, forward and backward: slicing ``W`` per run would give each run a weight gradient of ``W``'s full
    size (zero-filled, then added), and gathering its rows per run would copy them; here the runs' weight gradients are
    accumulated into one buffer, ``dW[:n_r] += g_r^T z_r``. Consecutive runs of one length share one product.
    """

    @staticmethod
    def forward(
        ctx, z: Tensor, weight: Tensor, bias: Tensor, rows: list[int], lengths: list[int]
    ) -> tuple[Tensor, ...]:
        ctx.save_for_backward(z, weight)
        ctx.rows, ctx.lengths = rows, lengths
        outs: list[Tensor] = []
        for zs, n, sizes in _prefix_groups(z, rows, lengths):
            outs += torch.addmm(bias[:n], zs, weight[:n].t()).split(sizes)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        z, weight = ctx.saved_tensors
        gz, gw, gb = torch.empty_like(z), torch.zeros_like(weight), weight.new_zeros(weight.shape[0])
        at, r0 = 0, 0
        for zs, n, sizes in _prefix_groups(z, ctx.rows, ctx.lengths):
            g = [
                t if t is not None else z.new_zeros(m, n)
                for t, m in zip(grads[at : at + len(sizes)], sizes, strict=True)
            ]
            g = g[0] if len(g) == 1 else torch.cat(g)
            torch.mm(g, weight[:n], out=gz[r0 : r0 + len(zs)])
            gw[:n].addmm_(g.t(), zs)
            gb[:n] += g.sum(0)
            at, r0 = at + len(sizes), r0 + len(zs)
        return gz, gw, gb, None, None


def _prefix_groups(z: Tensor, rows: list[int], lengths: list[int]) -> Iterator[tuple[Tensor, int, list[int]]]:
    """``(rows of z, prefix length, run sizes)`` for each group of consecutive runs of one prefix length."""
    r0, r = 0, 0
    while r < len(rows):
        end = r
        while end + 1 < len(rows) and lengths[end + 1] == lengths[r]:
            end += 1
        sizes = rows[r : end + 1]
        yield z[r0 : r0 + sum(sizes)], lengths[r], sizes
        r0 += sum(sizes)
        r = end + 1


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
    The outputs a tile needs are a prefix of ``W_2``'s rows reordered: input-major (all ``co`` outputs of the
    first ``i`` inputs) or in shell order (the ``m x m`` corner, ``m = max(o, i)``), whichever is shorter
    (:meth:`row_layout`); on the meta-training pool that computes 29% fewer outputs than input-major alone.
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
        # W_2's outputs (c, d) in "shell" order (by max(c, d)): the o x i corner of a tile is within the first
        # min(m, co) * min(m, ci) of them, m = max(o, i)
        c, d = np.meshgrid(np.arange(self.co), np.arange(self.ci), indexing="ij")
        self._shell_rows = np.lexsort((c.ravel(), d.ravel(), np.maximum(c, d).ravel()))  # row c * ci + d of W_2
        self._shell_pos = np.empty(self.co * self.ci, dtype=np.int64)
        self._shell_pos[self._shell_rows] = np.arange(self.co * self.ci)

    def row_layout(self, o: int, i: int) -> tuple[int, int]:
        """``(layout, row length)`` of a tile's decoded rows for its ``o x i`` corner: input-major (``0``,
        ``co * i`` outputs: all ``co`` outputs of the first ``i`` inputs) or shell order (``1``), whichever
        computes fewer outputs; a ``16 x 16`` corner needs 256 outputs in shell order, 1,024 input-major."""
        m = max(o, i)
        shell = min(m, self.co) * min(m, self.ci)
        return (1, shell) if shell < self.co * i else (0, self.co * i)

    def row_position(self, layout: int, c: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Position of output ``c``, input ``d`` within a decoded row of ``layout`` (:meth:`row_layout`)."""
        return d * self.co + c if layout == 0 else self._shell_pos[c * self.ci + d]

    def forward(
        self, e: Tensor, kernels: np.ndarray, layout: np.ndarray, length: np.ndarray, kind: np.ndarray
    ) -> list[Tensor]:
        """Decoded tiles for tile embeddings ``e [T, hid]``: tile ``t`` is ``kernels[t] = (kh, kw)`` positions, each
        a row of the first ``length[t]`` outputs of ``T[:, :, y, x]`` in ``layout[t]`` (:meth:`row_layout`);
        tiles of one layout are consecutive, input-major ones first.

        Returns one ``[rows, length]`` per run of consecutive tiles of one ``(layout, length, kind)`` (the rows: the
        run's tiles' positions in order, row-major within a tile). ``W_0``'s rows are gathered per kernel size
        (a 1x1 tile needs 1 of the ``k^2`` positions) and the rows reordered from kernel-size to run order in
        one gather; ``W_2``'s rows for a run are a prefix of ``W_2`` reordered input-major or into shell order
        (:class:`_PrefixLinear`: no gather of weight rows per run). The index arithmetic is numpy over tiles:
        no Python loop over tiles or rows.
        """
        dev, k, h0 = e.device, self.k, self.h0
        kernels, layout, length = np.asarray(kernels).reshape(-1, 2), np.asarray(layout), np.asarray(length)
        kind = np.asarray(kind)
        sizes = kernels[:, 0] * kernels[:, 1]
        first = np.empty(len(kernels), dtype=np.int64)  # each tile's first row in kernel-size order
        fc_rows, groups, done = [], [], 0
        for kh, kw in np.unique(kernels, axis=0).tolist():
            ts = np.flatnonzero((kernels[:, 0] == kh) & (kernels[:, 1] == kw))
            ys, xs = np.arange(kh) + (k - kh) // 2, np.arange(kw) + (k - kw) // 2
            pos = (ys[:, None] * k + xs).ravel()  # centre positions of the k x k grid, row-major
            fc_rows.append((np.arange(h0)[:, None] * (k * k) + pos).ravel())
            groups.append((ts, len(pos)))
            first[ts] = done + np.arange(len(ts)) * len(pos)
            done += len(ts) * len(pos)
        idx = torch.from_numpy(np.concatenate(fc_rows)).to(dev)
        fcw = self.fc.weight.index_select(0, idx).split([len(r) for r in fc_rows])
        fcb = self.fc.bias.index_select(0, idx).split([len(r) for r in fc_rows])
        zs = [
            torch.relu(F.linear(e.index_select(0, torch.from_numpy(ts).to(dev)), w, b))
            .view(len(ts), h0, p)
            .transpose(1, 2)
            for (ts, p), w, b in zip(groups, fcw, fcb, strict=True)
        ]
        by_width = torch.from_numpy(_ragged_arange(first, sizes)).to(dev)
        z = torch.cat([z.reshape(-1, h0) for z in zs]).index_select(0, by_width)
        z = torch.relu(self.conv1(z))  # [R, h1]
        # runs of one (layout, length, kind)
        cut = np.flatnonzero(np.diff(layout) | np.diff(length) | np.diff(kind)) + 1
        first_of_run = np.concatenate([[0], cut]).astype(np.int64)
        run_layout, run_length = layout[first_of_run].tolist(), length[first_of_run].tolist()
        run_rows = [int(s.sum()) for s in np.split(sizes, cut)]
        outs: list[Tensor] = []
        zs = z.split([sum(r for r, q in zip(run_rows, run_layout, strict=True) if q == lay) for lay in (0, 1)])
        for lay, z_lay in enumerate(zs):
            runs = [n for n, q in enumerate(run_layout) if q == lay]
            if not runs:
                continue
            if lay == 0:  # input-major: width i's outputs are the first i * co
                w2 = self.out.weight.view(self.co, self.ci, -1).transpose(0, 1).reshape(self.ci * self.co, -1)
                b2 = self.out.bias.view(self.co, self.ci).t().reshape(-1)
            else:
                rows = torch.from_numpy(self._shell_rows).to(dev)
                w2, b2 = self.out.weight.index_select(0, rows), self.out.bias.index_select(0, rows)
            outs += _PrefixLinear.apply(z_lay, w2, b2, [run_rows[n] for n in runs], [run_length[n] for n in runs])
        return outs

    def classify(self, t: Tensor) -> Tensor:
        """Classifier tiles ``[R, i, classes]`` from input-major 1x1 tiles ``t [R, i, co]``."""
        if self.classifier is None:
            raise ValueError("this GHN has no classifier predictor (no DatasetInfo)")
        return self.classifier(torch.relu(t))


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
    cache: dict = field(default_factory=dict, repr=False)  # per GHN config: tile count, decoding plan

    @property
    def n(self) -> int:
        return self.graph.num_nodes


@dataclass
class _SegmentPlan:
    """How the tensors of some jobs (a graph's, or a group of a huge graph's) are cut from their decoded tiles.

    The decoders' outputs for these jobs are concatenated into one source vector: the conv decoder's tiles
    by (row layout, classifier?, row length), then the 1-D tiles, the
    classifier-bias rows, and one zero (the padding of kernels larger than the chunk's). ``index`` gathers
    every predicted element from it into one flat buffer: job after job, each job's base block (its first
    ``tile_limit`` tiles per dimension; beyond, tiles repeat) in its final memory order.
    """

    jobs: list[ParamJob]
    numel: list[int]  # base-block elements per job
    shapes: list[tuple]  # per job: (base-block shape, channels-last?, shape repeated to or None): see _FlatViews
    index: Tensor  # [sum numel] source positions
    kind: np.ndarray  # per job: squash kind (index into _KINDS)
    gain: np.ndarray  # per job: node type of its learned gain, NUM_TYPES for none (tensors of < 2 dims)
    factor: np.ndarray  # per job: norm_rule's factor times the depth scale
    conv_job: np.ndarray  # per conv tile, in source order: its job, tile code, kernel, row layout, ...
    conv_code: np.ndarray
    conv_kernel: np.ndarray
    conv_layout: np.ndarray
    conv_cls: np.ndarray  # ... classifier tile?, row length (ConvDecoder.row_layout), input width
    conv_length: np.ndarray
    conv_width: np.ndarray
    vec_job: np.ndarray  # per 1-D tile: its job, tile code
    vec_code: np.ndarray
    cb_job: np.ndarray  # per classifier-bias row: its job


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
        return list(self._embed(prepared).split([p.n for p in prepared]))

    def _embed(self, prepared: list[PreparedGraph]) -> Tensor:
        """:meth:`embed` of all graphs, concatenated ``[sum N_g, hid]``."""
        feats = [self.node_features(p) for p in prepared]
        h = torch.cat([f[0] for f in feats])
        biases = [f[1] for f in feats]
        buckets = self.config.sp_cutoff + 2
        pairs = [b.pairs(buckets) if b.n <= DENSE_NODES else None for b in biases]
        for layer in self.layers:
            h = layer(h, biases, pairs)
        return self.ln(h)

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

        Tensors are decoded in groups of about ``decode_batch`` tiles (whole graphs where a graph has fewer
        tiles, so its :class:`_SegmentPlan` is kept on its :class:`PreparedGraph` and reused); within a group,
        tiles of one size are decoded in one call. A consumer that writes each tensor into its model straight
        away (as :func:`~quicktrain.ghn.predict_into` does) never holds more than one group of predictions,
        which keeps huge models within memory.
        """
        prepared = [self.prepare(g) for g in graphs]
        h = self._embed(prepared)
        group: list[tuple[int, int, _SegmentPlan]] = []  # (graph index, node offset, plan)
        tiles, offset = 0, 0
        for gi, p in enumerate(prepared):
            n_tiles = p.cache.get(("tiles", self.config))
            if n_tiles is None:
                n_tiles = p.cache[("tiles", self.config)] = sum(math.prod(self._grid(job)) for job in p.jobs)
            if n_tiles <= decode_batch:
                if group and tiles + n_tiles > decode_batch:
                    yield from self._decode_segments(h, group)
                    group, tiles = [], 0
                key = ("plan", self.config, h.device)
                if key not in p.cache:
                    p.cache[key] = self._segment_plan(p.jobs, h.device)
                group.append((gi, offset, p.cache[key]))
                tiles += n_tiles
            else:  # a huge graph: groups of its tensors, planned on the fly and not kept
                if group:
                    yield from self._decode_segments(h, group)
                    group, tiles = [], 0
                jobs: list[ParamJob] = []
                for job in p.jobs:
                    jobs.append(job)
                    tiles += math.prod(self._grid(job))
                    if tiles >= decode_batch:
                        yield from self._decode_segments(h, [(gi, offset, self._segment_plan(jobs, h.device))])
                        jobs, tiles = [], 0
                if jobs:
                    yield from self._decode_segments(h, [(gi, offset, self._segment_plan(jobs, h.device))])
                    tiles = 0
            offset += p.n
        if group:
            yield from self._decode_segments(h, group)

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

    def _segment_plan(self, jobs: list[ParamJob], device: torch.device) -> _SegmentPlan:
        """Where each element of ``jobs``' tensors comes from in their decoded tiles (see :class:`_SegmentPlan`).

        A tensor ``[o, i, kh, kw]`` of ``ga x gb`` tiles: element ``(r, s, y, x)`` of its base block (the first
        ``min(o, ga co)`` rows and ``min(i, gb ci)`` columns; beyond, tiles repeat) is element
        ``(r mod co, s mod ci)`` of tile ``(r // co, s // ci)`` at kernel position ``(y, x)`` minus the centre
        padding, or the source's zero where the kernel is larger than the chunk's. 4-D convolution weights are
        laid out channels-last ``[o, kh, kw, i]``, what the predicted convolutions run in; others row-major.
        """
        c = self.config
        co, ci, k, _ = c.chunk
        classes = self.dataset.num_classes if self.dataset is not None else 0
        conv: list[tuple[int, ...]] = []  # (layout, cls, row length, width, j, a, b, code, kh, kw) per conv tile
        for j, job in enumerate(jobs):
            if job.route in ("nd", "cls"):
                ga, gb = self._grid(job)
                o, i, kh, kw = job.view
                kt = (1, 1) if job.route == "cls" else (min(kh, k), min(kw, k))
                ob, ib = min(o, ga * co), min(i, gb * ci)
                cls = int(job.route == "cls")
                for a in range(ga):
                    for b in range(gb):
                        w = min(ci, ib - b * ci)  # classifier tiles: all co outputs, input-major (classify's input)
                        lay, n = (0, co * w) if cls else self.decoder.row_layout(min(co, ob - a * co), w)
                        conv.append((lay, cls, n, w, j, a, b, a * c.tile_limit + b, *kt))
        conv.sort(key=lambda t: t[:3])  # stable: job and tile order within (layout, classifier?, row length)
        start: dict[tuple[int, int, int], int] = {}  # (job, a, b) -> first element in the source
        tile: dict[tuple[int, int, int], tuple[int, int]] = {}  # (job, a, b) -> (layout, row length)
        size = 0
        for lay, cls, n, w, j, a, b, _, kh, kw in conv:
            start[(j, a, b)], tile[(j, a, b)] = size, (lay, n)
            size += classes * w if cls else kh * kw * n
        vec, cb = [], []
        for j, job in enumerate(jobs):
            if job.route == "1d":
                for a in range(self._grid(job)[0]):
                    start[(j, a, 0)] = size
                    vec.append((j, a * c.tile_limit))
                    size += c.chunk_1d
            elif job.route == "cls_b":
                start[(j, 0, 0)] = size
                cb.append(j)
                size += classes
        zero = size  # the source ends with one zero
        index, numel, shapes = [], [], []
        for j, job in enumerate(jobs):
            ga, gb = self._grid(job)
            o, i, kh, kw = job.view
            if job.route in ("1d", "cls_b"):
                e = np.arange(min(o, ga * c.chunk_1d) if job.route == "1d" else o)
                src = np.array([start[(j, a, 0)] for a in range(ga)])[e // c.chunk_1d] + e % c.chunk_1d
                shapes.append((job.shape, False, None) if len(e) == o else ((len(e),), False, (o,)))
            else:
                ob, ib = o if job.route == "cls" else min(o, ga * co), min(i, gb * ci)
                channels_last = job.ptype in _CONV_TYPES and len(job.shape) == 4
                if (ob, ib) == (o, i):
                    shapes.append(((o, kh, kw, i), True, None) if channels_last else (job.shape, False, None))
                else:
                    base = (ob, kh, kw, ib) if channels_last else (ob, ib, kh, kw)
                    shapes.append((base, channels_last, (o, i, kh, kw)))
                r, s = np.arange(ob)[:, None], np.arange(ib)
                st = np.array([[start[(j, a, b)] for b in range(gb)] for a in range(ga)])[r // co, s // ci]
                if job.route == "cls":  # tile [i, classes]
                    src = st + (s % ci) * classes + r
                else:
                    lay, n = np.array([[tile[(j, a, b)] for b in range(gb)] for a in range(ga)]).transpose(2, 0, 1)
                    lay, n = lay[r // co, s // ci], n[r // co, s // ci]
                    at = np.where(lay == 0, *(self.decoder.row_position(q, r % co, s % ci) for q in (0, 1)))
                    kt = (min(kh, k), min(kw, k))
                    y = np.arange(kh)[:, None] - (kh - kt[0]) // 2
                    x = np.arange(kw) - (kw - kt[1]) // 2
                    inside = (y >= 0) & (y < kt[0]) & (x >= 0) & (x < kt[1])
                    q = (y * kt[1] + x)[None, None]  # position within the tile
                    src = (st + at)[:, :, None, None] + q * n[..., None, None]
                    src = np.where(inside[None, None], src, zero)
                    if channels_last:
                        src = src.transpose(0, 2, 3, 1)
            index.append(src.ravel())
            numel.append(src.size)
        index_t = torch.from_numpy(np.concatenate(index))
        return _SegmentPlan(
            jobs=jobs,
            numel=numel,
            shapes=shapes,
            index=(index_t.int() if zero < 2**31 else index_t).to(device),
            kind=np.array([_KINDS.index(job.squash) for job in jobs], dtype=np.int64),
            gain=np.array([job.ptype.id if len(job.shape) >= 2 else NUM_TYPES for job in jobs], dtype=np.int64),
            factor=np.array([job.factor for job in jobs], dtype=np.float64),
            conv_job=np.array([t[4] for t in conv], dtype=np.int64),
            conv_code=np.array([t[7] for t in conv], dtype=np.int64),
            conv_kernel=np.array([t[8:] for t in conv], dtype=np.int64).reshape(-1, 2),
            conv_layout=np.array([t[0] for t in conv], dtype=np.int64),
            conv_cls=np.array([t[1] for t in conv], dtype=np.int64),
            conv_length=np.array([t[2] for t in conv], dtype=np.int64),
            conv_width=np.array([t[3] for t in conv], dtype=np.int64),
            vec_job=np.array([v[0] for v in vec], dtype=np.int64),
            vec_code=np.array([v[1] for v in vec], dtype=np.int64),
            cb_job=np.array(cb, dtype=np.int64),
        )

    def _decode_segments(
        self, h: Tensor, segs: list[tuple[int, int, _SegmentPlan]]
    ) -> Iterator[tuple[int, str, Tensor]]:
        """Decode the tensors of ``segs`` (``(graph index, its first row in h, plan)``) all at once.

        Each decoder runs once for all segments: the conv decoder over all their tiles ordered by
        (width, classifier?, segment) (one ``W_2`` product per width), the 1-D decoder and the classifier-bias
        predictor over all their rows. Fan-in normalisation, depth scale and type gain (:func:`norm_rule`) are
        elementwise, so they are applied to whole decoder outputs, one coefficient per row. Each segment's
        outputs are concatenated into its source vector, and one gather (:attr:`_SegmentPlan.index`) cuts,
        crops, pads and lays out all its tensors in one flat buffer; the tensors are views of it (tiles
        repeated beyond ``tile_limit`` are the only copies). Per tensor this leaves one ``split`` output and a
        ``view`` instead of a dozen slicing, concatenation and normalisation ops, forward and backward.
        """
        c = self.config
        co = c.chunk[0]
        dev, lim, dt = h.device, c.tile_limit, h.dtype
        plans = [s[2] for s in segs]
        n_seg = len(plans)
        grid = torch.stack(torch.meshgrid(torch.arange(lim), torch.arange(lim), indexing="ij"), -1).view(-1, 2)
        codes = self.tile_proj(tile_code(grid.to(dev)).flatten(1).to(dt))  # [lim^2, hid]: tile (a, b) at a lim + b
        # the segments' jobs in one numbering
        first_job = np.cumsum([0] + [len(p.jobs) for p in plans])[:-1]
        node = np.array([job.node + off for (_, off, p) in segs for job in p.jobs], dtype=np.int64)
        kind, gain, factor = (np.concatenate([getattr(p, a) for p in plans]) for a in ("kind", "gain", "factor"))

        def cat(attr: str, shift: np.ndarray | None = None) -> np.ndarray:  # a plan field of all segments
            parts = [getattr(p, attr) for p in plans]
            return np.concatenate(parts if shift is None else [a + s for a, s in zip(parts, shift, strict=True)])

        conv_job, vec_job, cb_job = (cat(a, first_job) for a in ("conv_job", "vec_job", "cb_job"))
        seg = np.repeat(np.arange(n_seg), [len(p.conv_job) for p in plans])
        width, cls, kern = cat("conv_width"), cat("conv_cls"), cat("conv_kernel")
        layout, length = cat("conv_layout"), cat("conv_length")
        order = np.lexsort((seg, length, cls, layout))  # the plans' source order; stable: each segment's tiles
        t_job, t_seg, t_cls, t_w = conv_job[order], seg[order], cls[order], width[order]
        t_rows = kern[order, 0] * kern[order, 1]
        row_job = np.repeat(t_job, t_rows)  # the job of each conv decoder row, in decoder order
        # one coefficient per decoded row: factor * exp(gain) of its job (conv rows, 1-D rows, class-bias rows)
        all_rows = np.concatenate([row_job, vec_job, cb_job])
        gains = torch.cat([self.log_gain, self.log_gain.new_zeros(1)]).exp()  # index NUM_TYPES: no gain
        coef = gains.index_select(0, torch.from_numpy(gain[all_rows]).to(dev))
        coef = coef * torch.from_numpy(factor[all_rows]).to(device=dev, dtype=dt)

        def normalize(y: Tensor, jobs: np.ndarray, coef: Tensor) -> Tensor:  # row r of y belongs to jobs[r]
            return _squash_rows(y, kind[jobs]) * coef.view((-1,) + (1,) * (y.dim() - 1))

        def tiles(jobs: np.ndarray, code: np.ndarray | None = None) -> Tensor:
            e = h.index_select(0, torch.from_numpy(node[jobs]).to(dev))
            return e if code is None else e + codes.index_select(0, torch.from_numpy(code).to(dev))

        pieces: list[list[Tensor]] = [[] for _ in segs]
        tail: list[list[Tensor]] = [[] for _ in segs]  # 1-D and classifier-bias outputs
        if len(order):
            t_n = length[order]
            outs = self.decoder(tiles(t_job, cat("conv_code")[order]), kern[order], layout[order], t_n, t_cls)
            cut = np.flatnonzero(np.diff(layout[order]) | np.diff(t_cls) | np.diff(t_n)) + 1
            runs = np.split(np.arange(len(order)), cut)  # the decoder's runs, split where the kind changes
            coefs = coef[: len(row_job)].split([int(t_rows[r].sum()) for r in runs])
            r0 = 0
            for run, out, coef_run in zip(runs, outs, coefs, strict=True):
                rows = row_job[r0 : r0 + len(out)]
                r0 += len(out)
                if t_cls[run[0]]:
                    i = int(t_w[run[0]])
                    y = normalize(self.decoder.classify(out.view(len(out), i, co)), rows, coef_run)
                    sizes = np.bincount(t_seg[run], minlength=n_seg) * y.shape[2] * i
                else:
                    y = normalize(out, rows, coef_run)
                    sizes = np.bincount(t_seg[run], t_rows[run], minlength=n_seg).astype(np.int64) * int(t_n[run[0]])
                for s, part in enumerate(y.reshape(-1).split(sizes.tolist())):
                    if sizes[s]:
                        pieces[s].append(part)
        n_vec = [len(p.vec_job) for p in plans]
        if sum(n_vec):
            y = self.decoder_1d(tiles(vec_job, cat("vec_code")))
            y = normalize(y, vec_job, coef[len(row_job) : len(row_job) + len(vec_job)])
            for s, part in enumerate(y.view(-1).split([n * c.chunk_1d for n in n_vec])):
                if n_vec[s]:
                    tail[s].append(part)
        n_cb = [len(p.cb_job) for p in plans]
        if sum(n_cb):
            if self.class_bias is None:
                raise ValueError("this GHN has no classifier predictor (no DatasetInfo)")
            y = normalize(self.class_bias(tiles(cb_job)), cb_job, coef[len(coef) - len(cb_job) :])
            for s, part in enumerate(y.view(-1).split([n * y.shape[1] for n in n_cb])):
                if n_cb[s]:
                    tail[s].append(part)
        zero = h.new_zeros(1)
        for (gi, _, plan), src, rest in zip(segs, pieces, tail, strict=True):
            flat = torch.cat([*src, *rest, zero]).index_select(0, plan.index)
            for job, w, (_, _, full) in zip(plan.jobs, _FlatViews.apply(flat, plan), plan.shapes, strict=True):
                yield gi, job.name, w if full is None else _repeat_to(w, full).reshape(job.shape)


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


class _FlatViews(torch.autograd.Function):
    """The base blocks of a plan's tensors as views of its flat buffer (:meth:`GHN._segment_plan`): block ``j``
    is ``flat[s_j : s_j + numel_j]`` viewed as its base shape, permuted to ``[o, i, kh, kw]`` for a
    channels-last conv weight.

    One autograd node for all of a graph's tensors: ``split`` then ``view`` and ``permute`` per tensor gave
    two or three nodes per tensor (~450 per meta-batch, forward and backward); the backward here is the
    same data movement, the tensors' gradients laid out in block order and concatenated.
    """

    @staticmethod
    def forward(ctx, flat: Tensor, plan: _SegmentPlan) -> tuple[Tensor, ...]:
        ctx.plan = plan
        out = []
        for v, (base, channels_last, _) in zip(flat.split(plan.numel), plan.shapes, strict=True):
            w = v.view(base)
            out.append(w.permute(0, 3, 1, 2) if channels_last else w)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:  # unused outputs' grads arrive as zeros
        shapes = ctx.plan.shapes
        parts = [(g.permute(0, 2, 3, 1) if cl else g).reshape(-1) for g, (_, cl, _) in zip(grads, shapes, strict=True)]
        return torch.cat(parts), None


def _squash_rows(y: Tensor, kinds: np.ndarray) -> Tensor:
    """``y`` with row ``r`` squashed by ``_SQUASH[_KINDS[kinds[r]]]``."""
    present = np.unique(kinds).tolist()
    if not present:
        return y
    out = _SQUASH[_KINDS[present[0]]](y)
    view = (-1,) + (1,) * (y.dim() - 1)
    for q in present[1:]:
        out = torch.where(torch.from_numpy(kinds == q).to(y.device).view(view), _SQUASH[_KINDS[q]](y), out)
    return out


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


def _repeat_to(x: Tensor, size: tuple[int, ...]) -> Tensor:
    if tuple(x.shape) == tuple(size):  # no slicing op: its backward would allocate a zero-filled copy
        return x
    reps = [math.ceil(s / d) for s, d in zip(size, x.shape, strict=True)]
    if any(r > 1 for r in reps):
        x = x.repeat(*reps)
    return x[tuple(slice(0, s) for s in size)]


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
_KINDS = tuple(_SQUASH)  # squash kinds in the order of a decoded flat buffer


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
