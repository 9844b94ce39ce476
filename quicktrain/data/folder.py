"""``folder:PATH``: a directory of images, one sub-folder per class, decoded in parallel and held in memory.

Layout: ``PATH/train/CLASS/*`` with ``PATH/test/CLASS/*`` (and optionally ``PATH/val/CLASS/*``), or just
``PATH/CLASS/*``, in which case 20% of the images are held out as test. The class index comes from
``train/`` alone (sorted folder names, as ``torchvision.datasets.ImageFolder`` orders them), so label ``k``
means the same class in every split; a test or val folder with a class that ``train/`` lacks is an error.

Every image is converted to RGB, resized to 32x32 (bilinear), scaled to [0, 1] and standardised with the
per-channel mean and std of the training images. Without ``val/``, 10% of the training images (at least one)
form the validation split.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from .registry import Splits, register_dataset, split_off
from .torchvision_sets import require_root

IMAGE_SIZE = 32


@register_dataset("folder")
def image_folder(
    *, root: str | Path | None = None, download: bool = False, seed: int = 0, progress: bool = False
) -> Splits:
    """The ``folder:PATH`` dataset (see the module docstring for the layout and the conversion)."""
    if download:
        raise ValueError("an image folder cannot be downloaded; drop --download")
    directory = require_root("folder", root)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} does not exist; give folder:PATH with PATH/CLASS/* images")
    split_dirs = {name: directory / name for name in ("train", "val", "test") if (directory / name).is_dir()}
    if "test" in split_dirs and "train" not in split_dirs:
        raise ValueError(f"{directory} has test/ but no train/; use PATH/train/CLASS/* beside PATH/test/CLASS/*")
    if "train" in split_dirs:
        classes, index = find_classes(split_dirs["train"])
        read = {name: _read(path, index, name, progress) for name, path in split_dirs.items()}
        if "test" not in read:
            raise ValueError(f"{directory} has train/ but no test/; add PATH/test/CLASS/* images")
    else:
        classes, index = find_classes(directory)
        images, labels = _read(directory, index, "images", progress)
        rest, test = split_off(images, labels, max(1, len(labels) // 5), seed=0)
        read = {"train": rest.tensors, "test": test.tensors}
    train_images, train_labels = read["train"]
    mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
    std = train_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    if "val" in read:
        train = TensorDataset((train_images - mean) / std, train_labels)
        val = TensorDataset((read["val"][0] - mean) / std, read["val"][1])
    else:
        train, val = split_off((train_images - mean) / std, train_labels, max(1, len(train_labels) // 10), seed)
    test = TensorDataset((read["test"][0] - mean) / std, read["test"][1])
    return Splits(f"folder:{directory}", train, val, test, num_classes=len(classes))


def _read(directory: Path, index: dict[str, int], split: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image under ``directory/CLASS/`` with the class ``index`` of the training folder."""
    others = sorted(set(find_classes(directory)[0]) - set(index))
    if others:
        raise ValueError(
            f"{directory} has classes that train/ lacks: {others}; every class of {split} needs a train/ folder"
        )
    try:
        samples = make_dataset(directory, index, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{directory}: {error}") from None
    if not samples:
        raise FileNotFoundError(f"no images found under {directory} (expected {directory}/CLASS/IMAGE files)")
    paths = [path for path, _ in samples]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        decoded = list(
            tqdm(pool.map(_decode, paths), total=len(paths), desc=f"decode {split}", unit="img",
                 disable=not progress, leave=False)
        )
    return torch.stack(decoded), torch.tensor([label for _, label in samples], dtype=torch.long)


def _decode(path: str) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot decode image {path} ({error}); replace or remove the file") from None
    return TF.to_tensor(TF.resize(rgb, [IMAGE_SIZE, IMAGE_SIZE]))
