"""Datasets as in-memory splits: ``get_dataset(name)``, and :class:`Adapter` to fit a model's input shape."""

from . import bundled, folder, torchvision_sets  # noqa: F401  (registers the datasets)
from .adapt import Adapter, adapt
from .registry import Splits, get_dataset, list_datasets, parse_classes, register_dataset, select_classes

__all__ = [
    "Adapter",
    "Splits",
    "adapt",
    "get_dataset",
    "list_datasets",
    "parse_classes",
    "register_dataset",
    "select_classes",
]
