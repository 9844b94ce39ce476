"""MNIST and CIFAR-10/100 through torchvision, held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import TensorDataset

from .registry import Splits, register_dataset, split_off

# Per-channel pixel mean and std of each training set (pixels in [0, 1]).
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
VAL_SIZE = 5000


def require_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        raise ValueError(
            f"dataset {name!r} is not bundled: pass --data-dir DIR with the torchvision files "
            "(add --download to let torchvision fetch them into DIR)"
        )
    return Path(root)


def _normalize(images: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in STATS[name])
    return ((images - mean) / std).contiguous()


def _torchvision_split(name: str, cls: type, root: Path, train: bool, download: bool) -> TensorDataset:
    try:
        data = cls(str(root), train=train, download=download)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"{name} not found under {root} ({error}); put the torchvision files there or add --download"
        ) from error
    images = torch.as_tensor(np.asarray(data.data)).float() / 255.0
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return TensorDataset(_normalize(images, name), torch.as_tensor(np.asarray(data.targets)).long())


def _make_torchvision_loader(name: str, cls: type, num_classes: int) -> None:
    @register_dataset(name)
    def load(*, root: str | Path | None = None, download: bool = False, seed: int = 0) -> Splits:
        directory = require_root(name, root)
        train_full = _torchvision_split(name, cls, directory, True, download)
        test = _torchvision_split(name, cls, directory, False, download)
        train, val = split_off(*train_full.tensors, VAL_SIZE, seed=seed)
        return Splits(name, train, val, test, num_classes)

    load.__doc__ = f"torchvision's {name}: train minus {VAL_SIZE} val images, and the official test set."


_make_torchvision_loader("mnist", torchvision.datasets.MNIST, 10)
_make_torchvision_loader("cifar10", torchvision.datasets.CIFAR10, 10)
_make_torchvision_loader("cifar100", torchvision.datasets.CIFAR100, 100)

