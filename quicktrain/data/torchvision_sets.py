"""MNIST, CIFAR-10/100 and ``ImageFolder`` directories through torchvision, held in memory."""

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
FOLDER_IMAGE_SIZE = 32


def _require_root(name: str, root: str | Path | None) -> Path:
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
        directory = _require_root(name, root)
        train_full = _torchvision_split(name, cls, directory, True, download)
        test = _torchvision_split(name, cls, directory, False, download)
        train, val = split_off(*train_full.tensors, VAL_SIZE, seed=seed)
        return Splits(name, train, val, test, num_classes)

    load.__doc__ = f"torchvision's {name}: train minus {VAL_SIZE} val images, and the official test set."


_make_torchvision_loader("mnist", torchvision.datasets.MNIST, 10)
_make_torchvision_loader("cifar10", torchvision.datasets.CIFAR10, 10)
_make_torchvision_loader("cifar100", torchvision.datasets.CIFAR100, 100)


@register_dataset("folder")
def image_folder(*, root: str | Path | None = None, download: bool = False, seed: int = 0) -> Splits:
    """An ``ImageFolder`` tree (``root/CLASS/*.png``), resized to 32x32 RGB and standardised per channel.

    If ``root`` has ``train/`` and ``test/`` sub-folders they are used; otherwise 20% of the images are held
    out as test. 10% of the training images (at least one) form the validation split.
    """
    if download:
        raise ValueError("an ImageFolder dataset cannot be downloaded; drop --download")
    directory = _require_root("folder", root)
    if not directory.is_dir():
        raise FileNotFoundError(f"ImageFolder directory {directory} does not exist")
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        train_images, train_labels, classes = _read_folder(directory / "train")
        test_images, test_labels, _ = _read_folder(directory / "test")
    else:
        images, labels, classes = _read_folder(directory)
        rest, test = split_off(images, labels, max(1, len(labels) // 5), seed=0)
        (train_images, train_labels), (test_images, test_labels) = rest.tensors, test.tensors
    mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
    std = train_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    train, val = split_off((train_images - mean) / std, train_labels, max(1, len(train_labels) // 10), seed)
    test = TensorDataset((test_images - mean) / std, test_labels)
    return Splits(f"folder:{directory}", train, val, test, num_classes=len(classes))


def _read_folder(directory: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize((FOLDER_IMAGE_SIZE, FOLDER_IMAGE_SIZE)),
            torchvision.transforms.ToTensor(),
        ]
    )
    folder = torchvision.datasets.ImageFolder(str(directory), transform=transform, loader=_rgb_loader)
    if len(folder) == 0:
        raise FileNotFoundError(f"no images found under {directory} (expected {directory}/CLASS/IMAGE files)")
    images = torch.stack([image for image, _ in folder])
    return images, torch.tensor(folder.targets).long(), folder.classes


def _rgb_loader(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")
