"""BaseRows: the head the server already has for any class names, which residual Tina generates relative to.

The base row of a class is exactly the `selection` baseline's (`fedtina.heads.selection_head`): the generic model's
row for a seen class, else the row of the seen class whose name embedding is most cosine-similar ("borrowed").
Residual Tina is told which of the two it got, since a borrowed row is a much rougher start than an own one.

Training has no unseen classes, so it simulates them by leave-one-out (`borrowed_tokens`): a seen class borrows the
row of the nearest-named *other* seen class, as it would if it had been left out of the generic model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fedtina.errors import FedtinaError, UnknownClassError
from fedtina.heads import generic_rows, selection_head

OWN, BORROWED = 0, 1   # indicator values fed to the network


class BaseRows:
    """{seen class name: generic (row, bias)} + the text encoder that finds the nearest seen name of other names."""

    def __init__(self, rows: Mapping[str, tuple[np.ndarray, float]], encoder: Any) -> None:
        if len(rows) < 2:
            raise FedtinaError(f"BaseRows needs at least 2 seen classes (leave-one-out), got {len(rows)}")
        self.rows = {n: (np.asarray(w, np.float32), np.float32(b)) for n, (w, b) in rows.items()}
        self.encoder = encoder
        self._emb: dict[str, np.ndarray] = {}   # name -> raw embedding; seen names stay cached for every lookup

    @classmethod
    def from_bank(cls, bank: Any, class_names: Sequence[str], encoder: Any) -> "BaseRows":
        """From a FeatureBank's generic head (`class_names` maps class ids to names)."""
        return cls(generic_rows(bank, class_names), encoder)

    @property
    def feature_dim(self) -> int:
        return len(next(iter(self.rows.values()))[0])

    def _embed(self, names: list[str]) -> np.ndarray:
        missing = [n for n in dict.fromkeys(names) if n not in self._emb]
        if missing:
            self._emb.update(zip(missing, np.asarray(self.encoder.embed_names(missing), np.float32)))
        return np.stack([self._emb[n] for n in names])

    def tokens(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Base tokens (raw ``concat(row, bias)``, float32 [n, d+1]) and indicator (int64 [n], OWN / BORROWED)."""
        head = selection_head(names, self.rows, self._embed)
        borrowed = np.array([n not in self.rows for n in head.class_names], dtype=np.int64)
        return np.concatenate([head.weight, head.bias[:, None]], axis=1), borrowed

    def borrowed_tokens(self, names: Sequence[str]) -> np.ndarray:
        """Leave-one-out base tokens [n, d+1] of seen classes: the row of the nearest-named other seen class."""
        unknown = [n for n in names if n not in self.rows]
        if unknown:
            raise UnknownClassError(f"classes {unknown[:5]} have no generic row: residual Tina trains only on "
                                    f"seen classes")
        seen = list(self.rows)
        pos = {n: i for i, n in enumerate(seen)}
        emb = self._embed(list(names) + seen)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        sim = emb[: len(names)] @ emb[len(names):].T
        sim[np.arange(len(names)), [pos[n] for n in names]] = -np.inf   # never borrow from itself
        donors = [seen[j] for j in sim.argmax(axis=1)]
        return np.stack([np.append(*self.rows[n]) for n in donors]).astype(np.float32)

    def __repr__(self) -> str:
        return f"BaseRows({len(self.rows)} seen classes, d={self.feature_dim})"
