"""Registry of datasets by name; every dataset is returned as in-memory train/val/test tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

Loader = Callable[..., "Splits"]


@dataclass(frozen=True)
class Splits:
    """Train/val/test splits of a classification dataset, as ``(images, labels)`` tensor datasets.

    Images are float32 ``[N, C, H, W]``, already normalised; labels are int64 ``[N]`` in
    ``[0, num_classes)``.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train.tensors[0].shape[1:])


_DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator that registers ``loader(root=..., download=..., seed=...) -> Splits``; duplicates raise."""

    def decorate(loader: Loader) -> Loader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = loader
        return loader

    return decorate


def list_datasets() -> list[str]:
    """Sorted names of the registered datasets (an ``ImageFolder`` is ``folder:PATH``)."""
    return sorted(_DATASETS)


def get_dataset(
    name: str, *, root: str | Path | None = None, download: bool = False, seed: int = 0, progress: bool = False
) -> Splits:
    """Load dataset ``name`` with its fixed-seed splits.

    Args:
        name: a registered name (see :func:`list_datasets`) or ``folder:PATH`` for an ``ImageFolder``.
        root: directory holding the dataset files, for datasets that are not bundled.
        download: let torchvision download ``mnist``/``cifar10``/``cifar100`` into ``root`` (explicit opt-in).
        seed: seed of the train/val split.
        progress: show a progress bar while images are decoded (``folder:PATH``; the others load at once).
    """
    if name.startswith("folder:"):
        path = name.removeprefix("folder:")
        if not path:
            raise ValueError("folder: needs a path, e.g. --dataset folder:data/pets (PATH/{train,test}/CLASS/*)")
        return _DATASETS["folder"](root=path, download=download, seed=seed, progress=progress)
    if name not in _DATASETS or name == "folder":
        raise ValueError(f"Unknown dataset {name!r}; choose from {list_datasets()} (ImageFolder: 'folder:PATH')")
    return _DATASETS[name](root=root, download=download, seed=seed)


def split_off(images: Tensor, labels: Tensor, count: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Split ``count`` random examples (fixed ``seed``) off ``(images, labels)``: returns ``(rest, split)``."""
    if not 0 < count < len(labels):
        raise ValueError(f"cannot split {count} examples off a set of {len(labels)}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    rest, split = order[count:], order[:count]
    return TensorDataset(images[rest], labels[rest]), TensorDataset(images[split], labels[split])


def standardize(*images: Tensor, mean: float, std: float) -> list[Tensor]:
    """``(x - mean) / std`` for each tensor, as float32."""
    return [((x.float() - mean) / std).contiguous() for x in images]


def parse_classes(spec: str) -> list[int]:
    """Class ids from a spec such as ``"0-4"``, ``"5,7,9"`` or ``"0-2,8"``."""
    classes: list[int] = []
    if not spec.strip():
        raise ValueError("--classes is empty; write e.g. '0-4' or '5,7,9', or leave it out for all classes")
    try:
        for part in spec.split(","):
            low, _, high = part.strip().partition("-")
            classes += range(int(low), int(high or low) + 1)
    except ValueError as error:
        raise ValueError(f"cannot read classes {spec!r}; write e.g. '0-4' or '5,7,9'") from error
    return sorted(set(classes))


def select_classes(splits: Splits, classes: list[int]) -> Splits:
    """Keep only the examples of ``classes`` in every split; labels and ``num_classes`` are unchanged, so a
    model trained on one subset and then another shares one classifier head (class-incremental tasks)."""
    unknown = [c for c in classes if not 0 <= c < splits.num_classes]
    if unknown or not classes:
        raise ValueError(f"classes {classes} must be a non-empty subset of 0..{splits.num_classes - 1}")
    wanted = torch.tensor(classes)

    def keep(split: TensorDataset) -> TensorDataset:
        images, labels = split.tensors
        mask = torch.isin(labels, wanted)
        return TensorDataset(images[mask], labels[mask])

    return Splits(splits.name, keep(splits.train), keep(splits.val), keep(splits.test), splits.num_classes)
