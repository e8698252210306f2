"""The seen classes' training images dealt by a Flower Datasets partitioner (`partition.scheme`).

fedtina's own scheme (`fedtina`: k classes per client, a class's images split among its holders with Dirichlet
shares) lives in `partition.py`. The other schemes hand the zoo-part images of the seen classes to the partitioner the
FL literature knows them by -- `DirichletPartitioner` (label skew and size skew), `InnerDirichletPartitioner` (label
skew, equal sizes), `PathologicalPartitioner` (k_max classes per client, a class split evenly among its holders) --
and keep fedtina's own parts for what those partitioners do not model: the clients holding unseen classes, the same
skew for a client's test images, the server's hold-out and label budgets (all in `partition.py`).

A client keeps at most `caps[cid]` classes, its largest: Tina generates at most `tina.max_classes` rows and the
description lists every class, so the long tail of a Dirichlet draw (classes with one or two images) is left unused.
"""

from __future__ import annotations

import warnings

import numpy as np

from fedtina.errors import FedtinaError

SCHEMES = ("fedtina", "dirichlet", "inner_dirichlet", "pathological")
_DIRICHLET_MIN_SIZE = 10   # flwr-datasets' default, relaxed to half the mean client size when that is smaller


def _partitioner(scheme: str, n_clients: int, n_images: int, alpha: float, k_max: int, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, InnerDirichletPartitioner, PathologicalPartitioner

    if scheme == "dirichlet":
        return DirichletPartitioner(num_partitions=n_clients, partition_by="label", alpha=alpha, seed=seed,
                                    min_partition_size=max(1, min(_DIRICHLET_MIN_SIZE, n_images // (2 * n_clients))))
    if scheme == "inner_dirichlet":
        sizes = np.full(n_clients, n_images // n_clients, dtype=np.int64)
        sizes[: n_images % n_clients] += 1
        return InnerDirichletPartitioner(partition_sizes=sizes.tolist(), partition_by="label", alpha=alpha, seed=seed)
    if scheme == "pathological":
        return PathologicalPartitioner(num_partitions=n_clients, partition_by="label", num_classes_per_partition=k_max,
                                       class_assignment_mode="random", seed=seed)
    raise FedtinaError(f"partition.scheme={scheme!r}; valid: {list(SCHEMES)}")


def deal_seen(scheme: str, images: np.ndarray, labels: np.ndarray, caps: np.ndarray, alpha: float, k_max: int,
              seed: int) -> list[dict[int, np.ndarray]]:
    """Per client, {class id: its image indices} of the seen-class images `images` (dataset labels `labels`), dealt
    by the scheme's Flower Datasets partitioner over `len(caps)` clients; client i keeps its `caps[i]` largest
    classes (ties: lower class id). A partitioner that cannot deal the data raises one FedtinaError naming why."""
    from datasets import Dataset

    n_clients, n = len(caps), len(images)
    if n < n_clients:
        raise FedtinaError(f"partition.scheme={scheme}: {n} seen-class training images cannot be dealt to "
                           f"{n_clients} clients; lower clients or use partition.scheme=fedtina (it shares images)")
    partitioner = _partitioner(scheme, n_clients, n, alpha, k_max, seed)
    # labels as 0..C-1: InnerDirichletPartitioner indexes its class priors by label value
    ranks = np.unique(labels, return_inverse=True)[1].astype(np.int64)
    partitioner.dataset = Dataset.from_dict({"label": ranks, "row": np.arange(n)})
    rows_of = []
    try:
        with warnings.catch_warnings():
            # it warns on every redraw; what counts is whether it ends in a partition or gives up (the error below)
            warnings.simplefilter("ignore", UserWarning)
            for cid in range(n_clients):
                rows_of.append(np.asarray(partitioner.load_partition(cid)["row"], dtype=np.int64))
    except ValueError as e:   # flwr-datasets' word for "these settings cannot be met"
        raise FedtinaError(f"partition.scheme={scheme} cannot deal {n} images of {len(np.unique(labels))} seen "
                           f"classes to {n_clients} clients: {e}") from None
    dealt = []
    for rows, cap in zip(rows_of, caps):
        classes, counts = np.unique(labels[rows], return_counts=True)
        keep = classes[np.lexsort((classes, -counts))[: int(cap)]]
        dealt.append({int(c): np.sort(images[rows[labels[rows] == c]]) for c in keep})
    empty = [cid for cid, parts in enumerate(dealt) if not parts and caps[cid] > 0]
    if empty:
        raise FedtinaError(f"partition.scheme={scheme} left {len(empty)} client(s) without a seen class (first: "
                           f"client {empty[0]}); raise partition.alpha or lower clients")
    return dealt
