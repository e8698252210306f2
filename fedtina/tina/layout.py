"""ParamLayout: a personalized model's parameters <-> the token sequence Tina diffuses over.

* **Class tokens**, one per class: ``concat(head.weight[i], head.bias[i])`` -> width ``d + 1`` (the token width).
  Their order is the head's logit order; the network has no positional encoding, so it treats them as a set.
* **Global tokens**: named parameter segments that belong to the whole model rather than to one class (e.g. a
  low-rank adapter on the backbone's last block). Each segment is flattened, zero-padded to a multiple of the token
  width and chunked into tokens; they precede the class tokens and get learned type embeddings in the network. There
  are none by default; adding a segment does not change the class-token path.
* **Normalisation**: per-dimension mean/std over all class tokens of the zoo (and per-element mean/std of the global
  tokens over the zoo's entries). They are fitted once (`fit`) and saved with the checkpoint (`state_tensors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fedtina.errors import FedtinaError

WEIGHT_KEY = "head.weight"
BIAS_KEY = "head.bias"
_STD_FLOOR = 1e-6


@dataclass(frozen=True)
class GlobalSegment:
    """One named, fixed-shape parameter tensor shared by all classes (stored in ``params[name]``)."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.name or self.name in (WEIGHT_KEY, BIAS_KEY):
            raise FedtinaError(f"global segment name {self.name!r} is empty or clashes with the head's parameters")
        if any(s <= 0 for s in self.shape):
            raise FedtinaError(f"global segment {self.name!r} has an empty shape {self.shape}")

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))


class ParamLayout:
    """Maps ``params`` dicts (``head.weight`` [k, d], ``head.bias`` [k], global segments) to tokens and back."""

    def __init__(
        self,
        feature_dim: int,
        global_segments: Sequence[GlobalSegment] = (),
        *,
        class_mean: np.ndarray | None = None,
        class_std: np.ndarray | None = None,
        global_mean: np.ndarray | None = None,
        global_std: np.ndarray | None = None,
    ) -> None:
        if feature_dim <= 0:
            raise FedtinaError(f"feature_dim must be positive, got {feature_dim}")
        self.feature_dim = int(feature_dim)
        self.global_segments = tuple(global_segments)
        names = [s.name for s in self.global_segments]
        if len(set(names)) != len(names):
            raise FedtinaError(f"duplicated global segment names {names}")
        # token range of each segment inside the global tokens
        self._chunks: list[tuple[int, int]] = []
        start = 0
        for seg in self.global_segments:
            n = math.ceil(seg.size / self.token_dim)
            self._chunks.append((start, start + n))
            start += n
        self.num_global_tokens = start

        T, G = self.token_dim, self.num_global_tokens
        self.class_mean = _as_stat(class_mean, (T,), 0.0, "class_mean")
        self.class_std = np.maximum(_as_stat(class_std, (T,), 1.0, "class_std"), _STD_FLOOR)
        self.global_mean = _as_stat(global_mean, (G, T), 0.0, "global_mean")
        self.global_std = np.maximum(_as_stat(global_std, (G, T), 1.0, "global_std"), _STD_FLOOR)

    @property
    def token_dim(self) -> int:
        return self.feature_dim + 1

    # ---------------------------------------------------------------- raw tokens
    def class_tokens(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """``params`` -> float32 [k, d+1] (raw, not normalised)."""
        w = np.asarray(params[WEIGHT_KEY], dtype=np.float32)
        b = np.asarray(params[BIAS_KEY], dtype=np.float32)
        if w.ndim != 2 or w.shape[1] != self.feature_dim or b.shape != (w.shape[0],):
            raise FedtinaError(
                f"head params do not fit the layout: weight {w.shape}, bias {b.shape}, "
                f"expected [k, {self.feature_dim}] and [k]"
            )
        return np.concatenate([w, b[:, None]], axis=1)

    def global_tokens(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """``params`` -> float32 [G, d+1]: each segment flattened, zero-padded and chunked (raw, not normalised)."""
        out = np.zeros((self.num_global_tokens, self.token_dim), dtype=np.float32)
        for seg, (a, b) in zip(self.global_segments, self._chunks):
            if seg.name not in params:
                raise FedtinaError(f"params lack global segment {seg.name!r} (have {sorted(params)})")
            value = np.asarray(params[seg.name], dtype=np.float32)
            if value.shape != seg.shape:
                raise FedtinaError(f"global segment {seg.name!r} has shape {value.shape}, layout says {seg.shape}")
            flat = out[a:b].reshape(-1)  # a view into out
            flat[: seg.size] = value.reshape(-1)
        return out

    def params_from_tokens(self, class_tokens: np.ndarray, global_tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Raw tokens -> params dict (float32 numpy): head.weight, head.bias and every global segment."""
        class_tokens = np.asarray(class_tokens, dtype=np.float32)
        params = {
            WEIGHT_KEY: np.ascontiguousarray(class_tokens[:, : self.feature_dim]),
            BIAS_KEY: np.ascontiguousarray(class_tokens[:, self.feature_dim]),
        }
        if self.global_segments:
            if global_tokens is None or global_tokens.shape != (self.num_global_tokens, self.token_dim):
                got = None if global_tokens is None else global_tokens.shape
                raise FedtinaError(f"expected global tokens [{self.num_global_tokens}, {self.token_dim}], got {got}")
            for seg, (a, b) in zip(self.global_segments, self._chunks):
                flat = np.asarray(global_tokens[a:b], dtype=np.float32).reshape(-1)
                params[seg.name] = flat[: seg.size].reshape(seg.shape).copy()
        return params

    # ---------------------------------------------------------------- normalisation
    def normalize_class(self, tokens: np.ndarray) -> np.ndarray:
        return ((tokens - self.class_mean) / self.class_std).astype(np.float32)

    def denormalize_class(self, tokens: np.ndarray) -> np.ndarray:
        return (tokens * self.class_std + self.class_mean).astype(np.float32)

    def normalize_global(self, tokens: np.ndarray) -> np.ndarray:
        return ((tokens - self.global_mean) / self.global_std).astype(np.float32)

    def denormalize_global(self, tokens: np.ndarray) -> np.ndarray:
        return (tokens * self.global_std + self.global_mean).astype(np.float32)

    def encode(self, params: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``params`` -> normalised (class tokens [k, T], global tokens [G, T])."""
        return self.normalize_class(self.class_tokens(params)), self.normalize_global(self.global_tokens(params))

    def decode(self, class_tokens: np.ndarray, global_tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Normalised tokens -> params dict (the inverse of `encode`)."""
        g = None if global_tokens is None else self.denormalize_global(global_tokens)
        return self.params_from_tokens(self.denormalize_class(class_tokens), g)

    def fit(self, params_list: Iterable[Mapping[str, np.ndarray]]) -> "ParamLayout":
        """A copy of this layout whose statistics are fitted on ``params_list`` (e.g. every zoo entry's params)."""
        cls_tokens, glob_tokens = [], []
        for params in params_list:
            cls_tokens.append(self.class_tokens(params))
            glob_tokens.append(self.global_tokens(params))
        if not cls_tokens:
            raise FedtinaError("cannot fit layout statistics on an empty zoo")
        rows = np.concatenate(cls_tokens, axis=0).astype(np.float64)
        glob = np.stack(glob_tokens).astype(np.float64)
        g_std = glob.std(axis=0) if len(glob) > 1 else np.ones(glob.shape[1:])
        # padding elements of the last chunk are always zero: keep them at mean 0 / std 1
        for seg, (a, b) in zip(self.global_segments, self._chunks):
            pad = (b - a) * self.token_dim - seg.size
            if pad:
                g_std[b - 1].reshape(-1)[self.token_dim - pad:] = 1.0
        return ParamLayout(
            self.feature_dim,
            self.global_segments,
            class_mean=rows.mean(axis=0),
            class_std=rows.std(axis=0) if len(rows) > 1 else np.ones(self.token_dim),
            global_mean=glob.mean(axis=0),
            global_std=g_std,
        )

    # ---------------------------------------------------------------- serialisation
    def spec(self) -> dict[str, Any]:
        """JSON-able description (without the statistics, which are tensors: `state_tensors`)."""
        return {
            "feature_dim": self.feature_dim,
            "global_segments": [{"name": s.name, "shape": list(s.shape)} for s in self.global_segments],
        }

    def state_tensors(self) -> dict[str, np.ndarray]:
        return {
            "class_mean": self.class_mean.astype(np.float32),
            "class_std": self.class_std.astype(np.float32),
            "global_mean": self.global_mean.astype(np.float32),
            "global_std": self.global_std.astype(np.float32),
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], tensors: Mapping[str, np.ndarray] | None = None) -> "ParamLayout":
        """Statistics from ``tensors`` (unknown keys, e.g. an older checkpoint's residual statistics, are ignored)."""
        segments = [GlobalSegment(s["name"], tuple(s["shape"])) for s in spec.get("global_segments", [])]
        tensors = tensors or {}
        return cls(int(spec["feature_dim"]), segments, **{k: tensors.get(k) for k in
                                                         ("class_mean", "class_std", "global_mean", "global_std")})

    def __repr__(self) -> str:
        segs = ", ".join(f"{s.name}{list(s.shape)}" for s in self.global_segments)
        return f"ParamLayout(d={self.feature_dim}, token_dim={self.token_dim}, global=[{segs}])"


def _as_stat(value: np.ndarray | None, shape: tuple[int, ...], default: float, name: str) -> np.ndarray:
    if value is None:
        return np.full(shape, default, dtype=np.float32)
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != shape:
        raise FedtinaError(f"layout statistic {name} has shape {arr.shape}, expected {shape}")
    return arr
