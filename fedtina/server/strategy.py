"""Flower's Message-API strategies, unchanged in what they compute, plus fedtina's per-client bookkeeping.

`recorded(FedAvg)` / `recorded(FedProx)` is the strategy class with replies read into the Federation (results,
profiles, failures) and messages routed to the method's own ClientApp handlers (e.g. `train.<method>`). `BodyOnly`
is the server of the personal-head methods: FedAvg of the body; the head arrays it sends are the fixed starting head
(each client keeps its own head in `Context.state`), so they are carried over, never averaged.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedtina.errors import FedtinaError
from fedtina.server import aggregation
from fedtina.server.replies import ArraySpec, Expect, specs
from fedtina.report.profiling import PhaseTimer

if TYPE_CHECKING:
    from fedtina.server.federation import Federation


class Recording:
    """Mixin over a Flower strategy. `train_type` / `evaluate_type` route its messages to other ClientApp handlers;
    every evaluate round's scores become the method's results of that round (its accuracy curve)."""

    def __init__(self, fed: "Federation", method: str, train_type: str = "train", evaluate_type: str = "evaluate",
                 record_results: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fed, self.method, self.record_results = fed, method, record_results
        self.train_type, self.evaluate_type = train_type, evaluate_type
        self._sent: dict[tuple[str, int], dict[int, int]] = {}
        self._arrays: dict[str, ArraySpec] = {}   # what a training reply must send back (fedtina.server.replies)

    def _route(self, msgs, mtype: str, phase: str, server_round: int) -> list[Message]:
        out = []
        for m in msgs:
            if m.metadata.message_type != mtype:
                m = Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=mtype,
                            group_id=f"{self.method}:{server_round}:{phase}")
            out.append(m)
        self._sent[(phase, server_round)] = {m.metadata.dst_node_id: m.content[self.arrayrecord_key].count_bytes()
                                             for m in out}
        if out and phase == "train":
            self._arrays = specs(out[0].content[self.arrayrecord_key])   # one global record for every node
        return out

    def configure_train(self, server_round, arrays, config, grid):
        return self._route(super().configure_train(server_round, arrays, config, grid), self.train_type, "train",
                           server_round)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self._route(super().configure_evaluate(server_round, arrays, config, grid), self.evaluate_type,
                           "evaluate", server_round)

    def _by_node(self, phase: str, server_round: int, replies: list[Message]) -> dict[int, Message | None]:
        """Replies by node, with None for nodes that were sent a message but did not answer in time."""
        got = {r.metadata.src_node_id: r for r in replies}
        return {n: got.get(n) for n in self._sent.get((phase, server_round), {})} | got

    def update_expect(self) -> Expect:
        """A training reply: the arrays it was sent (less those the method keeps local), finite, weighed by the
        client's training images."""
        keep = BodyOnly.head_keys if isinstance(self, BodyOnly) else ()
        return Expect(scores=(), upload=self.arrayrecord_key, required=True, keep=keep, weight="metrics",
                      finite=True)

    def aggregate_train(self, server_round, replies):
        # in client order: replies arrive in whatever order the actors finish, and a float sum depends on its order
        replies = sorted(replies, key=lambda r: self.fed.client_id(r.metadata.src_node_id))
        sent = self._sent.get(("train", server_round), {})
        ok = self.fed.collect(self._by_node("train", server_round, replies), self.method, server_round, "train",
                              self.update_expect(), {n: self._arrays for n in sent}, sent_down=sent,
                              up_key=self.arrayrecord_key)
        with PhaseTimer() as t:   # only the replies that passed: Flower's strategy reads the others' records too
            out = super().aggregate_train(server_round, [r for r in replies if r.metadata.src_node_id in ok])
        self.fed.server_record(self.method, server_round, "aggregate", t, detail=f"{len(ok)} updates")
        return out

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        ok = self.fed.collect(self._by_node("evaluate", server_round, replies), self.method, server_round,
                              "evaluate", fail=[self.method] if self.record_results else [],
                              sent_down=self._sent.get(("evaluate", server_round)))
        if self.record_results:
            self.fed.score(ok, self.method, server_round)
            line = self.fed.acc_line(self.method, server_round)
        else:
            line = f"{len(ok)} clients evaluated"
        self.fed.progress(self.method, server_round, self.fed.spec.rounds, line)
        return super().aggregate_evaluate(server_round, [r for r in replies if r.metadata.src_node_id in ok])


class BodyOnly(FedAvg):
    """FedAvg of the body: the clients send back every array but the head's, and the head arrays of the global
    record (the fixed starting head the clients take their rows from) are carried into the next round."""

    head_keys = ("fc.weight", "fc.bias")

    def configure_train(self, server_round, arrays, config, grid):
        self._head = {k: arrays[k] for k in self.head_keys if k in arrays}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({**dict(arrays.items()), **self._head})
        return arrays, metrics


def fedavg_mean(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """FedAvg's aggregate outside a Grid: Flower's own weighted mean (what `FedAvg.aggregate_train` computes from the
    replies' "num-examples"), for (arrays, examples) updates in client order."""
    from fedtina.runtime.spec import arrays_record

    records = [RecordDict({"arrays": arrays_record(a), "metrics": MetricRecord({"num-examples": int(n)})})
               for a, n in updates]
    return {k: v.numpy() for k, v in aggregate_arrayrecords(records, "num-examples").items()}


@lru_cache(maxsize=None)
def recorded(base: type) -> type:
    """`base` (a Flower strategy class) with the Recording mixin."""
    return type(f"Recorded{base.__name__}", (Recording, base), {})


def start(fed: "Federation", method: str, base: type, arrays: ArrayRecord, *, train_type: str,
          evaluate_type: str, train_config: dict, evaluate_config: dict | None = None, record_results: bool = True,
          **kwargs):
    """Run strategy `base` for `spec.rounds` rounds on the old clients (sampling `fraction_train` of them per
    round, all of them evaluated every round), aggregating by the run's `aggregation` rule and, with
    `privacy.fedavg_clip`, inside Flower's client-side fixed-clipping DP wrapper; returns Flower's Result."""
    random.seed(0)   # Flower samples the round's clients with `random.sample` over the (ordered) old nodes
    nodes = fed.old
    n = len(nodes)
    m = max(1, int(round(fed.spec.fraction_train * n)))
    rule, privacy = fed.spec.aggregation, fed.spec.privacy
    aggregation.check(rule, m)
    if privacy.fedavg and issubclass(base, BodyOnly):
        raise FedtinaError(f"privacy.fedavg_clip: {method}'s clients send back the body only, and Flower's "
                           f"fixedclipping_mod needs every array it sent; use it with methods that average the "
                           f"whole model")
    strategy = recorded(aggregation.with_rule(base, rule))(
        fed, method, train_type=train_type, evaluate_type=evaluate_type, record_results=record_results,
        fraction_train=fed.spec.fraction_train, fraction_evaluate=1.0, min_train_nodes=m, min_evaluate_nodes=n,
        min_available_nodes=n, **kwargs)
    aggregation.configure(strategy, rule, m)
    if privacy.fedavg:
        strategy = DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=privacy.fedavg_noise,
                                                              clipping_norm=privacy.fedavg_clip,
                                                              num_sampled_clients=m)
    return strategy.start(fed.subgrid(nodes), arrays, num_rounds=fed.spec.rounds, timeout=fed.spec.timeout_s,
                          train_config=fed.config(method, None, **train_config),
                          evaluate_config=fed.config(method, None, **(evaluate_config or {})))
