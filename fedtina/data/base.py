"""The in-memory image dataset every loader returns."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from fedtina.errors import UnknownClassError


def printable(text: str) -> str:
    """`text` without control and format characters (an ESC sequence in a folder name would drive the terminal that
    logs it): each becomes a space."""
    return "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)


def clean_class_name(raw: str) -> str:
    """Folder name -> text a text encoder reads well: `cougar_body` -> "cougar body", `Faces_easy` -> "faces easy";
    control characters are dropped (`printable`)."""
    text = re.sub(r"^\d+[._-]", "", printable(raw).strip())   # "001.ak47" style numeric prefixes
    text = re.sub(r"[_\-.]+", " ", text)
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)        # camelCase -> camel case
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass(frozen=True)
class ImageDataset:
    """All images of one dataset in memory: uint8 [N, 32, 32, 3], int64 labels, one readable name per class."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be uint8 [N,H,W,3], got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(set(self.class_names)) != len(self.class_names):
            dup = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
            raise ValueError(f"{self.name}: duplicated class names {dup}")
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(self.class_names)})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise UnknownClassError(
                f"class {name!r} is not in dataset {self.name!r} ({self.num_classes} classes, e.g. "
                f"{', '.join(self.class_names[:5])})"
            ) from None

    @property
    def fingerprint(self) -> str:
        """Short content hash, used in cache keys so a changed dataset never reuses stale features."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update("\n".join(self.class_names).encode())
        h.update(self.labels.astype(np.int64).tobytes())
        h.update(self.images[:: max(1, len(self.images) // 512)].tobytes())
        return h.hexdigest()[:12]
