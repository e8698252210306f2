"""Who the clients are: the node of each client, what it described (`query.describe`) and what its partition says.

Clients are *old* (they take part in training) or *new* (partition.new_share: they arrive after the last round and
each method serves them by its new-client procedure). Node ids are random per simulation; everything that must not
depend on them (the order of sends, of uploads, of a strategy's nodes) goes by client id.

A client's id is its partition id as the engine assigned it to the node (`identity`: the simulation engine's
node -> partition map, fedtina.runtime.node_partitions, or under fedtina.deploy the one its SuperNode keys give,
fedtina.runtime.deployment), never a field the client writes: a ClientApp that says it is client 0 while holding
client 1's partition is client 1, and a node the map does not name is refused (never messaged). Only where the map
is unknown (a deployment without SuperNode authentication) is the id the client's own word, and then an id outside
the partition or one that another node claimed first is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from fedtina.data.partition import Partition
from fedtina.server.replies import BadReply, Description, Holds
from fedtina.tina.generator import parse_label_text

log = logging.getLogger("fedtina.federation")


@dataclass
class Client:
    """What the server knows about a node after `query.describe`: its id, its text and the parsed class names."""

    node_id: int
    client_id: int
    text: str
    names: tuple[str, ...] = ()
    class_ids: tuple[int, ...] = ()
    error: str = ""            # a description the server cannot serve (unknown class, empty, duplicates)
    shots: list | None = None  # per class: [1, d] mean feature of its labelled images (None: none), when the
                               # describe message asked for image prompts


class Roster:
    """The nodes, the clients they described, and the partition's facts about each client id."""

    def __init__(self, partition: Partition, class_names: list[str], feature_dim: int,
                 identity: dict[int, int] | None = None) -> None:
        self.partition = partition
        self.identity = identity                       # node id -> partition id, as the engine assigned them
        self.class_index = {n: i for i, n in enumerate(class_names)}
        self.feature_dim = feature_dim
        self.clients: dict[int, Client] = {}           # node id -> Client
        self.failed: dict[int, str] = {}               # node id -> why its `describe` failed
        self.nodes: list[int] = []
        if identity is None:
            log.warning("[federation] no node -> partition map from the engine (a deployment without SuperNode "
                        "authentication): each client's id is the one it claims, checked only to be a free "
                        "partition id")

    # ---------------------------------------------------------------- ids and order
    def queue_position(self, node: int) -> int:
        """The simulation engine queues messages by partition id (= client id), so sends go in that order."""
        c = self.clients.get(node)
        return c.client_id if c is not None else len(self.nodes)

    def seat(self, ids: Iterable[int]) -> list[int]:
        """The registered nodes `ids` become the run's `nodes`, all of them or, with the engine's map, those it
        names; the others are refused (returned): no message goes to them."""
        ids = list(ids)
        self.nodes = ids if self.identity is None else [n for n in ids if n in self.identity]
        return [n for n in ids if n not in self.nodes]

    def client_id(self, node: int) -> int:
        """The node's partition id (-1: unknown, a node that never described itself in a deployment)."""
        if self.identity is not None:
            return self.identity.get(node, -1)
        return self.clients[node].client_id if node in self.clients else -1

    # ---------------------------------------------------------------- the partition's facts
    def spec_of(self, cid: int):
        return self.partition.clients[cid] if 0 <= cid < len(self.partition.clients) else None

    def has_unseen(self, cid: int) -> bool:
        return bool(c.has_unseen) if (c := self.spec_of(cid)) is not None else False

    def is_new(self, cid: int) -> bool:
        return bool(c.is_new) if (c := self.spec_of(cid)) is not None else False

    def labels(self, cid: int) -> int:
        """Labelled training images the client holds (all classes together)."""
        return len(c.train_idx) if (c := self.spec_of(cid)) is not None else 0

    def holds(self, cid: int) -> Holds:
        """What the client's partition holds: the bounds of the counts its replies report."""
        c = self.spec_of(cid)
        return Holds(len(c.train_idx), len(c.test_idx)) if c is not None else Holds(0, 0)

    def label_budget(self, cid: int) -> int:
        return c.label_budget if (c := self.spec_of(cid)) is not None else -1

    @property
    def old(self) -> list[int]:
        """Nodes of the clients that take part in training, by client id."""
        return sorted((n for n in self.nodes if not self.is_new(self.client_id(n))), key=self.queue_position)

    @property
    def new(self) -> list[int]:
        """Nodes of the clients that arrive after the last round, by client id."""
        return sorted((n for n in self.nodes if self.is_new(self.client_id(n))), key=self.queue_position)

    def cohort_nodes(self, client_ids: Iterable[int]) -> list[int]:
        """The nodes of these clients, by client id: node ids are random per simulation, and the order decides the
        order of uploads in the zoo, hence what a server model trained on it learns (a resumed run must match)."""
        want = {int(i) for i in client_ids}
        return sorted((n for n in self.nodes if self.client_id(n) in want), key=self.queue_position)

    # ---------------------------------------------------------------- descriptions
    def claimed_id(self, node: int, desc: Description) -> int:
        """The node's client id: the engine's; without the engine's map, the one it claims, which must be a free
        partition id (BadReply otherwise)."""
        if self.identity is not None:
            return self.client_id(node)
        cid = desc.client_id
        if not isinstance(cid, int) or isinstance(cid, bool) or self.spec_of(cid) is None:
            raise BadReply(f"desc.client_id={cid!r} is not a partition id in [0, {len(self.partition.clients)})")
        if any(c.client_id == cid for n, c in self.clients.items() if n != node):
            raise BadReply(f"desc.client_id={cid} is claimed by another node")
        return cid

    def add(self, node: int, desc: Description) -> Client:
        """The client a checked `query.describe` reply (fedtina.server.replies.description) describes: its text
        parsed into class names, its image prompts checked against them; what the server cannot serve goes in
        `error`."""
        c = Client(node, self.claimed_id(node, desc), desc.text)
        self._parse(c)
        if not c.error and desc.shots is not None:
            self._parse_shots(c, *desc.shots)
        self.clients[node] = c
        return c

    def _parse(self, c: Client) -> None:
        try:
            names = parse_label_text(c.text)
        except Exception as e:  # noqa: BLE001 - any parser failure is the description's problem
            c.error = f"unparsable description: {e}"
            return
        if not names:
            c.error = f"no class names in description {c.text!r}"
            return
        unknown = [n for n in names if n not in self.class_index]
        if unknown:
            c.error = f"unknown class {unknown[0]!r}" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else "")
            return
        if len(set(names)) != len(names):
            c.error = f"duplicated class names in {names}"
            return
        c.names = tuple(names)
        c.class_ids = tuple(self.class_index[n] for n in names)

    def _parse_shots(self, c: Client, mean: np.ndarray, count: np.ndarray) -> None:
        """The client's image prompts: a [k, d] mean per class in its description's order, counts [k]."""
        d = self.feature_dim
        if mean.shape != (len(c.names), d) or count.shape != (len(c.names),) or not np.isfinite(mean).all():
            c.error = f"image prompts of shape {mean.shape} / counts {count.shape}, expected [{len(c.names)}, {d}]"
            return
        c.shots = [mean[j:j + 1] if count[j] > 0 else None for j in range(len(c.names))]
