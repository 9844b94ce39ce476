"""Seeded random architectures for meta-training and testing GHNs, with fixed splits.

GHN-2's DeepNets-1M (Sec. 3.1) samples DARTS-like cell networks; GHN-3 (Sec. 4) adds ViTs and other
ImageNet families to its training set so that predictions carry over to what people train. The space here
mixes six families, each built from the same few knobs (width, depth, stem, head, normalisation):

* ``cell``: ``stem -> cells -> pool -> head``; a cell is a DAG whose node ``j`` sums two ops on earlier states,
  its output is the concatenation of its nodes projected back by a 1x1 conv. Ops: conv 1x1/3x3/5x5, grouped
  conv 3x3, separable (depthwise + 1x1) conv 3x3/5x5, dilated conv 3x3, max/avg pooling, skip,
  squeeze-excite, spatial self-attention;
* ``resnet``: basic residual blocks (He et al., 2016) with strided stages that double the width;
* ``mobile``: inverted-residual blocks with ReLU6 (MobileNetV2, Sandler et al., 2018);
* ``vit``: patch tokens + position table (+ class token) -> pre-norm transformer blocks (LayerNorm,
  ``nn.MultiheadAttention``, MLP) -> LayerNorm -> linear head (Dosovitskiy et al., 2021);
* ``cnn``: plain conv stacks with max-pooling, optionally grouped convs, flatten + MLP or pooled heads;
* ``mlp``: flatten -> fully connected layers.

Stems: 3x3 stride 1, 3x3/5x5 stride 2, 7x7 stride 2 + max-pool, patchify 2x2/4x4 (where the image is large
enough). Heads: global pool + linear, global pool + MLP, flatten + MLP. About one network in five (one in
three for ``cnn``/``mlp``) has no normalisation layers.

Splits are fixed by disjoint seed ranges:

* ``train``: 1-8 cells/blocks, widths 8-64 (the meta-training distribution);
* ``test``: the same distribution, unseen seeds (in-distribution test);
* ``deep``: 10-16 cells/blocks (out of distribution, deeper);
* ``wide``: widths 96-128 (out of distribution, wider).

The registry models of :mod:`quicktrain.models` are an honest unseen split too: a meta-training pool drops
any sampled network whose graph equals one of theirs (:func:`quicktrain.ghn.meta.ArchPool`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor, nn

OPS = (
    "conv1x1",
    "conv3x3",
    "conv5x5",
    "group_conv3x3",
    "sep_conv3x3",
    "sep_conv5x5",
    "dil_conv3x3",
    "max_pool",
    "avg_pool",
    "skip",
    "se",
    "attn",
)
FAMILIES = ("cell", "resnet", "mobile", "vit", "cnn", "mlp")
_FAMILY_WEIGHTS = (0.35, 0.15, 0.15, 0.1, 0.15, 0.1)
STEMS = ("conv3", "conv3s2", "conv5s2", "conv7s2pool", "patch2", "patch4")
HEADS = ("pool", "pool_mlp", "flatten_mlp")


class Split(StrEnum):
    """Fixed architecture splits; each has its own seed range and depth/width distribution."""

    TRAIN = "train"
    TEST = "test"
    DEEP = "deep"
    WIDE = "wide"


_SEED_OFFSET = {Split.TRAIN: 0, Split.TEST: 10_000_000, Split.DEEP: 20_000_000, Split.WIDE: 30_000_000}
_CELLS = {Split.TRAIN: (1, 8), Split.TEST: (1, 8), Split.DEEP: (10, 16), Split.WIDE: (1, 6)}
_WIDTHS = {
    Split.TRAIN: (8, 12, 16, 24, 32, 48, 64),
    Split.TEST: (8, 12, 16, 24, 32, 48, 64),
    Split.DEEP: (16, 24, 32),
    Split.WIDE: (96, 128),
}
SPLIT_SIZE = {Split.TRAIN: 1_000_000, Split.TEST: 100, Split.DEEP: 100, Split.WIDE: 100}


@dataclass(frozen=True)
class ArchSpec:
    """A sampled architecture: everything needed to build it.

    Attributes:
        family: one of :data:`FAMILIES`.
        cells: number of cells (``cell``), blocks (``resnet``, ``mobile``, ``vit``), conv layers (``cnn``) or
            hidden layers (``mlp``).
        width: channels after the stem (token width for ``vit``, a quarter of the hidden width for ``mlp``).
        stem: one of :data:`STEMS` (``vit`` uses ``patch<k>`` with its own patch size).
        head: one of :data:`HEADS`.
        head_hidden: hidden width of an MLP head.
        norm: BatchNorm after convolutions (``vit`` always has LayerNorm).
        genotype: ``cell`` nodes ``(op_a, input_a, op_b, input_b)``; inputs index earlier cell states.
        reductions: indices of cells/blocks that halve the resolution and double the width.
        kernel: main kernel size (``resnet``, ``mobile``, ``cnn``) or patch size (``vit``).
        expand: expansion ratio (``mobile``) or MLP ratio (``vit``).
        heads: attention heads (``vit``); groups of grouped convs (``cnn``; 1 = none).
    """

    family: str
    cells: int
    width: int
    stem: str
    head: str
    head_hidden: int
    norm: bool
    genotype: tuple[tuple[str, int, str, int], ...] = ()
    reductions: tuple[int, ...] = ()
    kernel: int = 3
    expand: int = 1
    heads: int = 1


def _stems_for(size: int) -> list[str]:
    """Stems that leave at least a 4x4 map of a ``size x size`` image."""
    ok = ["conv3"]
    if size >= 16:
        ok += ["conv3s2", "conv5s2", "patch2", "patch4"]
    if size >= 24:
        ok.append("conv7s2pool")
    return ok


def stem_stride(stem: str) -> int:
    return {"conv3": 1, "conv3s2": 2, "conv5s2": 2, "conv7s2pool": 4, "patch2": 2, "patch4": 4}[stem]


def sample_arch(split: Split | str, index: int, in_shape: tuple[int, int, int]) -> ArchSpec:
    """The ``index``-th architecture of ``split`` for inputs ``in_shape``; deterministic in its arguments."""
    split = Split(split)
    if not 0 <= index < SPLIT_SIZE[split]:
        raise ValueError(f"index {index} out of range for split {split.value!r} (size {SPLIT_SIZE[split]})")
    rng = random.Random(_SEED_OFFSET[split] + index)
    size = min(in_shape[1:])
    family = rng.choices(FAMILIES, _FAMILY_WEIGHTS)[0]
    cells = rng.randint(*_CELLS[split])
    width = rng.choice(_WIDTHS[split])
    stem = rng.choice(_stems_for(size))
    head = rng.choice(HEADS)
    head_hidden = rng.choice((32, 64, 128))
    norm = rng.random() >= (1 / 3 if family in ("cnn", "mlp") else 0.2)
    after = size // stem_stride(stem)
    max_red = max(0, min(2, int(math.log2(max(1, after))) - 2))
    n_red = min(rng.randint(0, max_red), cells - 1) if max_red and cells > 1 else 0
    reductions = tuple(sorted(rng.sample(range(1, cells), n_red))) if n_red else ()
    kw: dict = {}
    if family == "cell":
        n_nodes = rng.randint(1, 4)
        kw["genotype"] = tuple(
            (rng.choice(OPS), rng.randint(0, j), rng.choice(OPS), rng.randint(0, j)) for j in range(n_nodes)
        )
    elif family in ("resnet", "cnn"):
        kw["kernel"] = rng.choice((3, 3, 5))
        if family == "cnn":
            kw["heads"] = rng.choice((1, 1, 2, 4))  # conv groups
    elif family == "mobile":
        kw["kernel"] = rng.choice((3, 5))
        kw["expand"] = rng.choice((1, 2, 4, 6))
    elif family == "vit":
        patches = [p for p in (2, 4, 7) if size % p == 0 and size // p >= 2]
        kw["kernel"] = rng.choice(patches)
        kw["expand"] = rng.choice((2, 4))
        kw["heads"] = rng.choice([h for h in (1, 2, 4) if width % h == 0 and width // h >= 4])
        stem, reductions = f"patch{kw['kernel']}", ()
        norm = False
    elif family == "mlp":
        stem, reductions = "flatten", ()
        head = "pool"  # the last hidden layer feeds a linear classifier
    return ArchSpec(family, cells, width, stem, head, head_hidden, norm, reductions=reductions, **kw)


def _norm(c: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if norm else nn.Identity()


def make_op(name: str, c: int, norm: bool) -> nn.Module:
    """One cell op on ``c`` channels that keeps the spatial size (ReLU-conv-BN order, as in DARTS)."""
    if name.startswith("conv"):
        k = int(name[-1])
        return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, padding=k // 2, bias=not norm), _norm(c, norm))
    if name == "group_conv3x3":
        groups = 4 if c % 4 == 0 and c >= 16 else 2 if c % 2 == 0 else 1
        return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=not norm), _norm(c, norm))
    if name.startswith("sep_conv"):
        k = int(name[-1])
        return nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=not norm),
            _norm(c, norm),
        )
    if name == "dil_conv3x3":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=not norm), _norm(c, norm))
    if name == "max_pool":
        return nn.MaxPool2d(3, 1, 1)
    if name == "avg_pool":
        return nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    if name == "skip":
        return nn.Identity()
    if name == "se":
        return SqueezeExcite(c)
    if name == "attn":
        return SpatialAttention(c)
    raise ValueError(f"Unknown op {name!r}; choose from {OPS}")


class SqueezeExcite(nn.Module):
    """``x * sigmoid(W2 relu(W1 mean_hw(x)))`` (Hu et al., 2018), reduction 4."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(4, c // 4), 1)
        self.fc2 = nn.Conv2d(max(4, c // 4), c, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class SpatialAttention(nn.Module):
    """Single-head self-attention over the ``H*W`` positions: ``softmax(QK^T/sqrt(c)) V``, projected."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        att = (q @ k.transpose(1, 2) / math.sqrt(c)).softmax(-1)
        return self.proj(att @ v).transpose(1, 2).reshape(b, c, h, w)


class Cell(nn.Module):
    """DAG cell: node ``j = op_a(s[i_a]) + op_b(s[i_b])``; output ``= conv1x1(concat(nodes))``."""

    def __init__(self, genotype: tuple[tuple[str, int, str, int], ...], c: int, norm: bool) -> None:
        super().__init__()
        self.inputs = [(ia, ib) for _, ia, _, ib in genotype]
        self.ops = nn.ModuleList([nn.ModuleList([make_op(a, c, norm), make_op(b, c, norm)]) for a, _, b, _ in genotype])
        n = len(genotype)
        self.project = (
            nn.Sequential(nn.ReLU(), nn.Conv2d(n * c, c, 1, bias=not norm), _norm(c, norm)) if n > 1 else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        states = [x]
        for (ia, ib), (op_a, op_b) in zip(self.inputs, self.ops, strict=True):
            states.append(op_a(states[ia]) + op_b(states[ib]))
        out = torch.cat(states[1:], dim=1) if len(states) > 2 else states[1]
        return self.project(out)


class BasicBlock(nn.Module):
    """``relu(BN(conv(relu(BN(conv(x))))) + shortcut(x))`` with a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, k: int, norm: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=not norm),
            _norm(c_out, norm),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, k, 1, k // 2, bias=not norm),
            _norm(c_out, norm),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=not norm), _norm(c_out, norm))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> ReLU6 -> depthwise ``k x k`` -> ReLU6 -> 1x1 project (+ x)."""

    def __init__(self, c_in: int, c_out: int, stride: int, k: int, expand: int, norm: bool) -> None:
        super().__init__()
        hid = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hid, 1, bias=not norm), _norm(hid, norm), nn.ReLU6()]
        layers += [
            nn.Conv2d(hid, hid, k, stride, k // 2, groups=hid, bias=not norm),
            _norm(hid, norm),
            nn.ReLU6(),
            nn.Conv2d(hid, c_out, 1, bias=not norm),
            _norm(c_out, norm),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: ``x += MHA(LN(x))``, ``x += MLP(LN(x))`` (GELU)."""

    def __init__(self, d: int, heads: int, ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d))

    def forward(self, x: Tensor) -> Tensor:
        t = self.ln1(x)
        x = x + self.attn(t, t, t, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Patch embedding + position table (+ class token) -> transformer blocks -> LayerNorm -> linear head."""

    def __init__(self, spec: ArchSpec, in_shape: tuple[int, int, int], num_classes: int, cls_token: bool) -> None:
        super().__init__()
        d, p = spec.width, spec.kernel
        self.patch = nn.Conv2d(in_shape[0], d, p, p)
        tokens = (in_shape[1] // p) * (in_shape[2] // p)
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if cls_token else None
        self.pos = nn.Parameter(torch.randn(1, tokens + int(cls_token), d) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(d, spec.heads, spec.expand) for _ in range(spec.cells)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        t = self.ln(self.blocks(t + self.pos))
        return self.head(t[:, 0] if self.cls is not None else t.mean(1))


def _stem(stem: str, c_in: int, c: int, norm: bool) -> nn.Sequential:
    if stem.startswith("patch"):
        p = int(stem[5:])
        conv = nn.Conv2d(c_in, c, p, p, bias=not norm)
    else:
        k = int(stem[4])
        conv = nn.Conv2d(c_in, c, k, 2 if "s2" in stem else 1, k // 2, bias=not norm)
    layers = [conv, _norm(c, norm), nn.ReLU()]
    if stem.endswith("pool"):
        layers.append(nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(*layers)


def _head(spec: ArchSpec, c: int, hw: int, num_classes: int) -> nn.Module:
    """Classifier after the feature map ``[c, hw, hw]``."""
    if spec.head == "flatten_mlp":
        side = min(hw, 4 if c <= 64 else 2)
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(side),
            nn.Flatten(),
            nn.Linear(c * side * side, spec.head_hidden),
            nn.ReLU(),
            nn.Linear(spec.head_hidden, num_classes),
        )
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if spec.head == "pool_mlp":
        return nn.Sequential(*pool, nn.Linear(c, spec.head_hidden), nn.ReLU(), nn.Linear(spec.head_hidden, num_classes))
    return nn.Sequential(*pool, nn.Linear(c, num_classes))


class RandomNet(nn.Module):
    """A network built from an :class:`ArchSpec`: ``head(body(stem(x)))``."""

    def __init__(self, spec: ArchSpec, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        if spec.family not in FAMILIES:
            raise ValueError(f"Unknown family {spec.family!r}; choose from {FAMILIES}")
        if spec.family == "vit":
            self.stem = nn.Identity()
            self.body: nn.Module = ViT(spec, in_shape, num_classes, cls_token=spec.head != "pool")
            self.head = nn.Identity()
            return
        if spec.family == "mlp":
            d = 4 * spec.width
            layers: list[nn.Module] = [nn.Flatten()]
            f = math.prod(in_shape)
            for _ in range(spec.cells):
                layers += [nn.Linear(f, d, bias=not spec.norm)]
                layers += [nn.BatchNorm1d(d)] if spec.norm else []
                layers += [nn.ReLU()]
                f = d
            self.stem = nn.Identity()
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(f, num_classes)
            return
        c, k, norm = spec.width, spec.kernel, spec.norm
        self.stem = _stem(spec.stem, in_shape[0], c, norm)
        hw = min(in_shape[1:]) // stem_stride(spec.stem)
        blocks: list[nn.Module] = []
        for i in range(spec.cells):
            red = i in spec.reductions
            if spec.family == "cell":
                if red:
                    blocks.append(
                        nn.Sequential(nn.ReLU(), nn.Conv2d(c, 2 * c, 3, 2, 1, bias=not norm), _norm(2 * c, norm))
                    )
                    c *= 2
                blocks.append(Cell(spec.genotype, c, norm))
            elif spec.family == "resnet":
                c_out = 2 * c if red else c
                blocks.append(BasicBlock(c, c_out, 2 if red else 1, k, norm))
                c = c_out
            elif spec.family == "mobile":
                c_out = 2 * c if red else c
                blocks.append(InvertedResidual(c, c_out, 2 if red else 1, k, 1 if i == 0 else spec.expand, norm))
                c = c_out
            else:  # cnn
                c_out = 2 * c if red else c
                g = spec.heads if c % spec.heads == 0 and c_out % spec.heads == 0 and i % 2 == 1 else 1
                blocks += [nn.Conv2d(c, c_out, k, 1, k // 2, groups=g, bias=not norm), _norm(c_out, norm), nn.ReLU()]
                if red:
                    blocks.append(nn.MaxPool2d(2, 2))
                c = c_out
            hw = hw // 2 if red else hw
        if spec.family == "cell":
            blocks.append(nn.ReLU())
        self.body = nn.Sequential(*blocks)
        self.head = _head(spec, c, hw, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem(x)))


def build_arch(split: Split | str, index: int, *, in_shape: tuple[int, int, int], num_classes: int) -> RandomNet:
    """Build the ``index``-th network of ``split`` for ``in_shape`` inputs and ``num_classes`` outputs."""
    return RandomNet(sample_arch(split, index, in_shape), tuple(in_shape), num_classes)


__all__ = [
    "FAMILIES",
    "OPS",
    "ArchSpec",
    "RandomNet",
    "Split",
    "SPLIT_SIZE",
    "STEMS",
    "build_arch",
    "make_op",
    "sample_arch",
]
