"""Datasets: `load_dataset(cfg, cache_dir)` turns a DatasetConfig into an in-memory ImageDataset.

    shapes      the embedded, generated dataset (offline default)
    cifar100    CIFAR-100 through torchvision (cfg.path: download root)
    folder      class folders in a directory or .zip (cfg.path, optional cfg.names_file)
    caltech101  a folder dataset; cfg.path defaults to the shared Caltech-101 zip
"""

from __future__ import annotations

from pathlib import Path

from fedtina.config import DatasetConfig
from fedtina.data.base import ImageDataset, clean_class_name
from fedtina.data.cifar import load_cifar100
from fedtina.data.folder import load_class_folder
from fedtina.data.shapes import load_shapes
from fedtina.errors import DatasetUnavailableError, FedtinaError

__all__ = ["ImageDataset", "clean_class_name", "load_dataset", "DATASETS", "CALTECH101_ZIP"]

DATASETS = ("shapes", "cifar100", "folder", "caltech101")
CALTECH101_ZIP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "caltech101-32.zip"


def _caltech101(cfg: DatasetConfig, cache_dir: Path) -> ImageDataset:
    path = Path(cfg.path) if cfg.path else CALTECH101_ZIP
    if not path.exists():
        raise DatasetUnavailableError(
            f"Caltech-101 is not at {path}: set dataset.path to a folder or .zip of its class folders "
            "(e.g. 101_ObjectCategories), or use dataset=shapes, which works offline"
        )
    return load_class_folder(path, cfg.names_file, cache_dir, name="caltech101")


def _folder(cfg: DatasetConfig, cache_dir: Path) -> ImageDataset:
    if not cfg.path:
        raise FedtinaError("dataset=folder needs dataset.path: a directory or .zip with one folder per class")
    return load_class_folder(cfg.path, cfg.names_file, cache_dir)


def load_dataset(cfg: DatasetConfig, cache_dir: Path) -> ImageDataset:
    """The dataset named by `cfg.name`, cached under `cache_dir/datasets/`."""
    if cfg.name == "shapes":
        return load_shapes(cfg, cache_dir)
    if cfg.name == "cifar100":
        return load_cifar100(cfg.path, cfg.download, cache_dir)
    if cfg.name == "folder":
        return _folder(cfg, cache_dir)
    if cfg.name == "caltech101":
        return _caltech101(cfg, cache_dir)
    raise FedtinaError(f"unknown dataset {cfg.name!r}; valid: {', '.join(DATASETS)}")
