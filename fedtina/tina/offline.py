"""The simulation's clients outside Flower, for experiments that replay the upload loop many times under control
(uploads, attacks, private uploads): the same partition, client data and client steps as a simulation, served by
the same Tina service (fedtina/tina/service.py).

The partition's old clients are the contributors: each gets Tina's head and fine-tunes it on its labels
(`client_ops.finetune_local`, what the ClientApp runs). Its new clients are the probes: they never upload; they are
served zero-shot and scored overall and per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from fedtina.client import ops as client_ops
from fedtina.config import HeadTrainConfig
from fedtina.data.partition import Partition, PartitionConfig, make_partition
from fedtina.server.gate import HeadCheckConfig, plausible_row_norm
from fedtina.server.reference import ServerReference
from fedtina.tina.probe import draw_class_sets, probe_set
from fedtina.tina.service import TinaService, Upload, ZooList, uploaded_rows
from fedtina.zoo.heads import Head


@dataclass
class World:
    """A partition's clients with their data; built once per seed."""

    assets: Any
    partition: Partition
    data: dict[int, client_ops.ClientData]

    @property
    def contributors(self) -> list[int]:
        return [c.client_id for c in self.partition.clients if not c.is_new]

    @property
    def probes(self) -> list[int]:
        return [c.client_id for c in self.partition.clients if c.is_new]

    def service(self, check_cfg: HeadCheckConfig, bank: bool = False, probe_tasks: int = 0) -> TinaService:
        """A Tina service for these clients: the cached Tina, a copy of the prepared zoo in memory, the gate's row-norm
        scale from it; `bank`: serve uploaded rows (method.tina.bank); `probe_tasks`: the server's probe set that
        gates a refresh, as the simulation draws it (0: every refresh adopted)."""
        zoo = ZooList(self.assets.zoo.entries())
        norm = plausible_row_norm(zoo.entries(), self.assets.bank.generic_weight)
        reference = ServerReference(self.assets, self.partition.server_val_idx)
        gate = None
        if probe_tasks:
            sets = draw_class_sets(self.partition, self.assets.dataset.labels, probe_tasks)
            gate = probe_set(sets, self.assets.dataset.class_names, reference.val_data)
        return TinaService(self.assets.tina, self.assets, reference, zoo, check_cfg, norm,
                           bank=uploaded_rows(zoo) if bank else None, probe=gate)

    def upload(self, client: int, sent: Head, head: Head, bad: bool = False) -> Upload:
        """The client's upload, with its evidence: its labelled images per class."""
        data = self.data[client]
        return Upload(client, data.class_names, data.class_ids, sent, head, bad,
                      images=len(data.train_y) / max(len(data.class_names), 1))


def make_world(assets, n_clients: int, part_cfg: PartitionConfig) -> World:
    partition = make_partition(assets.dataset, assets.split, n_clients, part_cfg)
    feats = np.asarray(assets.bank.features, np.float32)
    return World(assets, partition, {c.client_id: client_ops.client_data(c, feats) for c in partition.clients})


def serve(service: TinaService, world: World, ids: Iterable[int], seed: int = 0) -> dict[int, Head]:
    """The service's head for each client, from its class names."""
    ids = list(ids)
    return dict(zip(ids, service.serve([world.data[i].class_names for i in ids], seed=seed)))


def finetune(world: World, sent: dict[int, Head], cfg: HeadTrainConfig) -> dict[int, Head]:
    """Each client's head fine-tuned on its labelled images (a contributor's honest upload)."""
    return {i: client_ops.finetune_local(h, world.data[i], cfg, device="cpu") for i, h in sent.items()}


def recalls(head: Head, data: client_ops.ClientData) -> dict[str, float]:
    """Each class's recall inside the client's k-way task, on its test images."""
    aligned = client_ops.align_head(head, data.class_names, data.feature_dim)
    pred = np.argmax(data.test_x @ aligned.weight.T + aligned.bias, axis=1)
    return {n: float(np.mean(pred[data.test_y == j] == j)) for j, n in enumerate(data.class_names)
            if (data.test_y == j).any()}


@dataclass
class ProbeScores:
    acc: float                                  # mean k-way accuracy over the probe clients
    recall: dict[str, list[float]]              # class name -> its recall in each probe task that holds it

    def class_recall(self, names: Iterable[str]) -> float:
        """Mean recall over the (probe, class) pairs of `names` (NaN: no probe holds one)."""
        vals = [r for n in names for r in self.recall.get(n, [])]
        return float(np.mean(vals)) if vals else float("nan")


def probe(service: TinaService, world: World, seed: int = 0) -> ProbeScores:
    """The probes served zero-shot by `service`, scored."""
    accs, recall = [], {}
    for i, head in serve(service, world, world.probes, seed).items():
        data = world.data[i]
        accs.append(client_ops.evaluate_head(head, data)["acc"])
        for name, r in recalls(head, data).items():
            recall.setdefault(name, []).append(r)
    return ProbeScores(float(np.mean(accs)), recall)
