"""Seeded DeepNets-style random architectures (GHN-2 Sec. 3.1, DeepNets-1M) with fixed splits.

A network is ``stem -> cells (with strided reductions that double the width) -> global pool -> head``. A cell
is a small DAG (DARTS-like): node ``j`` sums two ops applied to earlier states, and the cell output is the
concatenation of its nodes projected back by a 1x1 conv. Ops: conv 1x1/3x3/5x5, separable conv 3x3/5x5,
dilated conv 3x3, max/avg pooling, skip, squeeze-excite, and spatial self-attention (explicit softmax).

Splits are fixed by disjoint seed ranges:

* ``train``: 2-6 cells, widths 16-48 (the meta-training distribution);
* ``test``: same distribution, unseen seeds (in-distribution test);
* ``deep``: 10-16 cells (out of distribution, deeper);
* ``wide``: widths 64-128 (out of distribution, wider).
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
    "sep_conv3x3",
    "sep_conv5x5",
    "dil_conv3x3",
    "max_pool",
    "avg_pool",
    "skip",
    "se",
    "attn",
)


class Split(StrEnum):
    """Fixed architecture splits; each has its own seed range and depth/width distribution."""

    TRAIN = "train"
    TEST = "test"
    DEEP = "deep"
    WIDE = "wide"


_SEED_OFFSET = {Split.TRAIN: 0, Split.TEST: 10_000_000, Split.DEEP: 20_000_000, Split.WIDE: 30_000_000}
_CELLS = {Split.TRAIN: (2, 6), Split.TEST: (2, 6), Split.DEEP: (10, 16), Split.WIDE: (2, 6)}
_WIDTHS = {
    Split.TRAIN: (16, 24, 32, 48),
    Split.TEST: (16, 24, 32, 48),
    Split.DEEP: (16, 24, 32),
    Split.WIDE: (64, 96, 128),
}
SPLIT_SIZE = {Split.TRAIN: 1_000_000, Split.TEST: 100, Split.DEEP: 100, Split.WIDE: 100}


@dataclass(frozen=True)
class ArchSpec:
    """A sampled architecture: everything needed to build it.

    Attributes:
        genotype: cell nodes ``(op_a, input_a, op_b, input_b)``; inputs index earlier cell states
            (0 = cell input).
        cells: number of cells.
        width: channels after the stem.
        stem_kernel: stem conv kernel size.
        reductions: indices of cells preceded by a strided conv that halves the resolution and doubles
            the width.
        head_hidden: hidden width of a two-layer head, or 0 for a linear head.
        norm: whether convolutions are followed by BatchNorm. Always ``True`` here: DeepNets-1M also samples
            BN-free nets, but in these cells of summed branches they explode under He-scaled predictions and
            their loss spikes stalled meta-training on a CPU budget (kept as a field for later samplers).
    """

    genotype: tuple[tuple[str, int, str, int], ...]
    cells: int
    width: int
    stem_kernel: int
    reductions: tuple[int, ...]
    head_hidden: int
    norm: bool


def sample_arch(split: Split | str, index: int, in_shape: tuple[int, int, int]) -> ArchSpec:
    """The ``index``-th architecture of ``split`` for inputs ``in_shape``; deterministic in its arguments."""
    split = Split(split)
    if not 0 <= index < SPLIT_SIZE[split]:
        raise ValueError(f"index {index} out of range for split {split.value!r} (size {SPLIT_SIZE[split]})")
    rng = random.Random(_SEED_OFFSET[split] + index)
    n_nodes = rng.randint(1, 4)
    genotype = []
    for j in range(n_nodes):
        genotype.append((rng.choice(OPS), rng.randint(0, j), rng.choice(OPS), rng.randint(0, j)))
    cells = rng.randint(*_CELLS[split])
    size = min(in_shape[1:]) // (2 if min(in_shape[1:]) >= 16 else 1)  # after the stem
    max_red = max(0, min(2, int(math.log2(max(1, size))) - 2))
    n_red = min(rng.randint(0, max_red), cells - 1) if max_red else 0
    reductions = tuple(sorted(rng.sample(range(1, cells), n_red))) if n_red else ()
    return ArchSpec(
        genotype=tuple(genotype),
        cells=cells,
        width=rng.choice(_WIDTHS[split]),
        stem_kernel=rng.choice((3, 3, 5)),
        reductions=reductions,
        head_hidden=rng.choice((0, 0, 64)),
        norm=True,  # BN-free nets explode under He-scaled predictions in cells of summed branches
    )


def _norm(c: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if norm else nn.Identity()


def make_op(name: str, c: int, norm: bool) -> nn.Module:
    """One cell op on ``c`` channels that keeps the spatial size (ReLU-conv-BN order, as in DARTS)."""
    if name.startswith("conv"):
        k = int(name[-1])
        return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, padding=k // 2, bias=not norm), _norm(c, norm))
    if name.startswith("sep_conv"):
        k = int(name[-1])
        return nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=not norm),
            _norm(c, norm),
        )
    if name == "dil_conv3x3":
        return nn.Sequential(
            nn.ReLU(), nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=not norm), _norm(c, norm)
        )
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
        self.ops = nn.ModuleList(
            [nn.ModuleList([make_op(a, c, norm), make_op(b, c, norm)]) for a, _, b, _ in genotype]
        )
        n = len(genotype)
        self.project = (
            nn.Sequential(nn.ReLU(), nn.Conv2d(n * c, c, 1, bias=not norm), _norm(c, norm))
            if n > 1
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        states = [x]
        for (ia, ib), (op_a, op_b) in zip(self.inputs, self.ops, strict=True):
            states.append(op_a(states[ia]) + op_b(states[ib]))
        out = torch.cat(states[1:], dim=1) if len(states) > 2 else states[1]
        return self.project(out)


class RandomNet(nn.Module):
    """A network built from an :class:`ArchSpec`."""

    def __init__(self, spec: ArchSpec, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        c = spec.width
        k = spec.stem_kernel
        stride = (
            2 if min(in_shape[1:]) >= 16 else 1
        )  # strided stem on larger images, as DeepNets-1M's ImageNet nets
        self.stem = nn.Sequential(
            nn.Conv2d(in_shape[0], c, k, stride, padding=k // 2, bias=not spec.norm), _norm(c, spec.norm)
        )
        blocks: list[nn.Module] = []
        for i in range(spec.cells):
            if i in spec.reductions:
                blocks.append(
                    nn.Sequential(
                        nn.ReLU(), nn.Conv2d(c, 2 * c, 3, 2, 1, bias=not spec.norm), _norm(2 * c, spec.norm)
                    )
                )
                c *= 2
            blocks.append(Cell(spec.genotype, c, spec.norm))
        self.cells = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if spec.head_hidden:
            self.head = nn.Sequential(
                nn.Linear(c, spec.head_hidden), nn.ReLU(), nn.Linear(spec.head_hidden, num_classes)
            )
        else:
            self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.cells(self.stem(x)))
        return self.head(self.pool(x).flatten(1))


def build_arch(
    split: Split | str, index: int, *, in_shape: tuple[int, int, int], num_classes: int
) -> RandomNet:
    """Build the ``index``-th network of ``split`` for ``in_shape`` inputs and ``num_classes`` outputs."""
    return RandomNet(sample_arch(split, index, in_shape), tuple(in_shape), num_classes)


__all__ = ["OPS", "ArchSpec", "RandomNet", "Split", "SPLIT_SIZE", "build_arch", "make_op", "sample_arch"]
