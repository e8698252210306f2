"""The benchmark's personalization tasks on the seeded protocol (fedtina/data/split.py): their class sets, their
images' features, and the k-way accuracy of heads on them. Classes are split into seen and unseen; each class's
images into a backbone, a zoo and a test part. A task trains (fine-tuning, shots) on zoo-part images only and is
scored on test-part images. ID tasks: new subsets of seen classes (none identical to a zoo task); OOD tasks: subsets
holding unseen classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtina.config import BenchConfig
from fedtina.data.split import sample_ood_tasks, sample_tasks
from fedtina.zoo.heads import Head, accuracy, generic_rows, selection_head


@dataclass
class BenchTask:
    """One personalization task: its classes and their zoo-part (train) and test-part features; ``train_p``: the
    zoo-part images' features for image prompts (the backbone's, or CLIP's: encoder.image_prompts)."""

    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_p: np.ndarray


def task_data(assets: Any, class_ids: tuple[int, ...]) -> BenchTask:
    labels, feats = assets.dataset.labels, assets.bank.features
    pos = {c: i for i, c in enumerate(class_ids)}

    def part(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = idx[np.isin(labels[idx], class_ids)]
        return feats[idx], np.array([pos[c] for c in labels[idx]], dtype=np.int64), idx

    names = tuple(assets.dataset.class_names[c] for c in class_ids)
    train_x, train_y, train_idx = part(assets.split.zoo_idx)
    test_x, test_y, _ = part(assets.split.test_idx)
    return BenchTask(class_ids, names, train_x, train_y, test_x, test_y, assets.prompt_features[train_idx])


def sample_task_sets(assets: Any, cfg: BenchConfig) -> dict[str, list[tuple[int, ...]]]:
    """`cfg.num_tasks` class sets of `cfg.k` classes per set, seeded by `cfg.seed`: ID ones exclude every zoo task;
    OOD ones hold `cfg.ood_unseen` unseen classes each."""
    rng = np.random.default_rng(cfg.seed)
    name_to_id = {n: i for i, n in enumerate(assets.dataset.class_names)}
    zoo_sets = {frozenset(name_to_id[n] for n in e.class_names) for e in assets.zoo.entries()}
    id_tasks = sample_tasks(assets.split.seen, cfg.num_tasks, cfg.k, cfg.k, rng, exclude=zoo_sets)
    ood_tasks = sample_ood_tasks(assets.split.seen, assets.split.unseen, cfg.num_tasks, cfg.k, cfg.ood_unseen, rng)
    return {"id": id_tasks, "ood": ood_tasks}


def selection_heads(assets: Any, tasks: list[BenchTask]) -> list[Head]:
    rows = generic_rows(assets.bank, assets.dataset.class_names)
    return [selection_head(t.class_names, rows, assets.encoder.embed_names) for t in tasks]


def score(heads: list[Head], tasks: list[BenchTask]) -> np.ndarray:
    """Each head's accuracy on its task's test-part images."""
    return np.array([accuracy(h, t.test_x, t.test_y) for h, t in zip(heads, tasks)])


def class_recall(heads: list[Head], tasks: list[BenchTask], unseen) -> dict[str, float]:
    """Mean per-class recall on the tasks' test-part images over the (task, class) pairs of unseen classes (class ids
    in `unseen`) and over those of seen classes: an OOD task's accuracy mixes both, and the unseen classes are the
    ones whose rows cannot be recalled from the zoo. nan for a group with no test image."""
    unseen, recall = set(np.asarray(unseen).tolist()), {"unseen": [], "seen": []}
    for h, t in zip(heads, tasks):
        hit = h.predict(t.test_x) == t.test_y
        for c, cid in enumerate(t.class_ids):
            if (t.test_y == c).any():
                recall["unseen" if cid in unseen else "seen"].append(float(hit[t.test_y == c].mean()))
    return {f"{group}_recall": float(np.mean(v)) if v else float("nan") for group, v in recall.items()}
