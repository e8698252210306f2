"""Class-folder datasets, read from a directory or a .zip: one folder per class, images anywhere inside it.

    root/                         or  root.zip
      cougar_body/image_0001.jpg        101_ObjectCategories/cougar_body/image_0001.jpg   (a wrapper is skipped)
      Faces_easy/a/b/x.png

Images are decoded with Pillow, converted to RGB and resized (squashed, no crop) to 32x32. Class order is the sorted
folder ids, image order the sorted paths, so a dataset loads identically everywhere. Folder names become readable
class names through `clean_class_name`, or through an optional names file of `id<TAB>readable name` lines.

This module also holds the .npz cache helpers that every loader uses (`cached_dataset`, `read_dataset_npz`,
`write_dataset_npz`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from fedtina.config import DatasetConfig, LimitsConfig
from fedtina.data.archive import IMAGE_LIMITS, SizeCheck, check_zip_member, read_bounded
from fedtina.data.base import ImageDataset, clean_class_name, printable
from fedtina.data.registry import Dataset, register
from fedtina.errors import DatasetUnavailableError, FedtinaError
from fedtina.io import atomic_write, cache_lock

log = logging.getLogger(__name__)

FOLDER_VERSION = 1        # bump when decoding changes: it is part of the cache key
IMAGE_SIZE = 32
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})


# ----------------------------------------------------------------------------------------------------------------
# The .npz cache shared by the loaders.


def write_dataset_npz(ds: ImageDataset, path: Path) -> None:
    """Save images, labels and class names to `path` atomically (temporary file in the same folder, then rename)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=ds.images, labels=ds.labels, class_names=np.array(ds.class_names, dtype=np.str_))

    atomic_write(path, write)


def read_dataset_npz(path: Path, name: str, warn: bool = True) -> ImageDataset | None:
    """The dataset cached at `path`, or None when there is none or it is unreadable (the caller then rebuilds it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return ImageDataset(name=name, images=z["images"], labels=z["labels"].astype(np.int64),
                                class_names=[str(n) for n in z["class_names"]])
    except Exception as e:  # a truncated or foreign file is not fatal: it is rebuilt
        if warn:
            log.warning("ignoring unreadable dataset cache %s (%s); rebuilding it", path, e)
        return None


def cached_dataset(path: Path | None, name: str, build: Callable[[], ImageDataset]) -> ImageDataset:
    """The dataset cached at `path`, or `build()` cached there (no `path`: just `build()`). The build runs under the
    cache lock, so a second process waits and reads the first one's file. An unreadable cache file is rebuilt over:
    a dataset is regenerated from its source (same key, same images), unlike the cached products built from it."""
    if path is None:
        return build()
    ds = read_dataset_npz(path, name, warn=False)
    if ds is not None:
        return ds
    with cache_lock(path):
        ds = read_dataset_npz(path, name)  # another process may have built it while we waited
        if ds is None:
            ds = build()
            write_dataset_npz(ds, path)
    return ds


# ----------------------------------------------------------------------------------------------------------------
# Listing a directory or a zip as relative POSIX paths.


@dataclass(frozen=True)
class _Source:
    """Image files of a directory or zip: relative POSIX paths, all directories, a reader, and a cache-key stamp."""

    files: list[PurePosixPath]
    dirs: set[PurePosixPath]
    read: Callable[[PurePosixPath], bytes]
    stamp: str


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image(p: PurePosixPath) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


@contextmanager
def _dir_source(root: Path) -> Iterator[_Source]:
    files, dirs, stamp = [], set(), hashlib.sha256()
    sizes = SizeCheck(root, IMAGE_LIMITS)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        if rel.parts and _hidden(rel.parts):
            dirnames.clear()
            continue
        if rel.parts:
            dirs.add(rel)
        for fn in sorted(filenames):
            p = rel / fn
            if _is_image(p) and not _hidden(p.parts):
                st = os.stat(os.path.join(dirpath, fn))
                if not stat.S_ISREG(st.st_mode):   # a link to /dev/zero would be read for ever
                    raise FedtinaError(f"{root}: {str(p)!r} is not a regular file (a device or a fifo); remove it")
                sizes.add(str(p), st.st_size)
                stamp.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                files.append(p)

    def read(p: PurePosixPath) -> bytes:
        with open(root / p, "rb") as f:
            return read_bounded(f, IMAGE_LIMITS.member, root, str(p))

    yield _Source(files, dirs, read, stamp.hexdigest())


@contextmanager
def _zip_source(path: Path) -> Iterator[_Source]:
    """A zip's images, every member checked before any is read (fedtina.data.archive): safe paths, no links, each
    image's declared size and their total within IMAGE_LIMITS; reads are bounded by the declared size."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FedtinaError(f"{path} is not a readable zip file ({e})") from None
    with zf:
        files, dirs, infos = [], set(), {}
        sizes = SizeCheck(path, IMAGE_LIMITS)
        for info in zf.infolist():
            p = check_zip_member(path, info)
            if not p.parts or _hidden(p.parts):
                continue
            dirs.update(p.parents[:-1])       # every ancestor but "."
            if info.is_dir():
                dirs.add(p)
            elif _is_image(p):
                sizes.add(info.filename, info.file_size)
                files.append(p)
                infos[p] = info

        def read(p: PurePosixPath) -> bytes:
            with zf.open(infos[p]) as f:
                return read_bounded(f, infos[p].file_size, path, infos[p].filename)

        st = path.stat()
        yield _Source(sorted(files), dirs, read, f"{st.st_size}:{st.st_mtime_ns}")


def _find_class_root(src: _Source, where: Path) -> PurePosixPath:
    """The folder whose subfolders are the classes: the root, or below a chain of single wrapper folders."""
    root = PurePosixPath(".")
    while True:
        children = {d for d in src.dirs if d.parent == root}
        direct_images = any(f.parent == root for f in src.files)
        if len(children) != 1 or direct_images:
            return root
        (child,) = children
        has_grandchildren = any(d.parent == child for d in src.dirs)
        if not has_grandchildren:     # a single class folder, not a wrapper: report it as too few classes later
            return root
        log.info("%s: descending into wrapper folder %s", where, child)
        root = child


# ----------------------------------------------------------------------------------------------------------------
# Names file and decoding.


def read_names_file(path: str | Path) -> dict[str, str]:
    """`id<TAB>readable name` lines -> {id: name}. Blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FedtinaError(f"names file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FedtinaError(f"names file {path} is not UTF-8 text ({err})") from None
    names: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        key, value = (parts[0].strip(), " ".join(printable(parts[1]).split())) if len(parts) == 2 else ("", "")
        if not key or not value:   # a name of control characters only is no name
            raise FedtinaError(f"names file {path} line {n}: expected 'id<TAB>readable name', got {line!r}")
        if key in names:
            raise FedtinaError(f"names file {path} line {n}: id {key!r} is given twice")
        names[key] = value
    return names


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Image file bytes -> uint8 [32, 32, 3] (any mode -> RGB, any size -> 32x32)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))   # JPEG: decode big images at a reduced scale
            rgb = _to_rgb(img)
    except Exception as e:
        raise FedtinaError(f"cannot decode image {where}: {e}") from None
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(img):
    """A Pillow image -> RGB. 16-bit greyscale (PNG's "I;16" modes, or "I") is scaled to 8 bits: Pillow's own
    conversion clips every value above 255, so a 16-bit image came out pure white."""
    from PIL import Image

    if img.mode == "I" or img.mode.startswith("I;16"):
        grey = np.asarray(img, dtype=np.float64) / 257.0     # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _readable_names(ids: list[str], names: dict[str, str], where: Path,
                    max_chars: int = LimitsConfig.max_name_chars) -> list[str]:
    readable = [names.get(i) or clean_class_name(i) for i in ids]
    owner: dict[str, str] = {}
    for i, r in zip(ids, readable):
        if not r:
            raise FedtinaError(f"{where}: class folder {i!r} gives an empty class name; name it in a names file")
        if len(r) > max_chars:
            raise FedtinaError(f"{where}: class folder {i[:40]!r}... gives a class name of {len(r):,} characters, "
                               f"more than limits.max_name_chars={max_chars}; name it in a names file")
        if r in owner:
            raise FedtinaError(f"{where}: class folders {owner[r]!r} and {i!r} both map to the class name {r!r}; "
                               "rename one or give it a distinct name in a names file")
        owner[r] = i
    return readable


def _cache_key(path: Path, src: _Source, names_file: Path | None) -> str:
    h = hashlib.sha256(f"v{FOLDER_VERSION}\0{path.resolve()}\0{src.stamp}\0".encode())
    if names_file is not None:
        h.update(names_file.read_bytes())
    return h.hexdigest()[:16]


def _class_files(src: _Source, where: Path) -> tuple[list[str], list[list[PurePosixPath]]]:
    """Sorted class folder ids and, per class, its sorted image files. Empty folders are skipped with a warning."""
    root = _find_class_root(src, where)
    by_class: dict[str, list[PurePosixPath]] = {d.name: [] for d in src.dirs if d.parent == root}
    for f in src.files:
        rel = f.relative_to(root)
        if len(rel.parts) >= 2:                 # a loose file next to the class folders belongs to no class
            by_class.setdefault(rel.parts[0], []).append(f)
    empty = sorted(c for c, fs in by_class.items() if not fs)
    if empty:
        log.warning("%s: skipping %d class folder(s) without images: %s", where, len(empty),
                    ", ".join(map(repr, empty)))
    ids = sorted(c for c, fs in by_class.items() if fs)
    if len(ids) < 2:
        found = ", ".join(map(repr, ids)) or "none"
        raise FedtinaError(f"{where}: found {len(ids)} class folder(s) with images ({found}); a "
                           f"class-folder dataset needs >= 2 folders of {'/'.join(sorted(IMAGE_EXTENSIONS))} images")
    return ids, [sorted(by_class[c]) for c in ids]


def load_class_folder(path: str | Path, names_file: str | Path | None = None, cache_dir: str | Path | None = None,
                      name: str | None = None) -> ImageDataset:
    """Read a class-folder dataset from a directory or a .zip (see the module doc); cached as .npz in `cache_dir`.

    `name` defaults to the path's stem. Empty class folders are skipped with a warning; fewer than two classes with
    images is an error.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetUnavailableError(f"class-folder dataset {path} does not exist (give a directory or a .zip of "
                                      "class folders)")
    name = name or (path.stem if path.is_file() else path.name)
    names_path = Path(names_file).expanduser() if names_file else None
    names = read_names_file(names_path) if names_path else {}
    with (_zip_source(path) if path.is_file() else _dir_source(path)) as src:
        cache = None
        if cache_dir is not None:
            cache = Path(cache_dir) / "datasets" / f"folder-{_cache_key(path, src, names_path)}.npz"
        return cached_dataset(cache, name, lambda: _read_classes(src, path, names, name))


def _read_classes(src: _Source, path: Path, names: dict[str, str], name: str) -> ImageDataset:
    """Decode every image of an open source into an ImageDataset (labels in sorted folder-id order)."""
    ids, files = _class_files(src, path)
    class_names = _readable_names(ids, names, path)
    images = [decode_image(src.read(f), f"{path}:{f}") for fs in files for f in fs]
    labels = np.repeat(np.arange(len(ids), dtype=np.int64), [len(fs) for fs in files])
    return ImageDataset(name=name, images=np.stack(images), labels=labels, class_names=class_names)


@dataclass
class FolderConfig(DatasetConfig):
    name: str = "folder"              # path (required): a directory or .zip with one folder per class


def _load_folder(cfg: DatasetConfig, cache_dir: Path) -> ImageDataset:
    if not cfg.path:
        raise FedtinaError("dataset=folder needs dataset.path: a directory or .zip with one folder per class")
    return load_class_folder(cfg.path, cfg.names_file, cache_dir)


register(Dataset("folder", FolderConfig, _load_folder))
