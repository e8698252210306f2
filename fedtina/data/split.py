"""The evaluation protocol: which classes are seen, which images serve which purpose, and which tasks are asked.

* Classes are split once into **seen** (the generic model and the zoo may use them) and **unseen** (only ever met at
  test time, as new combinations of known words / new names).
* Every class's images are split into **backbone** (generic model), **zoo** (zoo heads, clients' local data) and
  **test** (every accuracy) parts. Unseen classes have no backbone part: those images go to test, so `backbone_idx`
  holds seen classes only.
* `protocol.novel_share` holds that share of the seen classes out of the generic model (**novel** classes): the zoo
  and every task still use them, but their backbone-part images are used by nothing, so `backbone_idx` holds none of
  their images and the generic head has no row for them. Their zoo and test parts, and every other class's parts,
  stay exactly those of `novel_share=0`: the share moves the backbone alone, so every accuracy of both settings is
  measured on the same test images and every zoo head trains on the same images (moving the images to the test part,
  as for unseen classes, would change the test sets of the tasks compared). Without novel classes the three parts
  cover the dataset exactly once.
* A **task** is a set of class ids (a label set), kept as a tuple in random order: order never matters downstream.

Everything is a pure function of the dataset's labels and a seed.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Collection, Iterable, Iterator

import numpy as np

from fedtina.config import ProtocolConfig
from fedtina.data.base import ImageDataset
from fedtina.errors import FedtinaError, LabelSetError

log = logging.getLogger(__name__)

PARTS = ("backbone", "zoo", "test")
Task = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class ProtocolSplit:
    """Seen/unseen class ids and the image indices of each part (all sorted int64, read-only).

    `novel`: the seen classes the generic model never trained on (`protocol.novel_share`; empty by default);
    `backbone_classes`: the generic model's classes, the rest of the seen ones.
    `labels` are the dataset's labels, so that a split answers per-class questions (`part_of`) on its own.
    Compare splits by `key`, a short hash that also serves in cache keys.
    """

    seen: np.ndarray
    unseen: np.ndarray
    backbone_idx: np.ndarray
    zoo_idx: np.ndarray
    test_idx: np.ndarray
    labels: np.ndarray = field(repr=False)
    novel: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        for name in ("seen", "unseen", "backbone_idx", "zoo_idx", "test_idx", "labels", "novel"):
            arr = np.array(getattr(self, name), dtype=np.int64)   # a private, read-only copy
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if not np.isin(self.novel, self.seen).all():
            raise FedtinaError("split: novel classes must be seen classes")

    @cached_property
    def backbone_classes(self) -> np.ndarray:
        """The generic model's classes: the seen ones less the novel ones (sorted int64, read-only)."""
        out = self.seen[~np.isin(self.seen, self.novel)]
        out.setflags(write=False)
        return out

    @cached_property
    def key(self) -> str:
        h = hashlib.sha256()
        # novel classes only when there are some: a split without them keeps the key it had before they existed
        for arr in (self.seen, self.unseen, self.backbone_idx, self.zoo_idx, self.test_idx) + (
                (self.novel,) if len(self.novel) else ()):
            h.update(len(arr).to_bytes(8, "little"))
            h.update(arr.tobytes())
        return h.hexdigest()[:12]

    def indices(self, part: str) -> np.ndarray:
        """All image indices of one part: "backbone", "zoo" or "test"."""
        if part not in PARTS:
            raise FedtinaError(f"unknown split part {part!r}; valid: {', '.join(PARTS)}")
        return getattr(self, f"{part}_idx")

    def part_of(self, classes: int | Iterable[int], part: str) -> np.ndarray:
        """Sorted image indices of `part` that belong to one class id or to any of several."""
        idx = self.indices(part)
        wanted = np.atleast_1d(np.asarray(classes if np.isscalar(classes) else list(classes), dtype=np.int64))
        return idx[np.isin(self.labels[idx], wanted)]


# ----------------------------------------------------------------------------------------------------------------
# Making the split.


def _check_fractions(cfg: ProtocolConfig) -> None:
    checks = [
        ("seen_fraction", cfg.seen_fraction, 0 < cfg.seen_fraction <= 1, "in (0, 1]"),
        ("backbone_fraction", cfg.backbone_fraction, 0 <= cfg.backbone_fraction < 1, "in [0, 1)"),
        ("zoo_fraction", cfg.zoo_fraction, 0 < cfg.zoo_fraction < 1, "in (0, 1)"),
    ]
    for name, value, ok, want in checks:
        if not ok:
            raise FedtinaError(f"protocol.{name} must be {want}, got {value}")
    if cfg.backbone_fraction + cfg.zoo_fraction >= 1:
        raise FedtinaError(f"protocol.backbone_fraction + protocol.zoo_fraction must be < 1 to leave test images, got "
                           f"{cfg.backbone_fraction} + {cfg.zoo_fraction}")


def part_sizes(n: int, backbone_fraction: float, zoo_fraction: float) -> tuple[int, int, int]:
    """(backbone, zoo, test) image counts for a class of n images: the fractions rounded, then at least 1 zoo and 1
    test image (2 test images from 8 images up), taken from the backbone first."""
    min_test = 2 if n >= 8 else 1
    if n < 1 + min_test:
        raise ValueError(f"a class needs >= 2 images, got {n}")
    zoo = max(1, round(zoo_fraction * n))
    backbone = round(backbone_fraction * n)
    short = max(0, min_test - (n - backbone - zoo))
    take = min(short, backbone)
    backbone, zoo = backbone - take, zoo - (short - take)
    return backbone, zoo, n - backbone - zoo


def make_split(ds: ImageDataset, cfg: ProtocolConfig) -> ProtocolSplit:
    """Split classes into seen/unseen (and seen into novel/backbone classes) and each class's images into
    backbone/zoo/test, deterministically in cfg.seed.

    The class split, the novel pick and each class's image shuffle use separate streams, so a class's zoo and test
    images do not depend on the other classes, nor on whether the class is seen or novel, and the seen/unseen
    classes do not depend on `novel_share`.
    """
    _check_fractions(cfg)
    num = ds.num_classes
    n_seen = min(num, round(cfg.seen_fraction * num))
    if n_seen < 2:
        raise FedtinaError(f"protocol.seen_fraction={cfg.seen_fraction} of {num} classes leaves {n_seen} seen "
                           "class(es); need >= 2")
    order = np.random.default_rng([cfg.seed, 0]).permutation(num)
    is_seen = np.zeros(num, dtype=bool)
    is_seen[order[:n_seen]] = True
    is_novel = np.zeros(num, dtype=bool)
    is_novel[novel_classes(np.flatnonzero(is_seen), cfg)] = True

    labels = np.asarray(ds.labels, dtype=np.int64)
    by_class = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num))])
    parts: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
    for c in range(num):
        idx = by_class[bounds[c]:bounds[c + 1]]
        try:
            nb, nz, _ = part_sizes(len(idx), cfg.backbone_fraction, cfg.zoo_fraction)
        except ValueError:
            raise FedtinaError(f"class {ds.class_names[c]!r} of dataset {ds.name!r} has {len(idx)} image(s); the "
                               "protocol needs >= 2 per class (1 zoo, 1 test)") from None
        idx = np.random.default_rng([cfg.seed, 1, c]).permutation(idx)
        backbone, zoo, test = idx[:nb], idx[nb:nb + nz], idx[nb + nz:]
        if not is_seen[c]:
            backbone, test = idx[:0], np.concatenate([backbone, test])
        elif is_novel[c]:
            backbone = idx[:0]   # unused: see the module docstring
        parts["backbone"].append(backbone)
        parts["zoo"].append(zoo)
        parts["test"].append(test)
    return ProtocolSplit(
        seen=np.flatnonzero(is_seen),
        unseen=np.flatnonzero(~is_seen),
        backbone_idx=np.sort(np.concatenate(parts["backbone"])),
        zoo_idx=np.sort(np.concatenate(parts["zoo"])),
        test_idx=np.sort(np.concatenate(parts["test"])),
        labels=labels,
        novel=np.flatnonzero(is_novel),
    )


def novel_classes(seen: np.ndarray, cfg: ProtocolConfig) -> np.ndarray:
    """The seen classes held out of the generic model: round(novel_share * len(seen)) of them (at least one for a
    positive share), picked by a stream of their own. The generic model keeps at least 2 classes."""
    if cfg.novel_share == 0:
        return np.zeros(0, np.int64)
    n = max(1, round(cfg.novel_share * len(seen)))
    if len(seen) - n < 2:
        raise FedtinaError(f"protocol.novel_share={cfg.novel_share} of {len(seen)} seen classes leaves the generic "
                           f"model {len(seen) - n} class(es); need >= 2")
    return np.sort(np.random.default_rng([cfg.seed, 2]).choice(seen, n, replace=False))


def check_task_size(split: ProtocolSplit, k: int, key: str, novel_share: float) -> None:
    """Before anything trains: a task of `k` classes (option `key`) needs k seen classes, and the generic model at
    least k classes of its own (a generic model over fewer classes than one task holds has no task's worth of
    distinctions shaped into its features, and selection would repeat its rows inside a task)."""
    n_seen, n_backbone = len(split.seen), len(split.backbone_classes)
    if k > n_seen:
        raise FedtinaError(f"{key}={k} exceeds the {n_seen} seen classes (protocol.seen_fraction)")
    if k > n_backbone:
        raise FedtinaError(f"protocol.novel_share={novel_share} leaves the generic model {n_backbone} of the "
                           f"{n_seen} seen classes, fewer than {key}={k}: lower protocol.novel_share")


# ----------------------------------------------------------------------------------------------------------------
# Task sampling.

_ENUMERATE_LIMIT = 2_000_000   # when random draws stall, list every possible task if there are at most this many


def _distinct_tasks(draw: Callable[[], Task], enumerate_all: Callable[[], Iterator[Task]], capacity: int, n: int,
                    exclude: Collection[Iterable[int]], rng: np.random.Generator, what: str) -> list[Task]:
    """`n` tasks distinct as sets and absent from `exclude`: random draws first, then (when draws keep colliding)
    a uniform pick among every remaining task. Raises a LabelSetError when fewer than `n` exist."""
    banned = {frozenset(int(c) for c in t) for t in exclude}
    if n > capacity:
        raise LabelSetError(f"cannot sample {n} distinct {what}: only {capacity} exist")
    found: set[frozenset[int]] = set()
    tasks: list[Task] = []
    for _ in range(50 * n + 1000):
        if len(tasks) == n:
            return tasks
        task = draw()
        key = frozenset(task)
        if key not in found and key not in banned:
            found.add(key)
            tasks.append(task)
    if len(tasks) == n:
        return tasks
    if capacity > _ENUMERATE_LIMIT:
        raise LabelSetError(f"could only sample {len(tasks)} of {n} distinct {what} ({len(banned)} excluded); "
                            "ask for fewer tasks or widen the class pool")
    rest = [t for t in enumerate_all() if frozenset(t) not in found and frozenset(t) not in banned]
    if len(rest) < n - len(tasks):
        raise LabelSetError(f"cannot sample {n} distinct {what}: only {len(tasks) + len(rest)} exist once the "
                            f"{len(banned)} excluded task(s) are removed")
    for i in rng.choice(len(rest), n - len(tasks), replace=False):
        tasks.append(tuple(int(c) for c in rng.permutation(rest[i])))
    return tasks


def _class_pool(classes: Iterable[int], what: str) -> np.ndarray:
    pool = np.asarray(list(classes), dtype=np.int64)
    if len(np.unique(pool)) != len(pool):
        raise LabelSetError(f"{what} class pool has repeated ids")
    return np.sort(pool)


def sample_tasks(classes: Iterable[int], n: int, k_min: int, k_max: int, rng: np.random.Generator | int,
                 exclude: Collection[Iterable[int]] = frozenset()) -> list[Task]:
    """`n` distinct tasks of k classes each (k uniform in [k_min, k_max]) drawn from `classes`, none in `exclude`."""
    pool = _class_pool(classes, "task")
    rng = np.random.default_rng(rng)
    if not 1 <= k_min <= k_max <= len(pool):
        raise LabelSetError(f"task size must satisfy 1 <= k_min <= k_max <= {len(pool)} classes, got k_min={k_min}, "
                            f"k_max={k_max}")

    def draw() -> Task:
        k = int(rng.integers(k_min, k_max + 1))
        return tuple(int(c) for c in rng.choice(pool, k, replace=False))

    def enumerate_all() -> Iterator[Task]:
        for k in range(k_min, k_max + 1):
            yield from itertools.combinations(pool.tolist(), k)

    capacity = sum(math.comb(len(pool), k) for k in range(k_min, k_max + 1))
    return _distinct_tasks(draw, enumerate_all, capacity, n, exclude, rng,
                           f"tasks of {k_min}-{k_max} classes from {len(pool)}")


def sample_ood_tasks(seen: Iterable[int], unseen: Iterable[int], n: int, k: int, n_unseen: int,
                     rng: np.random.Generator | int, exclude: Collection[Iterable[int]] = frozenset()) -> list[Task]:
    """`n` distinct tasks of `k` classes with exactly `n_unseen` unseen classes (fewer when fewer unseen classes
    exist) and the rest seen, none in `exclude`."""
    seen_pool, unseen_pool = _class_pool(seen, "seen"), _class_pool(unseen, "unseen")
    rng = np.random.default_rng(rng)
    if np.intersect1d(seen_pool, unseen_pool).size:
        raise LabelSetError("seen and unseen class pools overlap")
    if k < 1 or n_unseen < 0:
        raise LabelSetError(f"OOD tasks need k >= 1 and n_unseen >= 0, got k={k}, n_unseen={n_unseen}")
    n_u = min(n_unseen, len(unseen_pool), k)
    if n_u < n_unseen:
        log.warning("OOD tasks: %d unseen classes asked per task, %d used (%d unseen, k=%d)", n_unseen, n_u,
                    len(unseen_pool), k)
    n_s = k - n_u
    if n_s > len(seen_pool):
        raise LabelSetError(f"OOD tasks of k={k} with {n_u} unseen need {n_s} seen classes; only {len(seen_pool)} "
                            "exist")

    def draw() -> Task:
        task = np.concatenate([rng.choice(unseen_pool, n_u, replace=False), rng.choice(seen_pool, n_s, replace=False)])
        return tuple(int(c) for c in rng.permutation(task))

    def enumerate_all() -> Iterator[Task]:
        for u in itertools.combinations(unseen_pool.tolist(), n_u):
            for s in itertools.combinations(seen_pool.tolist(), n_s):
                yield u + s

    capacity = math.comb(len(unseen_pool), n_u) * math.comb(len(seen_pool), n_s)
    return _distinct_tasks(draw, enumerate_all, capacity, n, exclude, rng,
                           f"OOD tasks of {k} classes ({n_u} of {len(unseen_pool)} unseen, {n_s} of "
                           f"{len(seen_pool)} seen)")
