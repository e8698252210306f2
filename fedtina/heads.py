"""Linear classification heads on frozen features: the object Tina generates and clients use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Head:
    """A personalized classifier head: one row (and bias) per class, in logit order."""

    class_names: tuple[str, ...]
    weight: np.ndarray   # float32 [k, d]
    bias: np.ndarray     # float32 [k]

    @property
    def k(self) -> int:
        return len(self.class_names)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias

    def params(self) -> dict[str, np.ndarray]:
        return {"head.weight": self.weight, "head.bias": self.bias}
