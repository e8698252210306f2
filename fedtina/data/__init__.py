"""Datasets: `load_dataset(cfg, cache_dir)` turns a DatasetConfig into an in-memory ImageDataset. Each dataset is one
module of this package that registers itself (fedtina.data.registry); importing the package imports them all.

    shapes      the embedded, generated dataset (offline default)
    cifar100    CIFAR-100 through torchvision (cfg.path: download root)
    folder      class folders in a directory or .zip (cfg.path, optional cfg.names_file)
    caltech101  a folder dataset; cfg.path defaults to the shared Caltech-101 zip
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from fedtina.config import DatasetConfig
from fedtina.data.base import ImageDataset, clean_class_name
from fedtina.data.registry import REGISTRY, dataset, names

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

from fedtina.data.caltech101 import CALTECH101_ZIP  # noqa: E402 - after the registration

__all__ = ["ImageDataset", "clean_class_name", "load_dataset", "DATASETS", "CALTECH101_ZIP", "REGISTRY"]

DATASETS = tuple(names())


def load_dataset(cfg: DatasetConfig, cache_dir: Path) -> ImageDataset:
    """The dataset named by `cfg.name`, cached under `cache_dir/datasets/`."""
    return dataset(cfg.name).load(cfg, cache_dir)
