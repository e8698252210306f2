"""The server's probe set: fixed label sets scored on the server's own held-out images, so that a Tina refresh is
adopted only when it does not make Tina worse (fedtina/tina/service.py, `TinaService.try_refresh`).

Why a probe: a refresh trains Tina on what clients uploaded. Where clients hold few labels their fine-tunes barely
move, the zoo fills with Tina's own outputs, and a generator refreshed on its own samples drifts (the self-consuming
loop of Alemohammad et al., ICLR 2024; Shumailov et al., Nature 2024). The probe measures the drift directly, on
data no client holds.

* Label sets: the class sets of `n` old clients of the partition, drawn once per run (seeded by the partition's seed):
  seen and unseen classes mixed as the federation mixes them. The set is kept in the run's state, so a resume scores
  on the very same sets.
* Images: the partition's `server_val_idx` (test-part images no client holds, neither to train nor to test).
* Score: the mean top-1 accuracy over the sets of the heads Tina generates from the class names, at the serving
  seed and steps (the server holds no labelled images of unseen classes to prompt with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fedtina.zoo.heads import Head, accuracy

PROBE_SEED_OFFSET = 7919   # the probe's draw is its own stream, not the partition's


@dataclass(frozen=True)
class ProbeSet:
    """Label sets (dataset class ids) and, per set, the server's held-out features and positions."""

    class_sets: tuple[tuple[int, ...], ...]
    data: tuple[tuple[np.ndarray, np.ndarray], ...]
    names: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.class_sets)

    def score(self, generate: Callable[[list[list[str]]], list[Head]]) -> float:
        """Mean accuracy over the sets of the heads `generate(label sets)` returns (NaN for an empty probe)."""
        if not self.class_sets:
            return float("nan")
        heads = generate([list(n) for n in self.names])
        return float(np.mean([accuracy(h, x, y) for h, (x, y) in zip(heads, self.data)]))


def draw_class_sets(partition, labels: np.ndarray, n: int) -> list[tuple[int, ...]]:
    """The class sets of `n` distinct old clients (all of them if fewer), in an order seeded by the partition's seed;
    only classes the server holds images of (`labels`: the dataset's) are kept, and a set left with fewer than two
    is skipped (one class is not a task)."""
    held = set(np.unique(np.asarray(labels)[np.asarray(partition.server_val_idx, dtype=np.int64)]).tolist())
    seed = partition.config.seed
    old = [c for c in partition.clients if not c.is_new]
    rng = np.random.default_rng([int(seed), PROBE_SEED_OFFSET])
    out: list[tuple[int, ...]] = []
    for i in rng.permutation(len(old)):
        kept = tuple(int(c) for c in old[i].class_ids if int(c) in held)
        if len(kept) >= 2:
            out.append(kept)
        if len(out) == n:
            break
    return out


def probe_set(class_sets: Sequence[Sequence[int]], class_names: Sequence[str], val_data) -> ProbeSet:
    """`val_data(class_ids)` -> (features, positions): the server's held-out images (ServerReference.val_data)."""
    sets = tuple(tuple(int(c) for c in s) for s in class_sets)
    return ProbeSet(sets, tuple(val_data(s) for s in sets), tuple(tuple(class_names[c] for c in s) for s in sets))
