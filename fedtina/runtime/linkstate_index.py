"""Flower 1.42's in-memory LinkState, indexed by destination node, so the simulation engine scales past 1,000 clients.

The engine's message extractor (`flwr/server/superlink/fleet/vce/vce_api.py: add_messages_to_queue`) asks the state
for every node's next message every 0.1 s, and `InMemoryLinkState.get_message_ins` answers each ask by scanning
*every* stored message (and re-checking each one's expiry): one sweep costs nodes x stored messages. With the whole
batch of a round pushed at once that is quadratic in the number of clients (a sweep over 1,000 queued messages makes
about 500,000 checks): at 10,000 clients most messages timed out queued. `install()` keeps, per destination node, the ids of its stored
messages, and `get_message_ins` scans only those: same result (undelivered, unexpired, insertion order, marked
delivered), one sweep linear in the number of nodes.

The extractor itself still asks every node, with or without messages: at 100,000 nodes a sweep of empty asks takes
~0.2 s of the driver's Python (and its GIL) every 0.3 s, the whole run long. `install()` also replaces it with one
that asks only the nodes the index holds messages for, in the engine's node order: the same messages enqueued in the
same order.

Applied once per process by the launcher before the engine starts; a no-op when already applied. The class is
patched (not subclassed) because `run_simulation` builds its state itself; flwr is pinned to 1.42.0, and a test
checks the patched method against the original on the same state.
"""

from __future__ import annotations

from collections import defaultdict

_ORIGINAL: dict[str, object] = {}


def _store_message_ins(self, message):
    message_id = _ORIGINAL["store_message_ins"](self, message)
    if message_id is not None:
        with self.lock:
            self._fedtina_by_node[message.metadata.dst_node_id].append(message_id)
    return message_id


def _get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None):
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found = []
    with self.lock:
        ids = self._fedtina_by_node.get(node_id)
        if not ids:
            return found
        self._check_stored_messages(set(ids))   # drops expired ones, as the original's full scan does
        keep = []
        for msg_id in ids:
            msg = self.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue                        # gone or delivered: never returned again
            if (run_id is None or msg.metadata.run_id == run_id) and (not limit or len(found) < limit):
                found.append(msg)
            else:
                keep.append(msg_id)
        if keep:
            self._fedtina_by_node[node_id] = keep
        else:
            del self._fedtina_by_node[node_id]
    delivered_at = _ORIGINAL["now"]().isoformat()
    for msg in found:
        msg.metadata.delivered_at = delivered_at
    return found


def sweep(state, queue, order: dict[int, int]) -> int:
    """One pass of the engine's extractor: the next message of every node that has one, enqueued in `order` (node
    -> its place in the engine's node mapping; other nodes are not the engine's). Returns the nodes asked."""
    with state.lock:
        nodes = sorted((n for n in state._fedtina_by_node if n in order), key=order.__getitem__)
    for node_id in nodes:
        for msg in state.get_message_ins(node_id=node_id, limit=1):
            queue.put(msg)
    return len(nodes)


def _add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
    if not hasattr(state, "_fedtina_by_node"):   # not the in-memory state: Flower's own extractor
        return _ORIGINAL["add_messages_to_queue"](state, queue, nodes_mapping, f_stop)
    order = {node: i for i, node in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        sweep(state, queue, order)
        f_stop.wait(0.1)


def install() -> None:
    """Patch `InMemoryLinkState` and the engine's extractor (idempotent). States created afterwards keep the
    per-node index."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.date import now

    if _ORIGINAL:
        return
    _ORIGINAL["now"] = now   # flwr's clock (flwr is imported lazily)
    _ORIGINAL["store_message_ins"] = InMemoryLinkState.store_message_ins
    _ORIGINAL["get_message_ins"] = InMemoryLinkState.get_message_ins
    _ORIGINAL["__init__"] = InMemoryLinkState.__init__

    def __init__(self, *args, **kwargs):
        _ORIGINAL["__init__"](self, *args, **kwargs)
        self._fedtina_by_node = defaultdict(list)

    InMemoryLinkState.__init__ = __init__
    InMemoryLinkState.store_message_ins = _store_message_ins
    InMemoryLinkState.get_message_ins = _get_message_ins
    _ORIGINAL["add_messages_to_queue"] = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = _add_messages_to_queue   # run_api looks it up when the engine starts
