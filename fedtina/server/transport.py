"""Messages to and from the nodes: waiting for them to register, the config every message carries, one message per
node with a finite timeout (through fedtina.runtime.grid.GuardedGrid), the grid a Flower strategy sees, and round
sampling. What the replies mean is the ledger's business (fedtina.server.ledger)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtina.errors import FedtinaError
from fedtina.runtime.grid import GuardedGrid
from fedtina.runtime.spec import RunSpec


def short(reason: str, limit: int = 300) -> str:
    """The useful line of a ClientApp error (Ray wraps it in a long traceback)."""
    reason = str(reason)
    if "Message:" in reason:  # "... ClientAppException occurred. Message: <the client's exception>'>"
        return reason.rsplit("Message:", 1)[1].strip().rstrip(">").rstrip("'").strip()[:limit]
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln[:limit]
    return (lines[-1] if lines else "error")[:limit]


class Transport:
    """The guarded grid of one run; `order` sorts a batch of sends into the engine's queue order."""

    def __init__(self, grid: Grid, spec: RunSpec, order: Callable[[int], int]) -> None:
        self.spec = spec
        self.grid = GuardedGrid(grid, spec.stop, lambda: spec.concurrency, order=order)

    def wait_for_nodes(self, identity: dict[int, int] | None = None) -> list[int]:
        """The registered nodes once `n_clients` are there, or a clear error after `node_wait_s` (a backend that
        failed to start would otherwise leave the ServerApp waiting forever). With `identity` (the engine's node ->
        partition map; the simulation engine fills it as it registers its nodes), `n_clients` nodes it names:
        others may be there too (the caller refuses them)."""
        n, deadline = self.spec.n_clients, time.monotonic() + self.spec.node_wait_s
        while True:
            ids = sorted(self.grid.get_node_ids())
            known = ids if identity is None else [i for i in ids if i in identity]
            if len(known) >= n:
                return ids
            if time.monotonic() > deadline:
                raise FedtinaError(f"only {len(known)} of {n} clients registered within "
                                   f"{self.spec.node_wait_s:g} s: the Ray backend (or the deployment's SuperNodes) "
                                   f"probably failed to start (see the log above), or node_wait_s is too short for "
                                   f"this many clients")
            self.spec.stop.wait(0.1)
            self.spec.stop.check()

    def config(self, method: str, rnd: int | None, **extra) -> ConfigRecord:
        """The ConfigRecord every message carries: data paths, method/round (for profiles), faults, extras.
        A Flower strategy's messages carry no `round`: Flower adds `server-round` itself."""
        s = self.spec
        cfg: dict = {"features": s.features_path, "partition": s.partition_path, "method": method,
                     "device": s.client_device, **(asdict(s.faults) if s.faults.any else {}),
                     "upload_clip": float(s.privacy.upload_clip), "upload_noise": float(s.privacy.upload_noise)}
        if rnd is not None:
            cfg["round"] = int(rnd)
        if s.images_path:
            cfg["images"] = s.images_path
        cfg.update(extra)
        return ConfigRecord(cfg)

    def exchange(self, message_type: str, contents: dict[int, RecordDict], group: str,
                 timeout: float | None = None) -> dict[int, Message | None]:
        """Send one message per node; each client has `timeout` (default `timeout_s`) from when it could start
        (GuardedGrid). None for nodes that did not answer; `failure` says why."""
        if not contents:
            return {}
        msgs = [Message(c, dst_node_id=n, message_type=message_type, group_id=group) for n, c in contents.items()]
        got = self.grid.exchange(msgs, timeout or self.spec.timeout_s)
        return {n: got[n].reply if n in got and got[n].status == "ok" else None for n in contents}

    def messages(self, records: dict[int, dict], method: str, rnd: int, per_node: dict[int, dict] | None = None,
                 **extra) -> tuple[dict[int, RecordDict], dict[int, int]]:
        """One RecordDict per node (`records[node]` plus the config, with `extra` and `per_node[node]`), and the
        bytes of the ArrayRecords each carries down."""
        contents, down = {}, {}
        for node, recs in records.items():
            down[node] = sum(r.count_bytes() for r in recs.values() if isinstance(r, ArrayRecord))
            cfg = self.config(method, rnd, **extra, **(per_node or {}).get(node, {}))
            contents[node] = RecordDict({**recs, "config": cfg})
        return contents, down

    def failure(self, node: int, reply: Message | None) -> tuple[str, str]:
        """(status, detail) of a node whose reply is missing or an error: `not_started` when it was never given an
        actor, `failed` otherwise; the detail is the client's error line or the delivery's account of the wait."""
        delivery = self.grid.last.get(node)
        status = "not_started" if delivery is not None and delivery.status == "not_started" else "failed"
        detail = (short(reply.error.reason) if reply is not None else delivery.detail if delivery is not None
                  else f"no reply within timeout_s={self.spec.timeout_s:g}")
        return status, detail

    def subgrid(self, nodes: Iterable[int]) -> "NodeSubset":
        """The grid as a Flower strategy should see it: only `nodes` (the old clients) exist."""
        return NodeSubset(self.grid, list(nodes))

    def sample(self, nodes: list[int], rnd: int, seed: int = 0) -> list[int]:
        """`fraction_train` of `nodes` for round `rnd` (seeded per round), at least one; in node order."""
        m = max(1, int(round(self.spec.fraction_train * len(nodes))))
        if m >= len(nodes):
            return list(nodes)
        pick = set(np.random.default_rng([seed, rnd]).choice(len(nodes), size=m, replace=False).tolist())
        return [n for i, n in enumerate(nodes) if i in pick]


class NodeSubset:
    """A Grid whose `get_node_ids` lists only some nodes; messages go through the run's guarded grid."""

    def __init__(self, grid: GuardedGrid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)
