"""fedtina.federation library: partitions, client ops, head checks, profiling, report. Offline, small, fast."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from fedtina.config import HeadTrainConfig
from fedtina.data.base import ImageDataset
from fedtina.errors import CorruptFileError, FedtinaError, LabelSetError, UnknownClassError
from fedtina.server.gate import CheckResult, HeadCheckConfig, check_head, server_val_data
from fedtina.client.ops import (
    ClientData, evaluate_head, fedavg_local_train, finetune_local, load_client_data, load_client_images,
    restrict_head, softmax_xent,
)
from fedtina.data.partition import (
    Partition, PartitionConfig, load_partition, make_partition, save_partition,
)
from fedtina.report.profiling import (
    PHASES, PhaseRecord, PhaseTimer, from_config, records_from_config, records_to_config, to_config,
)
from fedtina.report.summary import ClientResult, format_by_labels, format_table, summarize, write_report
from fedtina.zoo.heads import Head

N_CLASSES, PER_CLASS, DIM = 12, 40, 8


@dataclass
class FakeSplit:
    """Same fields as fedtina.data.split.ProtocolSplit (duck-typed), built by hand so the test fixes every part."""

    seen: np.ndarray
    unseen: np.ndarray
    backbone_idx: np.ndarray
    zoo_idx: np.ndarray
    test_idx: np.ndarray


def make_world(seed: int = 0):
    """12 classes x 40 images; per class 20 backbone, 8 zoo, 12 test images; classes 0..8 seen, 9..11 unseen.
    Features: Gaussian clusters around a random mean per class (well separated)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    images = rng.integers(0, 256, size=(len(labels), 8, 8, 3), dtype=np.uint8)
    ds = ImageDataset("fake", images, labels, [f"class {i}" for i in range(N_CLASSES)])
    parts = {"backbone": [], "zoo": [], "test": []}
    for c in range(N_CLASSES):
        idx = np.flatnonzero(labels == c)
        parts["backbone"].append(idx[:20])
        parts["zoo"].append(idx[20:28])
        parts["test"].append(idx[28:])
    split = FakeSplit(np.arange(9), np.arange(9, 12), *(np.concatenate(parts[k]) for k in ("backbone", "zoo", "test")))
    means = rng.normal(0, 3, size=(N_CLASSES, DIM))
    feats = (means[labels] + rng.normal(0, 1, size=(len(labels), DIM))).astype(np.float32)
    return ds, split, feats, means


def cfg(**kw) -> PartitionConfig:
    return PartitionConfig(**{"k_min": 3, "k_max": 5, "unseen_share": 0.25, "unseen_per_client": 2, **kw})


# --------------------------------------------------------------------------------------------------------------------
# partition


def test_partition_constraints():
    ds, split, _, _ = make_world()
    part = make_partition(ds, split, 20, cfg())
    assert len(part.clients) == 20
    zoo, test, backbone = set(split.zoo_idx), set(split.test_idx), set(split.backbone_idx)
    server = set(part.server_val_idx.tolist())
    assert server and server <= test
    assert sum(c.has_unseen for c in part.clients) == round(0.25 * 20)
    unseen = set(split.unseen.tolist())
    usage = np.zeros(N_CLASSES, dtype=int)
    for c in part.clients:
        assert 3 <= c.k <= 5 and len(set(c.class_ids)) == c.k
        n_unseen = len(unseen & set(c.class_ids))
        assert n_unseen == (2 if c.has_unseen else 0)
        assert c.class_names == tuple(ds.class_names[i] for i in c.class_ids)
        assert c.description == ", ".join(c.class_names)
        tr, te = set(c.train_idx.tolist()), set(c.test_idx.tolist())
        assert tr <= zoo and not tr & backbone and not tr & test
        assert te <= test and not te & server
        np.testing.assert_array_equal(c.train_labels, ds.labels[c.train_idx])
        np.testing.assert_array_equal(c.test_labels, ds.labels[c.test_idx])
        for k in c.class_ids:  # every client has >= 1 train and >= 1 test image of each of its classes
            assert (c.train_labels == k).sum() >= 1 and (c.test_labels == k).sum() >= 1
        assert set(c.train_labels.tolist()) == set(c.class_ids)
        usage[list(c.class_ids)] += 1
    assert usage[:9].max() - usage[:9].min() <= 1          # seen classes dealt evenly
    assert usage[9:].max() - usage[9:].min() <= 1          # unseen classes dealt evenly


def test_divide_follows_the_shares():
    from fedtina.data.partition import _divide

    rng = np.random.default_rng(0)
    spread = {}
    for alpha in (0.1, 1000.0):
        parts = [_divide(np.arange(1000), rng.dirichlet(np.full(5, alpha)), rng) for _ in range(20)]
        for p in parts:
            assert sorted(np.concatenate(p).tolist()) == list(range(1000)) and min(map(len, p)) >= 1
        spread[alpha] = np.mean([np.std([len(x) for x in p]) for p in parts])
    assert spread[0.1] > 5 * spread[1000.0]
    big = _divide(np.arange(1000), np.array([0.7, 0.2, 0.1]), rng)
    assert [round(len(x), -2) for x in big] == [700, 200, 100]
    shared = _divide(np.arange(3), np.full(7, 1 / 7), rng)
    assert all(len(x) == 1 for x in shared) and set(np.concatenate(shared).tolist()) == {0, 1, 2}


def test_partition_train_and_test_follow_the_same_skew():
    """A client's local train and test data come from one distribution: class shares agree across the two parts."""
    ds, split, _, _ = make_world()
    part = make_partition(ds, split, 3, cfg(unseen_share=0.0, alpha=0.2, k_min=9, k_max=9))
    n_train = np.array([[(cl.train_labels == c).sum() for c in range(9)] for cl in part.clients], float)
    n_test = np.array([[(cl.test_labels == c).sum() for c in range(9)] for cl in part.clients], float)
    assert np.corrcoef(n_train.ravel(), n_test.ravel())[0, 1] > 0.6   # independent draws give ~0


def test_partition_holders_split_class_images_disjointly():
    ds, split, _, _ = make_world()
    part = make_partition(ds, split, 6, cfg(unseen_share=0.0, alpha=0.3))  # 6 clients x <=5 of 9 classes: 8 zoo/class
    for c in range(9):
        holders = [cl for cl in part.clients if c in cl.class_ids]
        owned = [set(cl.train_idx[cl.train_labels == c].tolist()) for cl in holders]
        if len(holders) <= 8:  # no sharing needed: the holders split the class's 8 zoo images exactly
            assert sum(map(len, owned)) == 8 and len(set().union(*owned)) == 8


def test_partition_shares_images_when_more_holders_than_images():
    ds, split, _, _ = make_world()
    part = make_partition(ds, split, 40, cfg(k_min=5, k_max=5, unseen_share=0.0))  # 200 slots / 9 classes ~ 22
    for c in part.clients:
        assert all((c.train_labels == k).sum() >= 1 for k in c.class_ids)


def test_partition_deterministic_and_seeded():
    ds, split, _, _ = make_world()
    a, b = make_partition(ds, split, 10, cfg()), make_partition(ds, split, 10, cfg())
    other = make_partition(ds, split, 10, cfg(seed=1))
    for x, y in zip(a.clients, b.clients):
        assert x.class_ids == y.class_ids and x.description == y.description
        np.testing.assert_array_equal(x.train_idx, y.train_idx)
        np.testing.assert_array_equal(x.test_idx, y.test_idx)
    np.testing.assert_array_equal(a.server_val_idx, b.server_val_idx)
    assert [c.class_ids for c in a.clients] != [c.class_ids for c in other.clients]


def test_label_budgets_cap_each_clients_labelled_images_per_class(tmp_path):
    ds, split, _, _ = make_world()
    full = make_partition(ds, split, 10, cfg())
    part = make_partition(ds, split, 10, cfg(labels_per_class=[0, 2]))
    for c, f in zip(part.clients, full.clients):
        assert c.label_budget == [0, 2][c.client_id % 2] and f.label_budget == -1
        assert c.class_ids == f.class_ids and set(c.train_idx) <= set(f.train_idx)   # a subset of what it holds
        np.testing.assert_array_equal(c.test_idx, f.test_idx)
        for k in c.class_ids:
            assert (c.train_labels == k).sum() == min(c.label_budget, (f.train_labels == k).sum())
    save_partition(tmp_path / "p.json", part)
    assert load_partition(tmp_path / "p.json").clients[1].label_budget == 2
    with pytest.raises(FedtinaError, match=r"labels_per_class=\[1000\]: no client holds more than \d+ training"):
        make_partition(ds, split, 10, cfg(labels_per_class=[1000]))
    with pytest.raises(FedtinaError, match="need a non-empty list of integers >= 0"):
        make_partition(ds, split, 10, cfg(labels_per_class=[-1]))


@pytest.mark.parametrize("scheme", ["dirichlet", "inner_dirichlet", "pathological"])
def test_flower_datasets_schemes_deal_the_seen_classes(scheme):
    """The seen classes' zoo images come from the Flower Datasets partitioner (client i's are a subset of the
    partitioner's partition i, its largest classes, disjoint across clients); unseen classes, the test skew and the
    server's hold-out are fedtina's as in the default scheme."""
    from datasets import Dataset
    from flwr_datasets.partitioner import PathologicalPartitioner

    ds, split, _, _ = make_world()
    c = cfg(scheme=scheme, unseen_share=0.34, k_min=5, k_max=5)
    part = make_partition(ds, split, 6, c)
    seen_owner: dict[int, int] = {}
    for cl in part.clients:
        assert set(np.unique(cl.train_labels).tolist()) == set(cl.class_ids) and cl.k <= c.k_max
        assert set(np.unique(cl.test_labels).tolist()) == set(cl.class_ids)
        assert sum(k >= 9 for k in cl.class_ids) == (c.unseen_per_client if cl.has_unseen else 0)
        for i in cl.train_idx[cl.train_labels < 9]:
            assert seen_owner.setdefault(int(i), cl.client_id) == cl.client_id   # each image dealt once
    assert sum(cl.has_unseen for cl in part.clients) == 2
    assert not set(part.server_val_idx.tolist()) & set(np.concatenate([cl.test_idx for cl in part.clients]).tolist())
    if scheme == "pathological":   # replay the partitioner itself: the same classes and images, every class kept
        seen_zoo = split.zoo_idx[ds.labels[split.zoo_idx] < 9]
        ref = PathologicalPartitioner(num_partitions=6, partition_by="label", num_classes_per_partition=5, seed=0)
        ref.dataset = Dataset.from_dict({"label": ds.labels[seen_zoo], "row": np.arange(len(seen_zoo))})
        for cl in part.clients:
            want = seen_zoo[ref.load_partition(cl.client_id)["row"]]
            mine = cl.train_idx[cl.train_labels < 9]
            if cl.has_unseen:   # it keeps its 3 largest seen classes, room for 2 unseen ones
                assert set(mine.tolist()) < set(want.tolist()) and len(np.unique(ds.labels[mine])) == 3
            else:
                np.testing.assert_array_equal(np.sort(want), mine)
    again = make_partition(ds, split, 6, c)
    assert all(np.array_equal(a.train_idx, b.train_idx) and np.array_equal(a.test_idx, b.test_idx)
               for a, b in zip(part.clients, again.clients))


def test_flower_datasets_scheme_that_cannot_deal_the_data_says_why():
    ds, split, _, _ = make_world()
    with pytest.raises(FedtinaError, match=r"partition.scheme=pathological cannot deal 72 images of 9 seen classes "
                                           r"to 60 clients: .*"):
        make_partition(ds, split, 60, cfg(scheme="pathological", unseen_share=0.0, k_min=5, k_max=5))
    with pytest.raises(FedtinaError, match="72 seen-class training images cannot be dealt to 100 clients"):
        make_partition(ds, split, 100, cfg(scheme="dirichlet", unseen_share=0.0))
    with pytest.raises(FedtinaError, match=r"partition.scheme='shards'; valid: \['fedtina', 'dirichlet'"):
        make_partition(ds, split, 6, cfg(scheme="shards"))


def test_partition_plot_stays_small_with_many_clients(tmp_path):
    """A column per client up to max_shown; above it an evenly spaced sample, so the figure's width is bounded."""
    import matplotlib.image

    from fedtina.report.summary import plot_partition

    ds, split, _, _ = make_world()
    widths = {}
    for n in (20, 300):
        part = make_partition(ds, split, n, cfg())
        widths[n] = matplotlib.image.imread(plot_partition(tmp_path / f"p{n}.png", part, max_shown=40)).shape[1]
    assert widths[300] <= (0.12 * 40 + 3) * 110 + 1 and widths[20] < widths[300]


def test_partition_with_the_real_protocol_split():
    protocol = pytest.importorskip("fedtina.data.split")
    from fedtina.config import ProtocolConfig

    ds, _, _, _ = make_world()
    split = protocol.make_split(ds, ProtocolConfig(seen_fraction=0.75))
    part = make_partition(ds, split, 8, cfg())
    zoo, test = set(split.zoo_idx.tolist()), set(split.test_idx.tolist())
    for c in part.clients:
        assert set(c.train_idx.tolist()) <= zoo and set(c.test_idx.tolist()) <= test
        assert len(set(c.class_ids) & set(split.unseen.tolist())) == (2 if c.has_unseen else 0)


def test_partition_sentence_description():
    ds, split, _, _ = make_world()
    part = make_partition(ds, split, 3, cfg(description="sentence", template="a model for: {names}"))
    c = part.clients[0]
    assert c.description == "a model for: " + ", ".join(c.class_names)


@pytest.mark.parametrize("kw, n, match", [
    ({"k_max": 13}, 5, "k_max=13"),
    ({"alpha": 0.0}, 5, "alpha=0.0"),
    ({"alpha": -1.0}, 5, "alpha=-1.0"),
    ({}, 0, "n_clients=0"),
    ({"unseen_per_client": 4}, 5, "unseen_per_client=4"),
    ({"description": "poem"}, 5, "poem"),
])
def test_partition_bad_config(kw, n, match):
    ds, split, _, _ = make_world()
    with pytest.raises(FedtinaError, match=match):
        make_partition(ds, split, n, cfg(**kw))


def test_partition_save_load_roundtrip(tmp_path):
    ds, split, _, _ = make_world()
    part = make_partition(ds, split, 7, cfg(description="sentence"))
    path = tmp_path / "partition.json"
    save_partition(path, part)
    loaded = load_partition(path)
    assert isinstance(loaded, Partition) and loaded.config == part.config
    assert load_partition(str(path)) is loaded  # cached per process
    np.testing.assert_array_equal(loaded.server_val_idx, part.server_val_idx)
    np.testing.assert_array_equal(loaded.server_val_labels, part.server_val_labels)
    for x, y in zip(part.clients, loaded.clients):
        assert (x.client_id, x.class_ids, x.class_names, x.has_unseen, x.description) == \
               (y.client_id, y.class_ids, y.class_names, y.has_unseen, y.description)
        for f in ("train_idx", "test_idx", "train_labels", "test_labels"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file
    path.write_text("{not json")
    with pytest.raises(CorruptFileError, match="partition.json"):
        load_partition(path)


# --------------------------------------------------------------------------------------------------------------------
# client ops


@pytest.fixture()
def run_dir(tmp_path):
    ds, split, feats, means = make_world()
    part = make_partition(ds, split, 6, cfg())
    np.save(tmp_path / "features.npy", feats)
    np.save(tmp_path / "images.npy", ds.images)
    save_partition(tmp_path / "partition.json", part)
    return tmp_path, ds, part, feats, means


def _client(run_dir, cid=0) -> ClientData:
    path = run_dir[0]
    return load_client_data(str(path / "features.npy"), str(path / "partition.json"), cid)


def test_load_client_data(run_dir):
    path, ds, part, feats, _ = run_dir
    data = _client(run_dir, 2)
    spec = part.clients[2]
    assert data.class_ids == spec.class_ids and data.class_names == spec.class_names
    np.testing.assert_array_equal(data.train_x, feats[spec.train_idx])
    np.testing.assert_array_equal(data.test_x, feats[spec.test_idx])
    ids = np.asarray(spec.class_ids)
    np.testing.assert_array_equal(ids[data.train_y], ds.labels[spec.train_idx])
    np.testing.assert_array_equal(ids[data.test_y], ds.labels[spec.test_idx])
    np.testing.assert_array_equal(data.train_global_y, ds.labels[spec.train_idx])
    assert _client(run_dir, 2) is data  # lru_cache per process
    imgs = load_client_images(str(path / "images.npy"), str(path / "partition.json"), 2)
    np.testing.assert_array_equal(imgs.train_x, ds.images[spec.train_idx])
    np.testing.assert_array_equal(imgs.test_x, ds.images[spec.test_idx])
    np.testing.assert_array_equal(imgs.train_global_y, ds.labels[spec.train_idx])
    np.testing.assert_array_equal(ids[imgs.train_y], ds.labels[spec.train_idx])
    np.testing.assert_array_equal(ids[imgs.test_y], ds.labels[spec.test_idx])
    with pytest.raises(FedtinaError, match="client id 99"):
        load_client_data(str(path / "features.npy"), str(path / "partition.json"), 99)
    with pytest.raises(CorruptFileError, match="missing.npy"):
        load_client_data(str(path / "missing.npy"), str(path / "partition.json"), 0)


def _mean_head(data: ClientData, means: np.ndarray) -> Head:
    """Nearest-class-mean head: w_c = mu_c, b_c = -|mu_c|^2 / 2."""
    mu = means[list(data.class_ids)].astype(np.float32)
    return Head(data.class_names, mu, (-0.5 * (mu**2).sum(1)).astype(np.float32))


def test_evaluate_head_reorders_rows_by_name(run_dir):
    *_, means = run_dir
    data = _client(run_dir, 1)
    head = _mean_head(data, means)
    rng = np.random.default_rng(3)
    head = Head(head.class_names, head.weight + rng.normal(0, 1.5, head.weight.shape).astype(np.float32), head.bias)
    manual = float(np.mean(np.argmax(data.test_x @ head.weight.T + head.bias, 1) == data.test_y))
    out = evaluate_head(head, data)
    assert out == {"acc": pytest.approx(manual), "num-examples": len(data.test_y)}
    perm = rng.permutation(head.k)
    shuffled = Head(tuple(head.class_names[i] for i in perm), head.weight[perm], head.bias[perm])
    assert evaluate_head(shuffled, data)["acc"] == pytest.approx(manual)
    exact = _mean_head(data, means)
    assert evaluate_head(exact, data)["acc"] > 0.9
    # names reversed but rows left in place: rows are taken by name, so the head now points at the wrong classes
    wrong = Head(exact.class_names[::-1], exact.weight, exact.bias)
    assert evaluate_head(wrong, data)["acc"] < 0.5


def test_evaluate_head_rejects_other_class_sets(run_dir):
    *_, means = run_dir
    data = _client(run_dir, 0)
    head = _mean_head(data, means)
    with pytest.raises(UnknownClassError, match="tractor"):
        evaluate_head(Head(head.class_names[:-1] + ("tractor",), head.weight, head.bias), data)
    with pytest.raises(LabelSetError):
        evaluate_head(Head(head.class_names[:-1], head.weight[:-1], head.bias[:-1]), data)
    with pytest.raises(LabelSetError, match="duplicated"):
        evaluate_head(Head(head.class_names[:-1] + head.class_names[:1], head.weight, head.bias), data)


def test_restrict_head_and_fedavg_local_train(run_dir):
    *_, means = run_dir
    data = _client(run_dir, 3)
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.01, (N_CLASSES, DIM)).astype(np.float32)
    b0 = np.zeros(N_CLASSES, np.float32)
    w0_copy = w0.copy()
    loss0 = softmax_xent(w0, b0, data.train_x, data.train_global_y)
    w1, b1 = fedavg_local_train(w0, b0, data, epochs=5, lr=0.05, batch_size=8)
    np.testing.assert_array_equal(w0, w0_copy)  # inputs untouched
    assert w1.dtype == np.float32 and w1.shape == w0.shape and b1.shape == b0.shape
    assert softmax_xent(w1, b1, data.train_x, data.train_global_y) < 0.5 * loss0
    # rows of classes the client does not hold are pushed down only through the softmax, never up
    head = restrict_head(w1, b1, data.class_ids, data.class_names)
    np.testing.assert_array_equal(head.weight, w1[list(data.class_ids)])
    assert evaluate_head(head, data)["acc"] > 0.8
    with pytest.raises(UnknownClassError):
        fedavg_local_train(w0[:5], b0[:5], data, 1, 0.1, 8)


def _finetune_heads_available() -> bool:
    import fedtina.zoo.heads as heads
    return hasattr(heads, "finetune_heads")


@pytest.mark.skipif(not _finetune_heads_available(), reason="heads.finetune_heads not written yet")
def test_finetune_local_improves_a_noisy_head(run_dir):
    *_, means = run_dir
    data = _client(run_dir, 4)
    rng = np.random.default_rng(1)
    head = _mean_head(data, means)
    noisy = Head(head.class_names, (0.2 * head.weight + rng.normal(0, 2, head.weight.shape)).astype(np.float32),
                 np.zeros(head.k, np.float32))
    perm = rng.permutation(head.k)
    noisy = Head(tuple(noisy.class_names[i] for i in perm), noisy.weight[perm], noisy.bias[perm])
    tuned = finetune_local(noisy, data, HeadTrainConfig(steps=100, lr=0.05, l2_to_init=0.0))
    assert tuned.class_names == data.class_names
    assert evaluate_head(tuned, data)["acc"] >= evaluate_head(noisy, data)["acc"]
    assert evaluate_head(tuned, data)["acc"] > 0.8


def test_the_image_model_trains_what_it_is_told(run_dir):
    """fedtina.client.image_model: the whole model, the body under a frozen head, a proximal pull, a logit shift."""
    from fedtina.config import BackboneConfig
    from fedtina.client import image_model as body

    path, ds, part, _, _ = run_dir
    imgs = load_client_images(str(path / "images.npy"), str(path / "partition.json"), 0)
    state = body.init_state(N_CLASSES, BackboneConfig(width=4), seed=0)
    assert all(v.dtype == np.float32 for v in state.values())
    kw = {"epochs": 2, "lr": 0.05, "batch_size": 8}
    new = body.train(state, imgs.train_x, imgs.train_global_y, **kw)
    assert set(new) == set(state) and not np.array_equal(new["fc.weight"], state["fc.weight"])
    assert not np.array_equal(new["stem.0.weight"], state["stem.0.weight"])
    frozen_head = body.train(state, imgs.train_x, imgs.train_global_y, train_head=False, **kw)
    np.testing.assert_array_equal(frozen_head["fc.weight"], state["fc.weight"])
    assert not np.array_equal(frozen_head["stem.0.weight"], state["stem.0.weight"])
    frozen_body = body.train(state, imgs.train_x, imgs.train_global_y, train_body=False, **kw)
    assert all(np.array_equal(frozen_body[k], state[k]) for k in state if k not in body.HEAD_KEYS)
    # a strong proximal pull keeps the weights nearer the anchor than free training does
    prox = body.train(state, imgs.train_x, imgs.train_global_y, mu=10.0, anchor=state, **kw)
    dist = lambda s: sum(float(((s[k] - state[k]) ** 2).sum()) for k in state if k.endswith("weight"))  # noqa: E731
    assert dist(prox) < dist(new)
    with pytest.raises(FedtinaError, match="anchor"):
        body.train(state, imgs.train_x, imgs.train_global_y, mu=1.0, **kw)
    # a logit shift of -1e4 on every class but the labelled ones leaves those rows' gradients alone
    present = np.unique(imgs.train_global_y)
    shift = np.full(N_CLASSES, -1e4, np.float32)
    shift[present] = 0.0
    adj = body.train(state, imgs.train_x, imgs.train_global_y, train_body=False, logit_adjust=shift,
                     weight_decay=0.0, **kw)
    absent = [c for c in range(N_CLASSES) if c not in present]
    np.testing.assert_allclose(adj["fc.weight"][absent], state["fc.weight"][absent], atol=1e-6)
    # features + rows = the model's own k-way accuracy
    b, head = body.split(new)
    assert body.features(b, imgs.test_x).shape == (len(imgs.test_y), head.weight.shape[1])
    acc = body.accuracy(new, imgs.test_x, imgs.test_y, part.clients[0].class_ids)
    k_way = body.join(b, body.rows(head, part.clients[0].class_ids, part.clients[0].class_names))
    assert acc == body.accuracy(k_way, imgs.test_x, imgs.test_y) and 0.0 <= acc <= 1.0


# --------------------------------------------------------------------------------------------------------------------
# head checks


@pytest.fixture()
def check_setup(run_dir):
    path, ds, part, feats, means = run_dir
    spec = part.clients[0]
    x, y = server_val_data(feats, ds.labels, part.server_val_idx, spec.class_ids)
    mu = means[list(spec.class_ids)].astype(np.float32)
    good = Head(spec.class_names, mu, (-0.5 * (mu**2).sum(1)).astype(np.float32))
    norm = float(np.linalg.norm(means[:9], axis=1).mean())
    return spec, x, y, good, norm


def _check(head, spec, x, y, ref, norm, **kw) -> CheckResult:
    return check_head(head, spec.class_names, DIM, ref, x, y, norm, HeadCheckConfig(**kw))


def test_server_val_data(run_dir):
    path, ds, part, feats, _ = run_dir
    ids = part.clients[0].class_ids
    x, y = server_val_data(feats, ds.labels, part.server_val_idx, ids)
    keep = part.server_val_idx[np.isin(ds.labels[part.server_val_idx], ids)]
    assert len(x) == len(keep) > 0
    np.testing.assert_array_equal(x, feats[keep])
    np.testing.assert_array_equal(np.asarray(ids)[y], ds.labels[keep])


def test_check_head_accepts_good_and_shuffled(check_setup):
    spec, x, y, good, norm = check_setup
    res = _check(good, spec, x, y, good, norm)
    assert res.accepted and res.reason == "ok" and res.acc == res.reference_acc and res.acc > 0.9
    perm = np.arange(good.k)[::-1]
    shuffled = Head(tuple(good.class_names[i] for i in perm), good.weight[perm], good.bias[perm])
    assert _check(shuffled, spec, x, y, good, norm).accepted


def test_check_head_refusals(check_setup):
    spec, x, y, good, norm = check_setup
    nan_w = good.weight.copy()
    nan_w[0, 0] = np.nan
    cases = {
        "non-finite": Head(good.class_names, nan_w, good.bias),
        "wrong shape": Head(good.class_names, good.weight[:, :-1].copy(), good.bias),
        "class set": Head(good.class_names[:-1] + ("tractor",), good.weight, good.bias),
        "dtype": Head(good.class_names, good.weight.astype(np.float64), good.bias),
        "row norm": Head(good.class_names, good.weight * 100, good.bias),
    }
    for word, head in cases.items():
        res = _check(head, spec, x, y, good, norm)
        assert not res.accepted and word in res.reason, (word, res)
    res = _check(good, spec, x, y, good, norm, max_bytes=64)
    assert not res.accepted and "oversized" in res.reason
    # poor accuracy: rows rolled, so each row points to the wrong class mean
    bad = Head(good.class_names, np.roll(good.weight, 1, axis=0), np.roll(good.bias, 1))
    res = _check(bad, spec, x, y, good, norm)
    assert not res.accepted and "accuracy" in res.reason and res.acc < res.reference_acc - 0.15
    with pytest.raises(FedtinaError, match="reference_row_norm"):
        _check(good, spec, x, y, good, 0.0)


def _all_test_images(run_dir, spec):
    """The client's classes over every test-part image of the fake world (12 per class): enough held-out images
    for the per-class check (the fixture's server share has 2 per class)."""
    _, ds, _, feats, _ = run_dir
    test_idx = np.flatnonzero(np.arange(len(ds.labels)) % PER_CLASS >= 28)  # make_world's test part
    return server_val_data(feats, ds.labels, test_idx, spec.class_ids)


def _rows_head(means, spec, rows=None) -> Head:
    """A head with the class means as rows (nearest-mean rule); `rows` = which class's mean each position takes."""
    mu = means[list(spec.class_ids if rows is None else rows)].astype(np.float32)
    return Head(spec.class_names, mu, (-0.5 * (mu**2).sum(1)).astype(np.float32))


def test_poison_kinds():
    from fedtina.adversary.attacks import Attack, flip_pair, poison_head

    rng = np.random.default_rng(0)
    head = Head(("a", "b", "c", "d"), rng.normal(size=(4, 3)).astype(np.float32),
                rng.normal(size=4).astype(np.float32))
    before = head.weight.copy()
    for cid in range(6):
        i, j = flip_pair(4, cid)
        flipped = poison_head(head, Attack("label_flip"), cid)
        assert flipped.class_names == head.class_names and i != j
        order = np.arange(4)
        order[[i, j]] = [j, i]
        np.testing.assert_array_equal(flipped.weight, head.weight[order])
        np.testing.assert_array_equal(flipped.bias, head.bias[order])
    assert {flip_pair(4, cid) for cid in range(4)} == {(0, 1), (1, 2), (2, 3), (3, 0)}
    assert np.isnan(poison_head(head, Attack("nan"), 0).weight).sum() == 1
    assert poison_head(head, Attack("shape"), 0).weight.shape == (4, 4)
    np.testing.assert_allclose(poison_head(head, Attack("huge"), 0).weight, head.weight * 1e4)
    np.testing.assert_array_equal(head.weight, before)  # the fine-tuned head itself is not touched
    with pytest.raises(FedtinaError, match="label_flip needs at least 2"):
        poison_head(Head(("a",), head.weight[:1], head.bias[:1]), Attack("label_flip"), 0)
    with pytest.raises(FedtinaError, match="unknown attack kind 'nope'.*mislabeled"):
        poison_head(head, Attack("nope"), 0)


def test_mislabel_moves_a_share_of_labels_to_the_next_class(run_dir):
    from fedtina.adversary.attacks import mislabel

    data = _client(run_dir, 0)
    before = data.train_y.copy()
    mis = mislabel(data.train_y, data.k, 0.5, 7)
    moved = mis != data.train_y
    assert moved.sum() == round(0.5 * len(before))
    np.testing.assert_array_equal(mis[moved], (before[moved] + 1) % data.k)
    np.testing.assert_array_equal(data.train_y, before)  # the cached client data is untouched
    np.testing.assert_array_equal(mislabel(data.train_y, data.k, 0.5, 7), mis)  # seeded by the client id
    assert not np.array_equal(mislabel(data.train_y, data.k, 0.5, 8), mis)
    np.testing.assert_array_equal(mislabel(data.train_y, data.k, 0.0, 7), before)
    with pytest.raises(FedtinaError, match="mislabel share"):
        mislabel(data.train_y, data.k, 1.5, 7)


def test_check_head_refuses_a_label_flip_of_seen_classes(run_dir):
    """One pair of rows swapped under the same names: with the mean-accuracy check out of the way (max_acc_drop=1)
    the per-class check refuses it and names the pair; a bias that only shifts a class prior is no swap."""
    from fedtina.adversary.attacks import Attack, flip_pair, poison_head

    _, _, part, _, means = run_dir
    spec = next(c for c in part.clients if not c.has_unseen)
    x, y = _all_test_images(run_dir, spec)
    good = _rows_head(means, spec)
    norm = float(np.linalg.norm(means[:9], axis=1).mean())
    flipped = poison_head(good, Attack("label_flip"), spec.client_id)
    res = _check(flipped, spec, x, y, good, norm, max_acc_drop=1.0)
    a, b = (spec.class_names[i] for i in flip_pair(spec.k, spec.client_id))
    assert not res.accepted and res.class_drop > 0.9, res
    assert f"classes {a!r} and {b!r} swapped or confused" in res.reason, res.reason
    assert "AUC 0.00 vs 1.00 under the selection head" in res.reason and "max_class_drop=0.4" in res.reason
    assert _check(flipped, spec, x, y, good, norm, max_acc_drop=1.0, max_class_drop=1.0).accepted
    # a skewed class prior lives in the biases (honest fine-tuning on skewed data): a class that loses all its
    # recall to a lowered bias is still told apart from every other class, so it is no swap
    prior = Head(good.class_names, good.weight, good.bias - np.float32(1e4) * (np.arange(spec.k) == 0))
    assert not (np.argmax(x @ prior.weight.T + prior.bias, axis=1)[y == 0] == 0).any()
    res = _check(prior, spec, x, y, good, norm, max_acc_drop=1.0)
    assert res.accepted and res.class_drop == 0.0, res
    # too few held-out images per class: the per-class check does not apply
    assert _check(flipped, spec, x, y, good, norm, max_acc_drop=1.0, min_class_images=13).accepted


@pytest.mark.parametrize("kind", ["nan", "huge", "shape", "label_flip", "permute", "sign_flip", "random",
                                  "targeted", "scale"])
def test_the_gate_on_each_attack_kind(run_dir, kind):
    """Every attack of the bench's table against the gate, with enough held-out images: refused, except scaling
    (x0.1, x3), which keeps every prediction and so passes (its damage is nil: tests/test_attacks.py)."""
    from fedtina.adversary.attacks import Attack, poison_head

    _, _, part, _, means = run_dir
    norm = float(np.linalg.norm(means[:9], axis=1).mean())
    for spec in part.clients:
        x, y = _all_test_images(run_dir, spec)
        good = _rows_head(means, spec)
        assert _check(good, spec, x, y, good, norm).accepted
        for factor in ((0.1, 3.0) if kind == "scale" else (3.0,)):
            res = _check(poison_head(good, Attack(kind, factor=factor), spec.client_id), spec, x, y, good, norm)
            assert res.accepted == (kind == "scale"), (kind, factor, spec.client_id, res)


def test_check_head_refuses_a_label_flip_where_selection_is_weak(run_dir):
    """A client with unseen classes: the selection head copies one seen row for both, so its accuracy is low and a
    head with their rows swapped passes the mean check (the issue's case). The per-class check refuses it, against
    the head the server sent (a strong reference for them) and even against the selection head alone (which cannot
    tell the two apart, AUC 0.5, while the flipped head inverts them)."""
    _, _, part, _, means = run_dir
    spec = next(c for c in part.clients if c.has_unseen)
    unseen = [i for i, c in enumerate(spec.class_ids) if c >= 9]
    x, y = _all_test_images(run_dir, spec)
    weak = _rows_head(means, spec, [c if c < 9 else 0 for c in spec.class_ids])
    sent = _rows_head(means, spec)
    order = np.arange(spec.k)
    order[unseen] = order[unseen[::-1]]  # the two unseen classes swap rows
    flipped = Head(spec.class_names, sent.weight[order], sent.bias[order])
    norm = float(np.linalg.norm(means[:9], axis=1).mean())
    cfg = HeadCheckConfig()
    assert check_head(flipped, spec.class_names, DIM, weak, x, y, norm, replace(cfg, max_class_drop=1.0),
                      sent=sent).accepted  # the mean check alone passes it
    names = " and ".join(repr(spec.class_names[i]) for i in unseen)
    res = check_head(flipped, spec.class_names, DIM, weak, x, y, norm, cfg, sent=sent)
    assert not res.accepted and f"classes {names} swapped" in res.reason, res
    assert "vs 1.00 under the head the server sent" in res.reason
    alone = check_head(flipped, spec.class_names, DIM, weak, x, y, norm, cfg)
    assert not alone.accepted and f"classes {names} swapped" in alone.reason and "vs 0.50 under the selection head" \
        in alone.reason, alone


def test_check_head_accepts_honest_finetuned_and_refuses_mislabeled_heads(run_dir):
    """Every client's honest upload (the sent head, noisy, fine-tuned on its own data as tina_ft does) passes the
    default gate; a head fit to fully shifted labels (mislabel share 1, a fixed recipe: with `select` a client may
    keep the received head, which is no harm) is refused."""
    from fedtina.adversary.attacks import mislabel

    _, _, part, _, means = run_dir
    ft = HeadTrainConfig(steps=30, lr=0.05, l2_to_init=1e-3, select=True)
    norm = float(np.linalg.norm(means[:9], axis=1).mean())
    for spec in part.clients:
        x, y = _all_test_images(run_dir, spec)
        rng = np.random.default_rng(spec.client_id)
        sent = _rows_head(means, spec)
        sent = Head(spec.class_names, (sent.weight + rng.normal(0, 1, sent.weight.shape)).astype(np.float32),
                    sent.bias)
        selection = _rows_head(means, spec, [c if c < 9 else 0 for c in spec.class_ids])
        data = _client(run_dir, spec.client_id)
        honest = check_head(finetune_local(sent, data, ft), spec.class_names, DIM, selection, x, y, norm,
                            HeadCheckConfig(), sent=sent)
        assert honest.accepted and honest.reason == "ok" and honest.class_drop is not None, (spec.client_id, honest)
        fit = HeadTrainConfig(steps=100, lr=0.1, l2_to_init=0.0)
        mislabeled = finetune_local(sent, replace(data, train_y=mislabel(data.train_y, data.k, 1.0, spec.client_id)), fit)
        res = check_head(mislabeled, spec.class_names, DIM, selection, x, y, norm, HeadCheckConfig(), sent=sent)
        assert not res.accepted and ("swapped" in res.reason or "accuracy" in res.reason), (spec.client_id, res)


# --------------------------------------------------------------------------------------------------------------------
# profiling


def test_phase_timer_measures_cpu_wall_and_memory():
    with PhaseTimer() as busy:
        s = 0
        for i in range(300_000):
            s += i * i
    assert busy.wall_s > 0 and busy.cpu_s > 0 and busy.peak_mem_mb > 0
    with PhaseTimer() as alloc:
        a = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        a += 1
        del a
    assert alloc.mem_delta_mb > 150, alloc.mem_delta_mb
    assert alloc.peak_mem_mb > busy.peak_mem_mb + 100
    rec = alloc.record("tina", 1, 7, "finetune", bytes_sent=10, acc=0.5)
    assert rec.peak_mem_mb == alloc.peak_mem_mb and rec.client_id == 7 and rec.bytes_sent == 10


def test_phase_timers_share_one_sampler_thread_and_each_sees_its_own_peak():
    """Overlapping timers (an evaluate inside a fine-tune) both see an allocation made while both are open; one
    closed before it does not; however many phases run, the process has one sampler thread."""
    import threading
    import time

    def held(mib: int) -> None:
        a = np.ones(mib * 2**20 // 8)
        a += 1
        time.sleep(0.05)   # several sampling periods: the sampler, not only the exit read, must see it
        del a

    with PhaseTimer() as before:
        pass
    with PhaseTimer() as outer:
        with PhaseTimer() as inner:
            held(200)
    for _ in range(50):
        with PhaseTimer():
            pass
    assert inner.mem_delta_mb > 150 and outer.mem_delta_mb > 150, (inner.mem_delta_mb, outer.mem_delta_mb)
    assert before.mem_delta_mb < 50
    assert sum(t.name == "fedtina-phase-timer" for t in threading.enumerate()) == 1


def test_phase_record_config_roundtrip():
    recs = [PhaseRecord("tina", 2, 5, "generate", 0.5, 0.4, 300.0, 10, 20, 0.75, "ok", "x"),
            PhaseRecord("fedavg", 1, 3, "train", acc=None, status="error", detail="boom")]
    for rec in recs:
        d = to_config(rec)
        assert all(isinstance(v, (str, int, float, bool)) for v in d.values())
        assert from_config(d) == rec
    assert to_config(recs[1])["has_acc"] is False
    assert records_from_config(records_to_config(recs)) == recs
    assert "train" in PHASES


# --------------------------------------------------------------------------------------------------------------------
# report


def _results_and_records():
    accs = {"tina": [0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35],
            "fedavg": [0.5, 0.6, 0.4, 0.3]}
    results, records = [], []
    for m, vals in accs.items():
        for cid, a in enumerate(vals):
            results.append(ClientResult(m, cid, 1, a, 10, cid % 3 == 0, "ok"))
            records.append(PhaseRecord(m, 1, cid, "evaluate", wall_s=0.1 * cid, cpu_s=0.05, bytes_sent=100,
                                       bytes_recv=1000))
            records.append(PhaseRecord(m, 1, cid, "finetune", wall_s=1.0, cpu_s=0.5, bytes_recv=50))
    # an earlier fedavg round is superseded by round 2 for client 0; client 4 failed
    results[12] = replace(results[12], round=2)
    results.append(ClientResult("fedavg", 0, 1, 0.1, 10, True, "ok"))
    results.append(ClientResult("fedavg", 4, 2, None, 0, False, "failed", "actor died"))
    return accs, results, records


def test_summarize_matches_numpy():
    accs, results, records = _results_and_records()
    summary = summarize(results, records, {"tina": 3, "fedavg": 2})
    t, f = summary["methods"]["tina"], summary["methods"]["fedavg"]
    a = np.array(accs["tina"])
    assert t["acc_mean"] == pytest.approx(a.mean()) and t["acc_std"] == pytest.approx(a.std())
    assert t["acc_worst10"] == pytest.approx(np.sort(a)[:2].mean())  # ceil(1.2) = 2 lowest
    unseen = np.arange(len(a)) % 3 == 0
    assert t["acc_with_unseen"] == pytest.approx(a[unseen].mean())
    assert t["acc_seen_only"] == pytest.approx(a[~unseen].mean())
    assert (t["n_ok"], t["n_failed"], t["rounds"]) == (12, 0, 3)
    wall = np.array([0.1 * c + 1.0 for c in range(12)])
    assert t["client_wall_s"] == pytest.approx(wall.mean())
    assert t["client_cpu_s"] == pytest.approx(0.55)
    assert t["bytes_per_client"] == pytest.approx(1150)
    assert t["phase_wall_s"]["finetune"] == pytest.approx(1.0)
    assert sum(t["phase_wall_s"].values()) == pytest.approx(t["client_wall_s"])
    b = np.array(accs["fedavg"])  # round 2 result of client 0 (0.5) wins over its round 1 (0.1)
    assert f["acc_mean"] == pytest.approx(b.mean()) and f["acc_worst10"] == pytest.approx(b.min())
    assert (f["n_ok"], f["n_failed"], f["n_clients"]) == (4, 1, 5)
    assert f["status_counts"] == {"ok": 4, "failed": 1}
    table = format_table(summary)
    assert "tina" in table and "fedavg" in table and f"{100 * a.mean():.1f}" in table
    assert len(table.splitlines()) == 4


def test_old_and_new_clients_apart_and_the_curve():
    """Old clients' final round and new clients' one result, each with mean, std, worst 10%, min; the curve is
    the old clients' mean per round; unserved clients count apart and never enter a mean."""
    from fedtina.report.summary import rounds_to

    rng = np.random.default_rng(0)
    results = []
    for rnd, level in ((1, 0.5), (2, 0.7), (3, 0.8)):
        results += [ClientResult("fedrep", c, rnd, level + 0.01 * c, 10, False, "ok") for c in range(8)]
    new = rng.uniform(0.2, 0.9, 4)
    results += [ClientResult("fedrep", 8 + j, 3, float(a), 10, False, "ok", label_budget=[1, 5, -1, 1][j],
                             is_new=True) for j, a in enumerate(new)]
    results.append(ClientResult("fedrep", 12, 3, None, 0, False, "unserved", "no labels", label_budget=0,
                                is_new=True))
    s = summarize(results, [], {"fedrep": 3})["methods"]["fedrep"]
    old = 0.8 + 0.01 * np.arange(8)
    assert s["old_clients"]["acc_mean"] == pytest.approx(old.mean()) and s["old_clients"]["acc_min"] == 0.8
    assert s["new_clients"]["acc_mean"] == pytest.approx(new.mean())
    assert s["new_clients"]["acc_std"] == pytest.approx(new.std())
    assert s["new_clients"]["acc_worst10"] == pytest.approx(new.min()) == s["new_clients"]["acc_min"]
    assert (s["new_clients"]["n_clients"], s["new_clients"]["n_ok"], s["new_clients"]["n_unserved"]) == (5, 4, 1)
    assert s["new_clients"]["acc_by_labels"] == {"-1": pytest.approx(new[2]), "0": None,
                                                 "1": pytest.approx(new[[0, 3]].mean()), "5": pytest.approx(new[1])}
    assert [p["round"] for p in s["curve"]] == [1, 2, 3]
    assert [p["acc_mean"] for p in s["curve"]] == pytest.approx([0.535, 0.735, 0.835])
    assert s["rounds_to_95"] == 3   # round 2's 0.735 is below 0.95 * 0.835
    assert rounds_to([{"round": 1, "acc_mean": 0.80}, {"round": 2, "acc_mean": 0.84}]) == 1 and rounds_to([]) is None
    table = format_by_labels({"methods": {"fedrep": s}})
    assert "unserved" in table and f"{100 * new[1]:.1f}" in table


def test_write_report(tmp_path):
    _, results, records = _results_and_records()
    results.append(ClientResult("selection", 0, 1, None, 0, False, "error", "multi\nline"))
    summary = summarize(results, records, {"tina": 3, "fedavg": 2})
    growth = [{"round": r, "zoo_size": 100 + 10 * r, "mean_acc": 0.5 + 0.05 * r, "std_acc": 0.1,
               "accepted": 10, "refused": r} for r in range(1, 4)]
    paths = write_report(tmp_path, summary, results, records, growth)
    names = {p.name for p in paths}
    assert names == {"summary.json", "clients.csv", "phases.csv", "comparison.csv", "acc_by_method.png",
                     "time_by_phase.png", "zoo_growth.png", "acc_by_round.png", "acc_vs_compute.png"}
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)

    def rows(name):
        with open(tmp_path / name, newline="") as fh:
            return list(csv.DictReader(fh))

    assert len(rows("clients.csv")) == len(results)
    assert len(rows("phases.csv")) == len(records)
    comp = rows("comparison.csv")
    assert [r["method"] for r in comp] == ["tina", "fedavg", "selection"]
    assert comp[2]["acc_mean"] == ""  # no ok client: empty, not NaN
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["summary"]["methods"]["tina"]["n_ok"] == 12 and len(doc["clients"]) == len(results)
    assert not any(isinstance(v, float) and math.isnan(v) for v in doc["summary"]["methods"]["tina"].values())
    assert "zoo_growth.png" not in {p.name for p in write_report(tmp_path / "b", summary, results, records, None)}


def test_client_rows_say_whether_the_upload_was_accepted(tmp_path):
    why = "classes 'a' and 'b' swapped or confused: ... AUC 0.00 vs 1.00 under the head the server sent, ..."
    results = [ClientResult("tina", 0, 1, 0.7, 10, True, "ok"),
               ClientResult("tina_ft", 0, 1, 0.9, 10, True, "ok", upload="refused", upload_detail=why),
               ClientResult("tina_ft", 1, 1, 0.8, 10, False, "ok", upload="accepted", upload_detail="ok")]
    write_report(tmp_path, summarize(results, [], {"tina": 1, "tina_ft": 1}), results, [])
    with open(tmp_path / "clients.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["upload"], r["upload_detail"]) for r in rows] == [
        ("tina", "", ""), ("tina_ft", "refused", why), ("tina_ft", "accepted", "ok")]
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["upload"], r["upload_detail"]) for r in doc["clients"]] == [("", ""), ("refused", why),
                                                                          ("accepted", "ok")]


def test_pair_aucs_equal_the_pairwise_definition_ties_included():
    """The vectorised per-class AUCs of the gate against the definition, pair by pair (integer logits: many ties)."""
    from fedtina.server.gate import pair_aucs

    rng = np.random.default_rng(4)
    for k in (2, 3, 7):
        y = rng.integers(0, k, 10 * k)
        x = rng.integers(-2, 3, (len(y), 6)).astype(np.float32)
        head = Head(tuple(f"c{i}" for i in range(k)), rng.integers(-1, 2, (k, 6)).astype(np.float32),
                    np.zeros(k, np.float32))
        checked = np.bincount(y, minlength=k) >= 4
        checked[0] = False                                    # an unchecked class: its row and column stay NaN
        z = x @ head.weight.T
        want = np.full((k, k), np.nan)
        for a in range(k):
            for b in range(a + 1, k):
                if checked[a] and checked[b]:
                    da, db = z[y == a, a] - z[y == a, b], z[y == b, a] - z[y == b, b]
                    want[a, b] = np.mean([(p > q) + 0.5 * (p == q) for p in da for q in db])
        got = pair_aucs(head, x, y, checked)
        np.testing.assert_allclose(got, want, equal_nan=True)
        assert np.isnan(got[0]).all() and np.isfinite(got[1:, 1:][np.triu(np.ones((k - 1, k - 1)), 1) > 0]).all()
