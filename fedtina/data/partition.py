"""Non-IID client partitions for the simulated federation, built once by the driver and read by every ClientApp.

Each client holds k classes (k uniform in [k_min, k_max]); a share of the clients also holds classes the generic model
and the zoo never saw (unseen classes). Clients hold only zoo-part images (to train on) and test-part images (to score
on) -- never backbone-part images, which the generic model was trained on. Each class's images are split among the
clients that hold it with Dirichlet(alpha) proportions (quantity skew), so clients differ both in *which* classes they
have and in *how many* images of each. With `scheme` other than `fedtina`, a Flower Datasets partitioner deals the
seen classes' images instead (`partitioners.py`); everything else stays as it is. A `new_share` of the clients,
drawn at random, never trains: they arrive after the last round (with their own label budgets,
`new_labels_per_class`).

The partition is a small JSON file (`save_partition` / `load_partition`): class ids, names, image indices and their
dataset labels per client, plus the server's held-out test images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedtina.config import BELOW_ONE, NON_NEGATIVE, POSITIVE, UNIT, bounded
from fedtina.data.base import ImageDataset
from fedtina.errors import CorruptFileError, FedtinaError
from fedtina.data.partitioners import SCHEMES, deal_seen
from fedtina.io import atomic_write

if TYPE_CHECKING:
    from fedtina.data.split import ProtocolSplit

FORMAT_VERSION = 1
DESCRIPTIONS = ("names", "sentence")


def _empty_ids() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class PartitionConfig:
    scheme: str = "fedtina"             # who deals the seen classes: fedtina | dirichlet | inner_dirichlet |
                                        # pathological (flwr-datasets, partitioners.py)
    k_min: int = bounded(5, POSITIVE)   # fedtina: k uniform in [k_min, k_max]; pathological: k_max each; dirichlet and
    k_max: int = bounded(10, POSITIVE)  # inner_dirichlet: at most k_max (a client's largest classes)
    alpha: float = bounded(0.5, POSITIVE)  # Dirichlet concentration: a class's images over its holders (fedtina), a
                                           # client's classes (dirichlet, inner_dirichlet)
    unseen_share: float = bounded(0.2, UNIT)  # share of clients that hold unseen classes
    unseen_per_client: int = bounded(2, NON_NEGATIVE)
    test_fraction_server: float = bounded(0.2, BELOW_ONE)  # of each class's test-part images, kept by the server for
                                                           # its checks
    description: str = "names"          # names | sentence
    template: str = "a model for: {names}"
    seed: int = bounded(0, NON_NEGATIVE)
    labels_per_class: list[int] | None = None   # label budgets, client i gets [i % len]: at most this many labelled
                                                # training images per class (0: it can only describe); None: all
    new_share: float = bounded(0.2, BELOW_ONE)  # share of clients that never train: they arrive after the last round
    new_labels_per_class: list[int] | None = None   # label budgets of the new clients, new client j gets [j % len]
                                                # (-1: all it holds); None: as labels_per_class


@dataclass(frozen=True)
class ClientSpec:
    """One client: its classes (logit order = this order) and its images. `train_labels` / `test_labels` are the
    dataset class ids of `train_idx` / `test_idx`, so a client never needs the dataset itself."""

    client_id: int
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    train_idx: np.ndarray               # int64 image indices (zoo part of the split)
    test_idx: np.ndarray                # int64 image indices (test part, minus the server's held-out share)
    has_unseen: bool
    description: str
    train_labels: np.ndarray = field(default_factory=_empty_ids)  # int64 dataset class ids, aligned with train_idx
    test_labels: np.ndarray = field(default_factory=_empty_ids)   # int64 dataset class ids, aligned with test_idx
    label_budget: int = -1              # labelled training images per class it was allowed (-1: all it holds)
    is_new: bool = False                # arrives after the last round (never trains)

    @property
    def k(self) -> int:
        return len(self.class_ids)


@dataclass
class Partition:
    clients: list[ClientSpec]
    server_val_idx: np.ndarray          # int64 test-part images the server keeps for its head checks
    config: PartitionConfig
    server_val_labels: np.ndarray = field(default_factory=_empty_ids)  # their dataset class ids

    @property
    def n_clients(self) -> int:
        return len(self.clients)

    def stats(self) -> dict[str, float]:
        """A few numbers for logs: classes, images and unseen clients per client."""
        ks = [c.k for c in self.clients]
        tr = [len(c.train_idx) for c in self.clients]
        te = [len(c.test_idx) for c in self.clients]
        return {"clients": len(self.clients), "k_mean": float(np.mean(ks)), "train_mean": float(np.mean(tr)),
                "train_min": int(np.min(tr)), "test_mean": float(np.mean(te)),
                "with_unseen": int(sum(c.has_unseen for c in self.clients)), "server_val": len(self.server_val_idx),
                "new": int(sum(c.is_new for c in self.clients))}


# --------------------------------------------------------------------------------------------------------------------
# Building


def unseen_clients(cfg: PartitionConfig, n_clients: int) -> int:
    """How many of `n_clients` clients hold unseen classes."""
    return int(round(cfg.unseen_share * n_clients)) if n_clients > 0 else 0


def new_clients(cfg: PartitionConfig, n_clients: int) -> int:
    """How many of `n_clients` clients arrive after training."""
    return int(round(cfg.new_share * n_clients)) if n_clients > 0 else 0


def check_config(cfg: PartitionConfig, n_clients: int) -> None:
    """The rules that need no dataset (fedtina.validate runs them before anything is loaded): each impossible
    setting raises a FedtinaError that names the value and the limit."""
    if n_clients < 1:
        raise FedtinaError(f"n_clients={n_clients}: need at least one client")
    if cfg.scheme not in SCHEMES:
        raise FedtinaError(f"partition.scheme={cfg.scheme!r}; valid: {list(SCHEMES)}")
    if cfg.alpha <= 0:
        raise FedtinaError(f"partition.alpha={cfg.alpha}: the Dirichlet concentration must be > 0")
    if not 1 <= cfg.k_min <= cfg.k_max:
        raise FedtinaError(f"partition.k_min={cfg.k_min}, partition.k_max={cfg.k_max}: need 1 <= k_min <= k_max")
    if not 0.0 <= cfg.unseen_share <= 1.0:
        raise FedtinaError(f"partition.unseen_share={cfg.unseen_share}: must be in [0, 1]")
    if not 0.0 <= cfg.test_fraction_server < 1.0:
        raise FedtinaError(f"partition.test_fraction_server={cfg.test_fraction_server}: must be in [0, 1)")
    if cfg.description not in DESCRIPTIONS:
        raise FedtinaError(f"partition.description={cfg.description!r}; valid: {list(DESCRIPTIONS)}")
    if cfg.description == "sentence" and "{names}" not in cfg.template:
        raise FedtinaError(f"partition.template={cfg.template!r} has no '{{names}}' placeholder")
    budgets = cfg.labels_per_class
    if budgets is not None and (not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 0
                                                   for b in budgets)):
        raise FedtinaError(f"partition.labels_per_class={budgets}: need a non-empty list of integers >= 0 "
                           f"(or null for every image)")
    if not 0.0 <= cfg.new_share < 1.0:
        raise FedtinaError(f"partition.new_share={cfg.new_share}: must be in [0, 1)")
    if n_clients - new_clients(cfg, n_clients) < 1:
        raise FedtinaError(f"partition.new_share={cfg.new_share} makes all {n_clients} clients new: no client would "
                           f"train; lower it or add clients")
    nb = cfg.new_labels_per_class
    if nb is not None and (not nb or any(isinstance(b, bool) or not isinstance(b, int) or b < -1 for b in nb)):
        raise FedtinaError(f"partition.new_labels_per_class={nb}: need a non-empty list of integers >= 0, or -1 "
                           f"for every image (or null: as labels_per_class)")
    if unseen_clients(cfg, n_clients) > 0:
        u = cfg.unseen_per_client
        if u < 1:
            raise FedtinaError(f"partition.unseen_per_client={u}: must be >= 1 when unseen_share > 0")
        if u > cfg.k_min:
            raise FedtinaError(f"partition.unseen_per_client={u} exceeds partition.k_min={cfg.k_min}")


def check_classes(cfg: PartitionConfig, n_clients: int, n_seen: int, n_unseen: int) -> None:
    """`check_config`, then the rules on the split's class counts (fedtina.validate runs them on the loaded split,
    before the backbone trains)."""
    check_config(cfg, n_clients)
    n_classes = n_seen + n_unseen
    n_unseen_clients = unseen_clients(cfg, n_clients)
    if cfg.k_max > n_classes:
        raise FedtinaError(f"partition.k_max={cfg.k_max} exceeds the number of classes ({n_classes})")
    if n_clients - n_unseen_clients > 0 and cfg.k_max > n_seen:
        raise FedtinaError(f"partition.k_max={cfg.k_max} exceeds the number of seen classes ({n_seen}) that "
                           f"seen-only clients draw from")
    if n_unseen_clients > 0:
        u = cfg.unseen_per_client
        if u > n_unseen:
            raise FedtinaError(f"partition.unseen_per_client={u} exceeds the number of unseen classes ({n_unseen})")
        if cfg.k_max - u > n_seen:
            raise FedtinaError(f"partition.k_max={cfg.k_max} needs {cfg.k_max - u} seen classes beside the unseen "
                               f"ones, but there are only {n_seen}")


def _least_used(pool: np.ndarray, counts: dict[int, int], m: int, rng: np.random.Generator) -> list[int]:
    """The m classes of `pool` used least so far, ties broken at random: keeps class usage even across clients."""
    if m == 0:
        return []
    key = np.array([counts[int(c)] for c in pool], dtype=np.float64) + 0.5 * rng.random(len(pool))
    chosen = [int(c) for c in pool[np.argsort(key, kind="stable")[:m]]]
    for c in chosen:
        counts[c] += 1
    return chosen


def _unseen_holders(n_clients: int, n_unseen_clients: int, rng: np.random.Generator) -> np.ndarray:
    with_unseen = np.zeros(n_clients, dtype=bool)
    with_unseen[rng.choice(n_clients, size=n_unseen_clients, replace=False)] = True
    return with_unseen


def _assign_dealt(cfg: PartitionConfig, n_clients: int, seen_images: np.ndarray, seen_labels: np.ndarray,
                  unseen: np.ndarray, n_unseen_clients: int, rng: np.random.Generator
                  ) -> tuple[list[tuple[list[int], bool]], list[dict[int, np.ndarray]]]:
    """`_assign_classes` for a Flower Datasets scheme: the partitioner deals the seen classes' images (a client
    holding unseen classes keeps room for them under k_max), then unseen classes are dealt least-used-first."""
    with_unseen = _unseen_holders(n_clients, n_unseen_clients, rng)
    n_unseen = np.where(with_unseen, cfg.unseen_per_client, 0)
    dealt = deal_seen(cfg.scheme, seen_images, seen_labels, cfg.k_max - n_unseen, cfg.alpha, cfg.k_max, cfg.seed)
    counts = {int(c): 0 for c in unseen}
    return [(sorted([*dealt[cid], *_least_used(unseen, counts, int(n_unseen[cid]), rng)]), bool(with_unseen[cid]))
            for cid in range(n_clients)], dealt


def _assign_classes(cfg: PartitionConfig, n_clients: int, seen: np.ndarray, unseen: np.ndarray,
                    n_unseen_clients: int, rng: np.random.Generator) -> list[tuple[list[int], bool]]:
    """Per client: (sorted class ids, has_unseen). k is uniform in [k_min, k_max]; which clients hold unseen classes
    is drawn at random; classes are dealt least-used-first so every class ends up with about the same number of
    holders."""
    ks = rng.integers(cfg.k_min, cfg.k_max + 1, size=n_clients)
    with_unseen = _unseen_holders(n_clients, n_unseen_clients, rng)
    counts = {int(c): 0 for c in np.concatenate([seen, unseen])}
    out = []
    for cid in range(n_clients):
        u = cfg.unseen_per_client if with_unseen[cid] else 0
        classes = _least_used(unseen, counts, u, rng) + _least_used(seen, counts, int(ks[cid]) - u, rng)
        out.append((sorted(classes), bool(with_unseen[cid])))
    return out


def _divide(images: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Split one class's image indices among `len(shares)` clients in proportion to `shares`, each holder
    getting at least one image. When there are fewer images than holders, images are *shared*: holder j gets
    image j mod len(images), so every holder still has one (the clients then overlap on that class)."""
    n, n_holders = len(images), len(shares)
    if n == 0:
        return [images[:0] for _ in range(n_holders)]
    images = images[rng.permutation(n)]
    if n < n_holders:
        return [images[j % n : j % n + 1] for j in range(n_holders)]
    extra = rng.multinomial(n - n_holders, shares)
    bounds = np.concatenate([[0], np.cumsum(1 + extra)])
    return [images[bounds[j] : bounds[j + 1]] for j in range(n_holders)]


def _label_budgets(parts: list[list[np.ndarray]], budgets: list[int],
                   rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Client i keeps a random `budgets[i % len]` of its training images of each class (its labelled ones). A
    budget above what any client holds of any class is a mistake, not a no-op."""
    most = max((len(p) for ps in parts for p in ps), default=0)
    if max(budgets) > most:
        raise FedtinaError(f"partition.labels_per_class={budgets}: no client holds more than {most} training images "
                           f"of a class; a budget of {max(budgets)} would change nothing")
    return [[rng.permutation(p)[: budgets[cid % len(budgets)]] for p in ps] for cid, ps in enumerate(parts)]


def _describe(names: tuple[str, ...], cfg: PartitionConfig) -> str:
    joined = ", ".join(names)
    return joined if cfg.description == "names" else cfg.template.format(names=joined)


def make_partition(ds: ImageDataset, split: "ProtocolSplit", n_clients: int, cfg: PartitionConfig) -> Partition:
    """Seeded, reproducible non-IID partition of `ds` over `n_clients` clients (see the module docstring).

    Train images come only from `split.zoo_idx`, local test images only from `split.test_idx`; of each class's
    test-part images a `test_fraction_server` share (at least one image is always left for the clients) goes to
    `server_val_idx`, disjoint from every client's test images. Only classes in `split.seen` / `split.unseen` are
    used. A held class with no zoo-part image raises FedtinaError (its clients would have nothing to train on)."""
    seen = np.asarray(split.seen, dtype=np.int64)
    unseen = np.asarray(split.unseen, dtype=np.int64)
    check_classes(cfg, n_clients, len(seen), len(unseen))
    n_unseen_clients = unseen_clients(cfg, n_clients)
    rng = np.random.default_rng(cfg.seed)
    labels = np.asarray(ds.labels, dtype=np.int64)
    zoo_idx, test_idx = np.asarray(split.zoo_idx, dtype=np.int64), np.asarray(split.test_idx, dtype=np.int64)
    dealt: list[dict[int, np.ndarray]] = []   # per client, the seen classes a Flower Datasets partitioner dealt it
    if cfg.scheme == "fedtina":
        assignment = _assign_classes(cfg, n_clients, seen, unseen, n_unseen_clients, rng)
    else:
        seen_zoo = zoo_idx[np.isin(labels[zoo_idx], seen)]
        assignment, dealt = _assign_dealt(cfg, n_clients, seen_zoo, labels[seen_zoo], unseen, n_unseen_clients, rng)
    holders: dict[int, list[int]] = {}
    for cid, (classes, _) in enumerate(assignment):
        for c in classes:
            holders.setdefault(c, []).append(cid)

    train_parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    test_parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    server_parts: list[np.ndarray] = []
    for c in np.sort(np.concatenate([seen, unseen])):
        c = int(c)
        test_c = np.sort(test_idx[labels[test_idx] == c])
        test_c = test_c[rng.permutation(len(test_c))]
        n_server = min(int(round(cfg.test_fraction_server * len(test_c))), max(len(test_c) - 1, 0))
        server_parts.append(test_c[:n_server])
        if c not in holders:
            continue
        zoo_c = np.sort(zoo_idx[labels[zoo_idx] == c])
        if len(zoo_c) == 0:
            raise FedtinaError(f"class {c} ({ds.class_names[c]!r}) has no zoo-part image in the split; "
                               f"the {len(holders[c])} client(s) holding it would have nothing to train on")
        # a client's local test data follow the same skew as its train data: the dealt shares, or one Dirichlet draw
        if dealt and c in dealt[holders[c][0]]:
            parts = [dealt[cid][c] for cid in holders[c]]
            shares = np.array([len(p) for p in parts], dtype=np.float64) / sum(len(p) for p in parts)
        else:
            shares = rng.dirichlet(np.full(len(holders[c]), cfg.alpha))
            parts = _divide(zoo_c, shares, rng)
        for cid, part in zip(holders[c], parts):
            train_parts[cid].append(part)
        for cid, part in zip(holders[c], _divide(test_c[n_server:], shares, rng)):
            test_parts[cid].append(part)

    budgets = [-1 if cfg.labels_per_class is None else cfg.labels_per_class[cid % len(cfg.labels_per_class)]
               for cid in range(n_clients)]
    if cfg.labels_per_class is not None:
        train_parts = _label_budgets(train_parts, cfg.labels_per_class, rng)
    # its own stream: adding new clients leaves every other draw (hence older partitions) as it was
    is_new = np.zeros(n_clients, dtype=bool)
    is_new[np.random.default_rng([cfg.seed, 1]).choice(n_clients, size=new_clients(cfg, n_clients),
                                                        replace=False)] = True
    if cfg.new_labels_per_class is not None:
        nb, sub = cfg.new_labels_per_class, np.random.default_rng([cfg.seed, 2])
        for j, cid in enumerate(np.flatnonzero(is_new)):
            budgets[cid] = nb[j % len(nb)]
            if budgets[cid] >= 0:
                train_parts[cid] = [sub.permutation(part)[: budgets[cid]] for part in train_parts[cid]]
    clients = []
    for cid, (classes, has_unseen) in enumerate(assignment):
        names = tuple(ds.class_names[c] for c in classes)
        tr = np.sort(np.concatenate(train_parts[cid])) if train_parts[cid] else _empty_ids()
        te = np.sort(np.concatenate(test_parts[cid])) if test_parts[cid] else _empty_ids()
        clients.append(ClientSpec(cid, tuple(classes), names, tr, te, has_unseen, _describe(names, cfg),
                                  labels[tr], labels[te], budgets[cid], bool(is_new[cid])))
    server_val = np.sort(np.concatenate(server_parts)) if server_parts else _empty_ids()
    return Partition(clients, server_val, cfg, labels[server_val])


# --------------------------------------------------------------------------------------------------------------------
# Saving and loading


def _client_to_json(c: ClientSpec) -> dict:
    return {"client_id": c.client_id, "class_ids": list(c.class_ids), "class_names": list(c.class_names),
            "train_idx": c.train_idx.tolist(), "train_labels": c.train_labels.tolist(),
            "test_idx": c.test_idx.tolist(), "test_labels": c.test_labels.tolist(),
            "has_unseen": c.has_unseen, "description": c.description, "label_budget": c.label_budget,
            "is_new": c.is_new}


def _ids(values: list) -> np.ndarray:
    """Int64 array, read-only: a loaded partition is cached and shared, so nobody may modify it in place."""
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    arr.flags.writeable = False
    return arr


def _client_from_json(d: dict) -> ClientSpec:
    return ClientSpec(int(d["client_id"]), tuple(int(c) for c in d["class_ids"]), tuple(d["class_names"]),
                      _ids(d["train_idx"]), _ids(d["test_idx"]), bool(d["has_unseen"]), str(d["description"]),
                      _ids(d["train_labels"]), _ids(d["test_labels"]), int(d.get("label_budget", -1)),
                      bool(d.get("is_new", False)))


def save_partition(path: str | Path, partition: Partition) -> None:
    """JSON, written to a temp file in the same directory then renamed: readers see the old file or the new one."""
    path = Path(path)
    doc = {"format_version": FORMAT_VERSION, "config": asdict(partition.config),
           "server_val_idx": partition.server_val_idx.tolist(),
           "server_val_labels": partition.server_val_labels.tolist(),
           "clients": [_client_to_json(c) for c in partition.clients]}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, separators=(",", ":"))))


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> Partition:
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')!r}, expected {FORMAT_VERSION}")
        clients = [_client_from_json(d) for d in doc["clients"]]
        return Partition(clients, _ids(doc["server_val_idx"]), PartitionConfig(**doc["config"]),
                         _ids(doc["server_val_labels"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"partition file {path} is corrupt or not a fedtina partition "
                               f"({type(e).__name__}: {e})") from e


def load_partition(path: str | Path) -> Partition:
    """The partition saved at `path`, cached per process on (path, mtime): every ClientApp call in a Ray actor reads
    the file once. The returned object is shared; its arrays are read-only."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"partition file {path} does not exist")
    return _load_cached(str(path.resolve()), path.stat().st_mtime_ns)


def client_spec(path: str | Path, client_id: int) -> ClientSpec:
    """One client of a saved partition; an id outside [0, n_clients) raises FedtinaError naming it."""
    part = load_partition(path)
    if not 0 <= int(client_id) < part.n_clients:
        raise FedtinaError(f"client id {client_id} is not in partition {path} ({part.n_clients} clients)")
    return part.clients[int(client_id)]
