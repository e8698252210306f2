"""The upload loop outside Flower, for experiments that repeat it many times under control (attacks, private
uploads): the steps of the tina method's cohorts, on the simulation's own partition and with the same functions.

Tina generates each contributor's head from its description; the contributor fine-tunes it on its labels
(`client_ops.finetune_local`) and may attack or privatise it (`federation.attacks`, `federation.privacy`: what the
ClientApp's mods call); the server's gate checks it (`federation.checks.check_head`, against the selection head and
the sent head, on the server's held-out images); accepted heads join the zoo and Tina is refreshed
(`tina.train.refresh`). Probe clients (the partition's new clients) never upload: they are served zero-shot and
scored overall and per class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from fedtina.config import HeadTrainConfig
from fedtina.client import ops as client_ops
from fedtina.server.gate import CheckResult, HeadCheckConfig, check_head, plausible_row_norm, server_val_data
from fedtina.data.partition import Partition, PartitionConfig, make_partition
from fedtina.zoo.heads import Head, generic_rows, selection_head


@dataclass(frozen=True)
class Upload:
    client: int                  # the contributor's id
    names: tuple[str, ...]       # the label set it described (its head's classes)
    class_ids: tuple[int, ...]
    sent: Head                   # what Tina generated for it
    head: Head                   # what it uploads
    bad: bool = False            # an attacker's upload


@dataclass
class World:
    """A partition's clients with their data, and what the server's gate needs; built once per seed."""

    assets: Any
    partition: Partition
    check_cfg: HeadCheckConfig
    data: dict[int, client_ops.ClientData] = field(default_factory=dict)
    _rows: dict = field(default_factory=dict)

    @property
    def contributors(self) -> list[int]:
        return [c.client_id for c in self.partition.clients if not c.is_new]

    @property
    def probes(self) -> list[int]:
        return [c.client_id for c in self.partition.clients if c.is_new]

    @property
    def norm_scale(self) -> float:
        return plausible_row_norm(self.assets.zoo.entries(), self.assets.bank.generic_weight)

    @property
    def rows(self) -> dict:
        """The generic head's row for every class name (selection's and FedAvg's starting rows)."""
        if not self._rows:
            self._rows.update(generic_rows(self.assets.bank, list(self.assets.dataset.class_names)))
        return self._rows

    def selection(self, names: tuple[str, ...]) -> Head:
        return selection_head(names, self.rows, self.assets.encoder.embed_names)

    def val(self, class_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        return server_val_data(self.assets.bank.features, self.assets.dataset.labels, self.partition.server_val_idx,
                               class_ids)


def make_world(assets, n_clients: int, part_cfg: PartitionConfig, check_cfg: HeadCheckConfig) -> World:
    partition = make_partition(assets.dataset, assets.split, n_clients, part_cfg)
    feats = np.asarray(assets.bank.features, np.float32)
    data = {c.client_id: client_ops.client_data(c, feats) for c in partition.clients}
    return World(assets, partition, check_cfg, data)


def serve(tina, world: World, ids: Iterable[int], seed: int = 0) -> dict[int, Head]:
    """Tina's zero-shot head for each client, from its class names (one batched sampler call)."""
    ids = list(ids)
    heads = tina.generate([list(world.data[i].class_names) for i in ids], seed=seed)
    return dict(zip(ids, heads))


def finetune(world: World, sent: dict[int, Head], cfg: HeadTrainConfig) -> dict[int, Head]:
    """Each client's head fine-tuned on its labelled images (a contributor's honest upload)."""
    return {i: client_ops.finetune_local(h, world.data[i], cfg, device="cpu") for i, h in sent.items()}


def gate(world: World, uploads: list[Upload]) -> list[CheckResult]:
    d = int(world.assets.bank.features.shape[1])
    norm = world.norm_scale
    out = []
    for u in uploads:
        try:
            out.append(check_head(u.head, u.names, d, world.selection(u.names), *world.val(u.class_ids), norm,
                                  world.check_cfg, sent=u.sent))
        except Exception as e:  # noqa: BLE001 - as the server does: a malformed upload is refused, never fatal
            out.append(CheckResult(False, f"malformed upload: {type(e).__name__}: {e}", None, None))
    return out


def zoo_entries(uploads: Iterable[Upload]) -> list:
    from fedtina.zoo.store import ZooEntry

    return [ZooEntry(class_names=u.names, params=u.head.params(), metrics={}, source=f"client:{u.client}")
            for u in uploads]


def refreshed(tina, world: World, uploads: Iterable[Upload], steps: int, seed: int | None = None):
    """Tina after a refresh on the zoo plus `uploads` (`seed`: the refresh's batches, default Tina's)."""
    from fedtina.tina.train import refresh

    return refresh(tina, list(world.assets.zoo.entries()) + zoo_entries(uploads), steps,
                   shots=world.assets.shots, descriptions=world.assets.descriptions, seed=seed)


@dataclass
class ProbeScores:
    acc: float                                  # mean k-way accuracy over the probe clients
    recall: dict[str, list[float]]              # class name -> its recall in each probe task that holds it

    def class_recall(self, names: Iterable[str]) -> float:
        """Mean recall over the (probe, class) pairs of `names` (NaN: no probe holds one)."""
        vals = [r for n in names for r in self.recall.get(n, [])]
        return float(np.mean(vals)) if vals else float("nan")


def probe(tina, world: World, seed: int = 0) -> ProbeScores:
    heads = serve(tina, world, world.probes, seed)
    accs, recall = [], {}
    for i, head in heads.items():
        data = world.data[i]
        aligned = client_ops.align_head(head, data.class_names, data.feature_dim)
        pred = np.argmax(data.test_x @ aligned.weight.T + aligned.bias, axis=1)
        accs.append(float(np.mean(pred == data.test_y)))
        for j, name in enumerate(data.class_names):
            mask = data.test_y == j
            if mask.any():
                recall.setdefault(name, []).append(float(np.mean(pred[mask] == j)))
    return ProbeScores(float(np.mean(accs)), recall)
