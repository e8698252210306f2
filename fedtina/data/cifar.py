"""CIFAR-100 through torchvision, train and test merged into one pool (the protocol re-splits it).

Never waits on a download that cannot happen: when the files are absent and downloading is off or the host is
unreachable (`fedtina.net.can_reach`), it raises `DatasetUnavailableError` at once, saying where to put the files.
The merged arrays are cached as .npz, so later loads need neither torchvision nor the original files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
import os
import shutil
from pathlib import Path

import numpy as np

from fedtina import net
from fedtina.config import DatasetConfig, resolve_cache_dir
from fedtina.data.archive import CIFAR_LIMITS, extract_tar
from fedtina.data.base import ImageDataset, clean_class_name
from fedtina.data.folder import cached_dataset
from fedtina.data.registry import Dataset, register
from fedtina.errors import DatasetUnavailableError

log = logging.getLogger(__name__)

CIFAR_HOST = "www.cs.toronto.edu"
CIFAR_URL = f"https://{CIFAR_HOST}/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
CIFAR_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"   # torchvision's checksum of the archive
FOLDER = "cifar-100-python"
CIFAR_VERSION = 1


def _root(root: str | Path | None, cache_dir: str | Path | None) -> Path:
    """The download root: given, or `<cache>/datasets/cifar100`. A path to the extracted folder means its parent."""
    if root is None:
        return Path(cache_dir or resolve_cache_dir(None)) / "datasets" / "cifar100"
    path = Path(root).expanduser()
    return path.parent if path.name == FOLDER else path


def _ensure_files(root: Path, download: bool) -> None:
    """Make `root/cifar-100-python/` exist: extract a present archive, else download it first when `download` and
    the host answers. Raise DatasetUnavailableError at once when the files are absent and cannot be fetched."""
    if (root / FOLDER).is_dir():
        return
    if not (root / ARCHIVE).is_file():
        if not (download and net.can_reach(CIFAR_HOST)):
            why = "downloading is off (dataset.download=false)" if not download else f"{CIFAR_HOST} cannot be reached"
            raise DatasetUnavailableError(
                f"CIFAR-100 is not in {root} and {why}. Put {ARCHIVE} (from {CIFAR_URL}) or its extracted {FOLDER}/ "
                f"folder in {root} (or point dataset.path at the folder holding it); or use dataset=shapes, which "
                "works offline.")
        from torchvision.datasets.utils import download_url

        download_url(CIFAR_URL, str(root), ARCHIVE, CIFAR_MD5)
    _extract(root)


def _extract(root: Path) -> None:
    """`root/cifar-100-python.tar.gz` -> `root/cifar-100-python/`, every member checked before anything is written
    (fedtina.data.archive), through a temporary folder: a refused or broken archive leaves nothing behind."""
    log.info("extracting %s", root / ARCHIVE)
    tmp = root / f".{FOLDER}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        extract_tar(root / ARCHIVE, tmp, CIFAR_LIMITS)
        if not (tmp / FOLDER).is_dir():
            raise DatasetUnavailableError(f"{root / ARCHIVE} holds no {FOLDER}/ folder; replace it with a fresh "
                                          f"{ARCHIVE} from {CIFAR_URL}")
        os.replace(tmp / FOLDER, root / FOLDER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cifar100(root: str | Path | None, download: bool, cache_dir: str | Path | None) -> ImageDataset:
    """All 60,000 CIFAR-100 images (50k train + 10k test, in that order) with cleaned fine label names."""
    cache = Path(cache_dir) / "datasets" / f"cifar100-v{CIFAR_VERSION}.npz" if cache_dir is not None else None
    return cached_dataset(cache, "cifar100", lambda: _read_cifar100(_root(root, cache_dir), download))


def _read_cifar100(root: Path, download: bool) -> ImageDataset:
    """The original archive under `root` (downloaded first when `download` and the host is reachable)."""
    _ensure_files(root, download)
    try:
        from torchvision.datasets import CIFAR100
    except ImportError as e:
        raise DatasetUnavailableError(f"dataset=cifar100 needs torchvision ({e}); use dataset=shapes") from None
    try:
        parts = [CIFAR100(str(root), train=train, download=False) for train in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DatasetUnavailableError(f"CIFAR-100 in {root / FOLDER} is incomplete or corrupted ({e}); replace it "
                                      f"with a fresh {ARCHIVE} from {CIFAR_URL}") from None
    return ImageDataset(
        name="cifar100",
        images=np.ascontiguousarray(np.concatenate([p.data for p in parts]), dtype=np.uint8),
        labels=np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts]),
        class_names=[clean_class_name(c) for c in parts[0].classes],
    )


@dataclass
class Cifar100Config(DatasetConfig):
    name: str = "cifar100"            # path: the download root (offline: put cifar-100-python.tar.gz there)


register(Dataset("cifar100", Cifar100Config, lambda cfg, cache_dir: load_cifar100(cfg.path, cfg.download, cache_dir)))
