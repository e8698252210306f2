"""What a client does with its data, free of Flower: load its slice of the run's inputs, score a head, fine-tune it,
run the FedAvg local steps on frozen features (the image model's steps: fedtina.client.image_model). ClientApp handlers
(Ray actors) call these; tests call them directly.

Loading is lazy and cached per actor process (`lru_cache`): features are memory-mapped from the run dir's
`features.npy`, so many actors share the page cache instead of each holding a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedtina.config import HeadTrainConfig
from fedtina.errors import CorruptFileError, FedtinaError, LabelSetError, UnknownClassError
from fedtina.data.partition import ClientSpec, client_spec
from fedtina.zoo.heads import Head


@dataclass
class ClientData:
    """A client's frozen features. `train_y` / `test_y` are positions 0..k-1 in `class_ids` order (the order of the
    client's heads); `train_global_y` are dataset class ids (rows of the FedAvg global head)."""

    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    train_x: np.ndarray        # float32 [n_train, d]
    train_y: np.ndarray        # int64 [n_train], positions 0..k-1
    test_x: np.ndarray         # float32 [n_test, d]
    test_y: np.ndarray         # int64 [n_test], positions 0..k-1
    train_global_y: np.ndarray  # int64 [n_train], dataset class ids

    @property
    def k(self) -> int:
        return len(self.class_ids)

    @property
    def feature_dim(self) -> int:
        return int(self.train_x.shape[1])


# --------------------------------------------------------------------------------------------------------------------
# Loading


def to_positions(global_y: np.ndarray, class_ids: tuple[int, ...]) -> np.ndarray:
    """Dataset class ids -> positions in `class_ids`; an id outside `class_ids` raises UnknownClassError."""
    lookup = {int(c): i for i, c in enumerate(class_ids)}
    try:
        return np.fromiter((lookup[int(c)] for c in global_y), dtype=np.int64, count=len(global_y))
    except KeyError as e:
        raise UnknownClassError(f"label {e.args[0]} is not one of the client's classes {list(class_ids)}") from None


def _mtime(path: str) -> int:
    p = Path(path)
    if not p.is_file():
        raise CorruptFileError(f"{path} does not exist; the driver writes it before the simulation starts")
    return p.stat().st_mtime_ns


@lru_cache(maxsize=4)
def _mmap_cached(path: str, mtime_ns: int) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _mmap(path: str) -> np.ndarray:
    """A memory-mapped .npy (read-only), opened once per process (per file version)."""
    return _mmap_cached(path, _mtime(path))


def _rows(array: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows of a memmap as an in-memory array (fancy indexing copies only these rows)."""
    if len(idx) and int(idx.max()) >= len(array):
        raise CorruptFileError(f"image index {int(idx.max())} is out of range for an array of {len(array)} rows; "
                               f"the partition and the features/images file belong to different runs")
    return np.asarray(array[np.asarray(idx, dtype=np.int64)])


def load_client_data(features_path: str, partition_path: str, client_id: int) -> ClientData:
    """Client `client_id`'s features and labels from the run dir. Cached per actor process (keyed on the paths,
    the client id and both files' mtimes): repeat calls, one per message, cost two stat() calls. The returned object
    is shared, so callers must not modify its arrays."""
    return _load_client_data(str(features_path), str(partition_path), int(client_id),
                             _mtime(str(features_path)), _mtime(str(partition_path)))


@lru_cache(maxsize=64)
def _load_client_data(features_path: str, partition_path: str, client_id: int, _f_mtime: int,
                      _p_mtime: int) -> ClientData:
    return client_data(client_spec(partition_path, client_id), _mmap(str(features_path)))


def client_data(spec: ClientSpec, feats: np.ndarray) -> ClientData:
    """A client's ClientData from its spec and the features of every image."""
    return ClientData(spec.class_ids, spec.class_names,
                      _rows(feats, spec.train_idx).astype(np.float32, copy=False),
                      to_positions(spec.train_labels, spec.class_ids),
                      _rows(feats, spec.test_idx).astype(np.float32, copy=False),
                      to_positions(spec.test_labels, spec.class_ids),
                      np.asarray(spec.train_labels, dtype=np.int64))


@dataclass
class ClientImages:
    """A client's raw uint8 [n, H, W, 3] images, for the methods that train the body. Labels as in ClientData:
    positions 0..k-1 in `class_ids` order, and dataset class ids for the training images."""

    class_ids: tuple[int, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    train_global_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_client_images(images_path: str, partition_path: str, client_id: int) -> ClientImages:
    """The client's images from the run dir's `images.npy` (all images, uint8 [N, H, W, 3], written by the driver;
    memory-mapped, only the client's rows are copied)."""
    spec: ClientSpec = client_spec(partition_path, client_id)
    imgs = _mmap(str(images_path))
    return ClientImages(spec.class_ids, _rows(imgs, spec.train_idx), to_positions(spec.train_labels, spec.class_ids),
                        np.asarray(spec.train_labels, dtype=np.int64), _rows(imgs, spec.test_idx),
                        to_positions(spec.test_labels, spec.class_ids))


# --------------------------------------------------------------------------------------------------------------------
# Heads: scoring and fine-tuning


def align_head(head: Head, class_names: tuple[str, ...], feature_dim: int | None = None) -> Head:
    """`head` with rows reordered to `class_names`. Its class names must be exactly those names, in any order:
    duplicates or a missing name -> LabelSetError, a foreign name -> UnknownClassError; a wrong feature width or a
    weight/bias shape mismatch -> FedtinaError."""
    names = tuple(head.class_names)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise LabelSetError(f"head has duplicated class names {dup}")
    foreign = [n for n in names if n not in class_names]
    if foreign:
        raise UnknownClassError(f"head has class(es) {foreign} that the client does not hold ({list(class_names)})")
    missing = [n for n in class_names if n not in names]
    if missing:
        raise LabelSetError(f"head lacks the client's class(es) {missing}")
    weight, bias = np.asarray(head.weight), np.asarray(head.bias)
    if weight.ndim != 2 or weight.shape[0] != len(names) or bias.shape != (len(names),):
        raise FedtinaError(f"head weight {weight.shape} / bias {bias.shape} do not match its {len(names)} classes")
    if feature_dim is not None and weight.shape[1] != feature_dim:
        raise FedtinaError(f"head rows have width {weight.shape[1]}, the features have {feature_dim}")
    if names == tuple(class_names):
        return head
    order = [names.index(n) for n in class_names]
    return Head(tuple(class_names), weight[order], bias[order])


def head_accuracy(head: Head, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of `head` on features `x` with labels `y` = row positions; 0.0 on an empty set."""
    if len(y) == 0:
        return 0.0
    logits = x @ np.asarray(head.weight, dtype=np.float32).T + np.asarray(head.bias, dtype=np.float32)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def evaluate_head(head: Head, data: ClientData) -> dict[str, float]:
    """k-way accuracy over the client's classes on its local test features: {"acc", "num-examples"}.
    The head may list the classes in any order (rows are matched by name). A client without test images reports
    acc 0.0 with num-examples 0, so example-weighted means ignore it."""
    aligned = align_head(head, data.class_names, data.feature_dim)
    return {"acc": head_accuracy(aligned, data.test_x, data.test_y), "num-examples": int(len(data.test_y))}


def finetune_local(head: Head, data: ClientData, cfg: HeadTrainConfig, device: str | None = None) -> Head:
    """Fine-tune `head` on the client's train features (heads.finetune_heads; `device` None = CUDA when visible);
    returns it in the client's class order. With `cfg.select` the client first picks steps/lr/l2 on hold-outs of its
    own training images (heads.oracle_heads): with a few images per class a fixed recipe can overfit and make a good
    received head worse, and "0 steps" (keep it) is one of the candidates."""
    from fedtina.zoo.heads import finetune_heads, oracle_heads

    aligned = align_head(head, data.class_names, data.feature_dim)
    if not len(data.train_y):   # a client with no labelled image keeps what it received
        return aligned
    train = [(data.train_x, data.train_y)]
    if cfg.select:
        return oracle_heads([aligned], train, cfg, device=device)[0]
    return finetune_heads([aligned], train, cfg, device=device)[0]


def class_means(data: ClientData) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [k, d] mean training feature of each class, int64 [k] image counts; a zero row where count is 0):
    what a client sends as its image prompts."""
    count = np.bincount(data.train_y, minlength=data.k).astype(np.int64)
    mean = np.zeros((data.k, data.feature_dim), np.float32)
    np.add.at(mean, data.train_y, data.train_x)
    return mean / np.maximum(count, 1)[:, None], count


def restrict_head(weight: np.ndarray, bias: np.ndarray, class_ids: tuple[int, ...],
                  class_names: tuple[str, ...]) -> Head:
    """The k-way head made of a global head's rows for `class_ids` (row c = dataset class id c): how a FedAvg head
    is scored on, and fine-tuned by, a client."""
    ids = np.asarray(class_ids, dtype=np.int64)
    if len(ids) != len(class_names):
        raise LabelSetError(f"{len(ids)} class ids but {len(class_names)} class names")
    if len(ids) and (ids.min() < 0 or ids.max() >= len(weight)):
        raise UnknownClassError(f"class ids {class_ids} fall outside the global head's {len(weight)} rows")
    return Head(tuple(class_names), np.asarray(weight, dtype=np.float32)[ids].copy(),
                np.asarray(bias, dtype=np.float32)[ids].copy())


# --------------------------------------------------------------------------------------------------------------------
# FedAvg on frozen features


def softmax_xent(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the linear head (weight [C, d], bias [C]) on (x, y), y = row indices."""
    logits = x @ weight.T + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(axis=1))
    return float(np.mean(log_z - logits[np.arange(len(y)), y]))


def fedavg_local_train(weight: np.ndarray, bias: np.ndarray, data: ClientData, epochs: int, lr: float,
                       batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The classic FedAvg client step on frozen features: `epochs` of minibatch SGD on softmax cross-entropy of the
    C-way global head (rows = dataset class ids, labels = `data.train_global_y`). Plain numpy (no torch threads in
    the actor for a linear model). Returns new float32 copies; the inputs are not modified."""
    w = np.array(weight, dtype=np.float32)
    b = np.array(bias, dtype=np.float32)
    x, y = data.train_x, data.train_global_y
    if w.ndim != 2 or b.shape != (w.shape[0],) or w.shape[1] != x.shape[1]:
        raise FedtinaError(f"global head weight {w.shape} / bias {b.shape} do not fit features of width {x.shape[1]}")
    if len(y) and int(y.max()) >= w.shape[0]:
        raise UnknownClassError(f"class id {int(y.max())} has no row in the global head ({w.shape[0]} rows)")
    rng = np.random.default_rng(seed)
    bs = max(1, min(int(batch_size), len(y)))
    for _ in range(int(epochs)):
        perm = rng.permutation(len(y))
        for start in range(0, len(y), bs):
            i = perm[start : start + bs]
            xb, yb = x[i], y[i]
            logits = xb @ w.T + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1.0                   # d loss / d logits
            p /= len(yb)
            w -= lr * (p.T @ xb)
            b -= lr * p.sum(axis=0)
    return w, b
