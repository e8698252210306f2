"""The protocol: seen/unseen classes, backbone/zoo/test parts, and task sampling."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedtina.config import ProtocolConfig
from fedtina.data.base import ImageDataset
from fedtina.errors import FedtinaError
from fedtina.data.split import (ProtocolSplit, check_task_size, make_split, part_sizes, sample_ood_tasks,
                                sample_tasks)

SIZES = [2, 3, 5, 7, 8, 9, 13, 20, 40, 11, 6, 30]   # images per class, deliberately uneven and some tiny


def _dataset(sizes=SIZES, seed=0) -> ImageDataset:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))   # interleaved classes
    return ImageDataset("toy", np.zeros((len(labels), 32, 32, 3), np.uint8), labels.astype(np.int64),
                        [f"class {i}" for i in range(len(sizes))])


@pytest.fixture(scope="module")
def ds() -> ImageDataset:
    return _dataset()


@pytest.fixture(scope="module")
def split(ds) -> ProtocolSplit:
    return make_split(ds, ProtocolConfig())


def test_classes_split_into_seen_and_unseen(ds, split):
    assert len(split.seen) == round(0.8 * len(SIZES))
    assert np.array_equal(np.union1d(split.seen, split.unseen), np.arange(len(SIZES)))
    assert np.intersect1d(split.seen, split.unseen).size == 0
    for arr in (split.seen, split.unseen, split.backbone_idx, split.zoo_idx, split.test_idx):
        assert arr.dtype == np.int64 and np.all(np.diff(arr) > 0)       # sorted, no repeats


def test_parts_are_disjoint_and_cover_every_image(ds, split):
    parts = [split.backbone_idx, split.zoo_idx, split.test_idx]
    assert sum(len(p) for p in parts) == len(ds.labels)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(ds.labels)))


def test_backbone_holds_seen_classes_only_and_every_class_has_zoo_and_test(ds, split):
    assert set(np.unique(ds.labels[split.backbone_idx]).tolist()) <= set(split.seen.tolist())
    for c, n in enumerate(SIZES):
        zoo, test = split.part_of(c, "zoo"), split.part_of(c, "test")
        assert np.all(ds.labels[zoo] == c) and np.all(ds.labels[test] == c)
        assert len(zoo) >= 1 and len(test) >= (2 if n >= 8 else 1), (c, n)
        backbone = split.part_of(c, "backbone")
        assert len(backbone) + len(zoo) + len(test) == n
        if c in split.unseen:
            assert len(backbone) == 0
        elif n >= 5:
            assert len(backbone) >= 1


def test_fractions_are_respected_on_a_large_class(ds, split):
    big = SIZES.index(40)
    sizes = [len(split.part_of(big, p)) for p in ("backbone", "zoo", "test")]
    assert sizes == ([20, 10, 10] if big in split.seen else [0, 10, 30])


def test_part_sizes_guarantees():
    assert part_sizes(100, 0.5, 0.25) == (50, 25, 25)
    assert part_sizes(2, 0.5, 0.25) == (0, 1, 1)
    assert part_sizes(8, 0.5, 0.25) == (4, 2, 2)
    assert part_sizes(8, 0.7, 0.25) == (4, 2, 2)       # test needs 2: taken from the backbone
    assert part_sizes(3, 0.0, 0.9) == (0, 2, 1)        # and from the zoo when there is no backbone
    for n in range(2, 60):
        b, z, t = part_sizes(n, 0.6, 0.3)
        assert b + z + t == n and z >= 1 and t >= (2 if n >= 8 else 1) and b >= 0
    with pytest.raises(ValueError):
        part_sizes(1, 0.5, 0.25)


def test_split_is_deterministic_in_its_seed(ds, split):
    again = make_split(ds, ProtocolConfig())
    other = make_split(ds, ProtocolConfig(seed=1))
    for name in ("seen", "unseen", "backbone_idx", "zoo_idx", "test_idx"):
        assert np.array_equal(getattr(again, name), getattr(split, name))
    assert again.key == split.key and len(split.key) == 12
    assert other.key != split.key


def test_a_class_keeps_its_zoo_images_whether_seen_or_not(ds):
    """Per-class shuffles do not depend on the class split: changing seen_fraction moves no zoo image."""
    a = make_split(ds, ProtocolConfig(seen_fraction=0.8))
    b = make_split(ds, ProtocolConfig(seen_fraction=0.5))
    assert len(b.seen) == 6 and np.array_equal(a.zoo_idx, b.zoo_idx)


def test_split_is_frozen_and_read_only(split):
    with pytest.raises(dataclasses.FrozenInstanceError):
        split.seen = np.arange(3)
    with pytest.raises(ValueError):
        split.zoo_idx[0] = 0


def test_part_of_several_classes_and_bad_part(ds, split):
    both = split.part_of([0, 8], "test")
    assert np.array_equal(both, np.union1d(split.part_of(0, "test"), split.part_of(8, "test")))
    assert np.array_equal(split.part_of(np.int64(8), "test"), split.part_of([8], "test"))
    with pytest.raises(FedtinaError, match="unknown split part 'train'"):
        split.part_of(0, "train")


@pytest.mark.parametrize("field, value", [
    ("seen_fraction", 0.0), ("seen_fraction", 1.5), ("zoo_fraction", 0.0), ("backbone_fraction", -0.1),
    ("backbone_fraction", 1.0),
])
def test_bad_fractions_are_named(ds, field, value):
    with pytest.raises(FedtinaError, match=f"{field}.*{value}"):
        make_split(ds, dataclasses.replace(ProtocolConfig(), **{field: value}))


def test_fractions_must_leave_test_images(ds):
    with pytest.raises(FedtinaError, match="backbone_fraction \\+ protocol.zoo_fraction.*0.7 \\+ 0.3"):
        make_split(ds, ProtocolConfig(backbone_fraction=0.7, zoo_fraction=0.3))


def test_too_few_images_or_seen_classes_are_errors():
    with pytest.raises(FedtinaError, match="class 'class 1'.*1 image"):
        make_split(_dataset([4, 1, 5]), ProtocolConfig())
    with pytest.raises(FedtinaError, match="seen_fraction=0.1 of 12 classes leaves 1 seen"):
        make_split(_dataset(), ProtocolConfig(seen_fraction=0.1))


# ----------------------------------------------------------------------------------------------------------------
# novel classes: seen classes held out of the generic model (protocol.novel_share)

BIG = [24] * 40   # 40 classes of 24 images: 32 seen


def test_no_novel_share_is_the_split_of_before_the_option():
    """The keys pinned here were computed by the code before `novel_share` existed: every cached backbone, zoo and
    Tina of a default config keeps its key."""
    for seed, key in ((0, "60fffc7589e5"), (3, "1c01222d6364")):
        split = make_split(_dataset(), ProtocolConfig(seed=seed))
        assert split.key == key
        assert len(split.novel) == 0 and np.array_equal(split.backbone_classes, split.seen)


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_novel_images_never_reach_the_backbone_part(share):
    ds = _dataset(BIG)
    base, split = make_split(ds, ProtocolConfig()), make_split(ds, ProtocolConfig(novel_share=share))
    assert len(split.novel) == round(share * 32) and set(split.novel.tolist()) <= set(split.seen.tolist())
    assert np.array_equal(np.sort(np.concatenate([split.novel, split.backbone_classes])), split.seen)
    novel_images = np.flatnonzero(np.isin(ds.labels, split.novel))
    assert np.intersect1d(split.backbone_idx, novel_images).size == 0            # disjoint
    assert set(np.unique(ds.labels[split.backbone_idx]).tolist()) == set(split.backbone_classes.tolist())
    # the share moves the backbone part alone: classes, zoo and test parts, the other classes' backbone images
    for name in ("seen", "unseen", "zoo_idx", "test_idx"):
        assert np.array_equal(getattr(split, name), getattr(base, name)), name
    assert np.array_equal(split.backbone_idx, np.setdiff1d(base.backbone_idx, novel_images))
    assert split.key != base.key and all(len(split.part_of(c, "zoo")) for c in split.novel)


def test_novel_classes_are_seeded_and_bad_shares_are_named():
    ds = _dataset(BIG)
    a, b = (make_split(ds, ProtocolConfig(novel_share=0.25)) for _ in range(2))
    assert np.array_equal(a.novel, b.novel) and a.key == b.key
    assert not np.array_equal(make_split(ds, ProtocolConfig(novel_share=0.25, seed=1)).novel, a.novel)
    assert len(make_split(ds, ProtocolConfig(novel_share=0.001)).novel) == 1    # a positive share holds one out
    with pytest.raises(FedtinaError, match="protocol.novel_share=0.97 of 32 seen classes leaves the generic model 1"):
        make_split(ds, ProtocolConfig(novel_share=0.97))
    with pytest.raises(FedtinaError, match="novel classes must be seen"):
        ProtocolSplit(seen=[0, 1], unseen=[2], backbone_idx=[], zoo_idx=[], test_idx=[], labels=[0, 1, 2], novel=[2])


def test_a_task_larger_than_the_backbone_classes_is_named():
    ds = _dataset(BIG)
    split = make_split(ds, ProtocolConfig(novel_share=0.75))                 # 8 of 32 seen classes stay
    check_task_size(split, 8, "bench.k", 0.75)
    with pytest.raises(FedtinaError, match="protocol.novel_share=0.75 leaves the generic model 8 of the 32 seen "
                                           "classes, fewer than bench.k=10"):
        check_task_size(split, 10, "bench.k", 0.75)
    with pytest.raises(FedtinaError, match="zoo.k_max=33 exceeds the 32 seen classes"):
        check_task_size(split, 33, "zoo.k_max", 0.75)
    check_task_size(make_split(ds, ProtocolConfig()), 32, "zoo.k_max", 0.0)


# ----------------------------------------------------------------------------------------------------------------
# tasks


def test_sample_tasks_are_distinct_sets_of_the_right_size():
    pool = np.arange(10, 40)
    tasks = sample_tasks(pool, 200, 3, 6, np.random.default_rng(0))
    assert len(tasks) == 200 and len({frozenset(t) for t in tasks}) == 200
    for t in tasks:
        assert 3 <= len(t) <= 6 and len(set(t)) == len(t) and set(t) <= set(pool.tolist())
        assert all(type(c) is int for c in t)
    assert {len(t) for t in tasks} == {3, 4, 5, 6}
    assert any(list(t) != sorted(t) for t in tasks)              # random order inside a task


def test_sample_tasks_is_deterministic_in_the_rng():
    a = sample_tasks(range(20), 50, 5, 5, np.random.default_rng(3))
    b = sample_tasks(range(20), 50, 5, 5, np.random.default_rng(3))
    c = sample_tasks(range(20), 50, 5, 5, np.random.default_rng(4))
    assert a == b and a != c
    assert sample_tasks(range(20), 5, 5, 5, 7) == sample_tasks(range(20), 5, 5, 5, 7)   # an int seed works too


def test_sample_tasks_excludes_and_exhausts():
    everything = {frozenset(t) for t in sample_tasks(range(6), 20, 3, 3, 0)}     # C(6,3) = 20: all of them
    assert len(everything) == math.comb(6, 3)
    exclude = {frozenset({0, 1, 2}), frozenset({3, 4, 5}), frozenset({0, 2, 4})}
    rest = sample_tasks(range(6), 17, 3, 3, 1, exclude=exclude)
    assert {frozenset(t) for t in rest} == everything - exclude
    with pytest.raises(FedtinaError, match="only 17 exist"):
        sample_tasks(range(6), 18, 3, 3, 1, exclude=exclude)
    with pytest.raises(FedtinaError, match="only 20 exist"):
        sample_tasks(range(6), 21, 3, 3, 1)


def test_sample_tasks_rejects_bad_sizes():
    with pytest.raises(FedtinaError, match="k_min=4, k_max=3"):
        sample_tasks(range(10), 1, 4, 3, 0)
    with pytest.raises(FedtinaError, match="<= 10 classes"):
        sample_tasks(range(10), 1, 5, 11, 0)
    with pytest.raises(FedtinaError, match="repeated"):
        sample_tasks([1, 1, 2], 1, 1, 1, 0)


def test_ood_tasks_have_exactly_n_unseen():
    seen, unseen = np.arange(0, 40), np.arange(40, 50)
    tasks = sample_ood_tasks(seen, unseen, 100, 10, 3, np.random.default_rng(0))
    assert len({frozenset(t) for t in tasks}) == 100
    for t in tasks:
        assert len(t) == 10 and len(set(t)) == 10
        assert sum(c >= 40 for c in t) == 3
    assert any(list(t) != sorted(t) for t in tasks)


def test_ood_tasks_clamp_to_the_unseen_available_and_exclude():
    tasks = sample_ood_tasks(range(10), [10, 11], 30, 5, 3, 0)
    assert all(sum(c >= 10 for c in t) == 2 for t in tasks)
    # 2 unseen of 2 and 3 seen of 4: C(4,3) = 4 tasks in all
    all_four = sample_ood_tasks(range(4), [10, 11], 4, 5, 2, 0)
    assert len({frozenset(t) for t in all_four}) == 4
    with pytest.raises(FedtinaError, match="only 3 exist"):
        sample_ood_tasks(range(4), [10, 11], 4, 5, 2, 0, exclude=[all_four[0]])
    with pytest.raises(FedtinaError, match="need 4 seen classes; only 3"):
        sample_ood_tasks(range(3), [10], 1, 5, 1, 0)
    with pytest.raises(FedtinaError, match="overlap"):
        sample_ood_tasks(range(5), [4, 5], 1, 3, 1, 0)
