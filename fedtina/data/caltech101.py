"""Caltech-101 at 32x32: a class-folder dataset whose path defaults to the shared zip beside the checkout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedtina.config import DatasetConfig
from fedtina.data.base import ImageDataset
from fedtina.data.folder import load_class_folder
from fedtina.data.registry import Dataset, register
from fedtina.errors import DatasetUnavailableError

CALTECH101_ZIP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "caltech101-32.zip"


@dataclass
class Caltech101Config(DatasetConfig):
    name: str = "caltech101"          # path: a folder or .zip of its class folders; null = CALTECH101_ZIP


def load(cfg: DatasetConfig, cache_dir: Path) -> ImageDataset:
    path = Path(cfg.path) if cfg.path else CALTECH101_ZIP
    if not path.exists():
        raise DatasetUnavailableError(
            f"Caltech-101 is not at {path}: set dataset.path to a folder or .zip of its class folders "
            "(e.g. 101_ObjectCategories), or use dataset=shapes, which works offline"
        )
    return load_class_folder(path, cfg.names_file, cache_dir, name="caltech101")


register(Dataset("caltech101", Caltech101Config, load))
