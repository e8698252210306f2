"""The dataset registry: a dataset is one module under `fedtina/data/` that calls `register(Dataset(...))` with its
name, its options dataclass (a DatasetConfig subclass holding its defaults) and its loader. fedtina/data/__init__.py
imports every module of the package, `load_dataset` looks the name up, and the options reach Hydra's ConfigStore as
`fedtina/dataset/<name>`, which `configs/dataset/<name>.yaml` places at `dataset` (and where it may choose other
values, e.g. more backbone epochs). Adding a dataset is its module and a two-line YAML file."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from fedtina.config import DATASETS, DatasetConfig
from fedtina.data.base import ImageDataset
from fedtina.errors import FedtinaError


@dataclass(frozen=True)
class Dataset:
    name: str
    options: type                                             # a DatasetConfig subclass: this dataset's defaults
    load: Callable[[DatasetConfig, Path], ImageDataset]      # (its options, the cache dir) -> the dataset


REGISTRY: dict[str, Dataset] = {}


def register(ds: Dataset) -> Dataset:
    if ds.name in REGISTRY:
        raise FedtinaError(f"dataset {ds.name!r} is registered twice")
    if not issubclass(ds.options, DatasetConfig) or ds.options().name != ds.name:
        raise FedtinaError(f"dataset {ds.name!r}: its options must be a DatasetConfig subclass with name={ds.name!r}")
    REGISTRY[ds.name] = ds
    DATASETS[ds.name] = ds.options
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="fedtina/dataset", name=ds.name, node=asdict(ds.options()))
    return ds


def names() -> list[str]:
    """The registered datasets, the default first."""
    return sorted(REGISTRY, key=lambda n: (n != DatasetConfig.name, n))


def dataset(name: str) -> Dataset:
    """The registered dataset `name` (importing this module imports the package, which registers them all); an
    unknown one is one line listing them."""
    if name not in REGISTRY:
        raise FedtinaError(f"dataset.name={name!r} is invalid; valid: {names()}")
    return REGISTRY[name]
