"""The simulation engine's node -> partition map, for the ServerApp: who a client is, as the engine fixed it.

Flower 1.42's simulation engine registers its nodes itself (`vce_api._register_nodes`: node i gets a random node id
and `node_config["partition-id"] = i`) and hands the map to nobody but the ClientApps. `install()` records it in the
running RunSpec (`spec.node_partitions`, filled in place), so the ServerApp (a thread of the same process) knows
each node's partition without asking the client (fedtina.server.roster). Applied by the launcher before the engine
starts; idempotent; flwr is pinned to 1.42.0.
"""

from __future__ import annotations

from typing import Any

_ORIGINAL: dict[str, Any] = {}


def install() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    from fedtina.runtime.spec import get_run_spec

    if _ORIGINAL:
        return
    _ORIGINAL["register"] = vce_api._register_nodes

    def register(*args, **kwargs):
        mapping = _ORIGINAL["register"](*args, **kwargs)
        spec = get_run_spec()
        if spec is not None and spec.node_partitions is not None:
            spec.node_partitions.update({int(n): int(p) for n, p in mapping.items()})   # one step: readers see
        return mapping                                                                  # all nodes or none

    vce_api._register_nodes = register   # start_vce looks it up by name
