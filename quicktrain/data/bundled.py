"""Datasets that need no download: scikit-learn's ``digits`` and Fashion-MNIST from Debian's package."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from .registry import Splits, register_dataset, split_off, standardize

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Pixel mean and std of the Fashion-MNIST training images scaled to [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
# Pixel mean and std of the digits images scaled to [0, 1] (all 1,797 images).
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760
IDX_DTYPE = {0x08: np.uint8}


@register_dataset("digits")
def digits(*, root: str | Path | None = None, download: bool = False, seed: int = 0) -> Splits:
    """scikit-learn's 1,797 8x8 handwritten digits: 1,257 train, 180 val, 360 test.

    The test split is a fixed 20% (seed 0, independent of ``seed``); val is 10% of the rest.
    Pixels (0..16) are scaled to [0, 1], then standardised with ``DIGITS_MEAN``/``DIGITS_STD``.
    """
    del root, download  # bundled with scikit-learn
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0
    labels = torch.from_numpy(bunch.target).long()
    (images,) = standardize(images, mean=DIGITS_MEAN, std=DIGITS_STD)
    rest, test = split_off(images, labels, 360, seed=0)
    train, val = split_off(*rest.tensors, 180, seed=seed)
    return Splits("digits", train, val, test, num_classes=10)


@register_dataset("fashion-mnist")
def fashion_mnist(*, root: str | Path | None = None, download: bool = False, seed: int = 0) -> Splits:
    """Fashion-MNIST (Xiao et al., 2017): 55,000 train, 5,000 val (from the 60k train set), 10,000 test.

    Read from the IDX files (optionally gzipped) in ``root`` or, by default, where the Debian package
    ``dataset-fashion-mnist`` puts them. Pixels are scaled to [0, 1] and standardised with
    ``FASHION_MNIST_MEAN``/``FASHION_MNIST_STD``.
    """
    if download:
        raise ValueError("fashion-mnist is read from local IDX files; --download is not supported for it")
    directory = Path(root) if root is not None else FASHION_MNIST_DIR
    arrays = {key: torch.from_numpy(read_idx(find_idx(directory, stem))) for key, stem in FASHION_MNIST_FILES.items()}
    train_images, test_images = standardize(
        arrays["train_images"].unsqueeze(1) / 255.0,
        arrays["test_images"].unsqueeze(1) / 255.0,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )
    train, val = split_off(train_images, arrays["train_labels"].long(), 5000, seed=seed)
    test = torch.utils.data.TensorDataset(test_images, arrays["test_labels"].long())
    return Splits("fashion-mnist", train, val, test, num_classes=10)


def find_idx(directory: Path, stem: str) -> Path:
    """The IDX file ``stem`` (or ``stem.gz``) in ``directory``; raises with set-up instructions if absent."""
    for path in (directory / stem, directory / f"{stem}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install it with "
        "'sudo apt-get install dataset-fashion-mnist' (files go to /usr/share/datasets/fashion-mnist/) "
        "or pass --data-dir DIR holding the four IDX files from github.com/zalandoresearch/fashion-mnist."
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format: magic ``0 0 dtype ndim``, big-endian int32 dims, data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number); re-install the dataset")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, file has {len(raw) - offset} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy()
