"""fedtina.runtime.linkstate_index: Flower's in-memory LinkState with a per-node index gives the simulation engine
the same messages, in the same order, as the original full scan. Offline, no Ray."""

from __future__ import annotations

import pytest

from fedtina.runtime import linkstate_index


def _state(n_nodes: int):
    """An in-memory LinkState with one run and `n_nodes` nodes, set up the way flwr 1.42's run_simulation does."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = list(_register_nodes(n_nodes, factory))
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=7)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def _push(grid, nodes, per_node: int) -> None:
    from flwr.common import ConfigRecord, Message, RecordDict

    msgs = [Message(RecordDict({"c": ConfigRecord({"node": j, "k": k})}), dst_node_id=n, message_type="query.x")
            for k in range(per_node) for j, n in enumerate(nodes)]
    list(grid.push_messages(msgs))


def _tags(msgs) -> list[tuple[int, int]]:
    return [(int(m.content["c"]["node"]), int(m.content["c"]["k"])) for m in msgs]


def test_indexed_get_message_ins_answers_as_the_full_scan():
    linkstate_index.install()
    linkstate_index.install()   # idempotent: the original methods are kept once
    original = linkstate_index._ORIGINAL["get_message_ins"]
    runs = []
    for get in (original, type(_state(1)[0]).get_message_ins):
        state, grid, nodes = _state(6)
        _push(grid, nodes, per_node=3)
        seen = [_tags(get(state, node_id=nodes[0], limit=1)), _tags(get(state, node_id=nodes[0], limit=None)),
                _tags(get(state, node_id=nodes[0], limit=None)),   # all delivered: nothing again
                _tags(get(state, node_id=nodes[1], limit=2)), _tags(get(state, node_id=nodes[1], limit=5)),
                _tags(get(state, node_id=nodes[2], limit=None, run_id=8)),   # another run: nothing
                _tags(get(state, node_id=nodes[2], limit=None, run_id=7))]
        _push(grid, nodes[:1], per_node=1)   # pushed after the node was drained
        seen.append(_tags(get(state, node_id=nodes[0], limit=None)))
        runs.append(seen)
    assert runs[0] == runs[1]
    assert runs[1][0] == [(0, 0)] and runs[1][1] == [(0, 1), (0, 2)] and runs[1][2] == []
    assert runs[1][5] == [] and runs[1][6] == [(2, 0), (2, 1), (2, 2)] and runs[1][7] == [(0, 0)]
    with pytest.raises(AssertionError, match="limit"):
        type(_state(1)[0]).get_message_ins(_state(1)[0], node_id=nodes[0], limit=0)


def test_a_sweep_over_every_node_is_linear_in_the_nodes():
    """The engine's extractor asks every node once per sweep. With a message queued for each of 200 nodes the full
    scan checks the stored messages up to the node's own on every ask (1 + 2 + ... + 200: quadratic), the index only
    the node's own (200)."""
    linkstate_index.install()
    original = linkstate_index._ORIGINAL["get_message_ins"]
    checked = {}
    for name in ("original", "indexed"):
        state, grid, nodes = _state(200)
        _push(grid, nodes, per_node=1)
        count = [0]
        check = state._check_stored_messages
        state._check_stored_messages = lambda ids, *a, **k: (count.__setitem__(0, count[0] + len(ids)),
                                                             check(ids, *a, **k))
        get = original if name == "original" else type(state).get_message_ins
        assert sum(len(get(state, node_id=n, limit=1)) for n in nodes) == 200
        checked[name] = count[0]
    assert checked == {"original": 200 * 201 // 2, "indexed": 200}


def test_the_extractor_sweep_enqueues_what_flowers_does_asking_only_nodes_with_messages():
    """One pass of Flower's extractor asks every node for its next message, in node order; fedtina's asks only the
    nodes the index holds messages for. Same messages, same order, pass after pass."""
    import queue
    import random

    linkstate_index.install()
    original = linkstate_index._ORIGINAL["get_message_ins"]
    passes = {}
    for name in ("original", "indexed"):
        state, grid, nodes = _state(50)
        busy = random.Random(3).sample(nodes, 12)      # pushed out of node order, two messages each
        _push(grid, busy, per_node=2)
        order = {n: i for i, n in enumerate(nodes)}
        got, asked = [], []
        for _ in range(3):
            q: queue.Queue = queue.Queue()
            if name == "original":
                for n in nodes:
                    for m in original(state, node_id=n, limit=1):
                        q.put(m)
                asked.append(len(nodes))
            else:
                asked.append(linkstate_index.sweep(state, q, order))
            got.append(_tags(list(q.queue)))
        passes[name] = got
        if name == "indexed":
            assert asked == [12, 12, 0]
    assert passes["original"] == passes["indexed"]
    assert [len(p) for p in passes["indexed"]] == [12, 12, 0]
