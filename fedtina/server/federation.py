"""The Federation: what a method's server loop sees of one run. A small facade over the run's parts:

* `transport` (fedtina.server.transport): messages to and from the nodes, the config they carry, round sampling;
* `roster` (fedtina.server.roster): who the clients are: their nodes, descriptions, old / new;
* `ledger` (fedtina.server.ledger): per-client results, phase profiles, the per-round lines, the checkpoint;
* `reference` (fedtina.server.reference): what the server holds itself (selection heads, held-out validation features).
* `replies` (fedtina.server.replies): the check every reply passes where it enters (`collect`), so a method only
  sees replies that hold what it reads; one that fails it fails its client alone.

Methods call the parts through it (`fed.send(...)`, `fed.old`, `fed.result(...)`, ...), and read their resume state
with `fed.state(name)`: their own and that of the methods they `require`. `fedtina.server.loop.run_all` plays them.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtina.client.call import HEAD_FT, pack
from fedtina.config import LimitsConfig, from_dict
from fedtina.data.partition import load_partition
from fedtina.errors import FedtinaError
from fedtina.report.loggers import RunLoggers
from fedtina.report.profiling import PhaseRecord
from fedtina.runtime.spec import RunSpec, head_record
from fedtina.server.reference import ServerReference
from fedtina.server.ledger import Ledger, Outcome, Progress, save_checkpoint
from fedtina.server.replies import ArraySpec, Checked, Expect, check, description, profiles, specs
from fedtina.server.roster import Client, Roster
from fedtina.server.transport import Transport
from fedtina.zoo.heads import Head

log = logging.getLogger("fedtina.federation")


class Federation:
    def __init__(self, grid: Grid, spec: RunSpec) -> None:
        if spec.assets is None:
            raise FedtinaError("RunSpec.assets is not set: the driver must attach build_assets(...)'s result")
        self.spec, self.assets = spec, spec.assets
        partition = load_partition(spec.partition_path)
        self.roster = Roster(partition, list(self.assets.dataset.class_names),
                             int(self.assets.bank.features.shape[1]), identity=spec.node_partitions)
        self.limits = from_dict(LimitsConfig, spec.core.get("limits"))
        self.transport = Transport(grid, spec, order=self.roster.queue_position)
        self.ledger = Ledger(self.roster, RunLoggers(spec.loggers, spec.out_dir, {
            "methods": spec.methods, "n_clients": spec.n_clients, "rounds": spec.rounds, "options": spec.options}))
        self.reference = ServerReference(self.assets, partition.server_val_idx)
        self.prog = Progress()
        self.playing: Any = None   # the method being played (fedtina.server.loop)
        # the methods' API: the parts' own calls
        self.class_names = self.reference.class_names
        self.selection, self.val_data = self.reference.selection, self.reference.val_data
        self.config, self.subgrid, self.sample = self.transport.config, self.transport.subgrid, self.transport.sample
        self.client_id, self.cohort_nodes = self.roster.client_id, self.roster.cohort_nodes
        self.result, self.unserved, self.labelled, self.usable, self.score = (
            self.ledger.result, self.ledger.unserved, self.ledger.labelled, self.ledger.usable, self.ledger.score)
        self.server_record, self.progress = self.ledger.server_record, self.ledger.progress
        self.round_accs, self.acc_line = self.ledger.round_accs, self.ledger.acc_line

    @property
    def out(self) -> Outcome:
        return self.ledger.out

    @property
    def nodes(self) -> list[int]:
        return self.roster.nodes

    @property
    def clients(self) -> dict[int, Client]:
        return self.roster.clients

    @property
    def old(self) -> list[int]:
        """Nodes of the clients that take part in training, by client id."""
        return self.roster.old

    @property
    def new(self) -> list[int]:
        """Nodes of the clients that arrive after the last round, by client id."""
        return self.roster.new

    def options(self, name: str, cls: type):
        """Method `name`'s options (its configs/method/<name>.yaml block over the dataclass defaults)."""
        return from_dict(cls, self.spec.options.get(name))

    def state(self, name: str) -> Any:
        """Method `name`'s resume state (the dataclass it registered as `state`), as the checkpoint keeps it and a
        resumed run hands it back. A method reads its own and that of the methods it `requires`."""
        return self.prog.state(self.playing, name)

    def checkpoint(self) -> None:
        """What finished so far, with every method's state, for `resume` (atomic)."""
        save_checkpoint(self.spec.out_dir, self.out, self.prog)

    # ---------------------------------------------------------------- nodes
    def wait_for_nodes(self) -> list[int]:
        """The run's nodes once all have registered; one the engine's map does not name is refused (a `refused`
        describe record, client id -1) and never messaged."""
        for node in self.roster.seat(self.transport.wait_for_nodes(self.roster.identity)):
            detail = f"node {node} is not in the engine's node -> partition map: refused"
            log.warning("[federation] %s", detail)
            self.out.server_records.append(PhaseRecord("describe", 0, -1, "describe", status="refused",
                                                        detail=detail))
        return self.nodes

    def describe(self, record: bool = True, **extra) -> None:
        """`query.describe` to every node (its config with `extra`): the text describing its classes, checked and
        parsed here (its client id is the engine's: fedtina.server.roster). The first message starts the Ray actors
        (imports, torch), so it may take up to `node_wait_s`. With `record` the clients' profiles of it go to
        `server_records`; a node whose reply fails gets a `failed` row in every method that serves descriptions."""
        contents = {n: RecordDict({"config": self.config("describe", 0, **extra)}) for n in self.nodes}
        t0 = time.perf_counter()
        wait = max(self.spec.timeout_s, self.spec.node_wait_s)
        d, max_k = self.roster.feature_dim, len(self.class_names)

        def validate(node: int, _cid: int, content: RecordDict) -> Checked:
            desc = description(content, self.limits.max_description_chars, max_k, d)
            checked = Checked(profiles(content))
            self.roster.add(node, desc)
            return checked

        ok = self.ledger.collect(self.transport.exchange("query.describe", contents, "describe", timeout=wait),
                                 self.transport.failure, validate, "describe", 0, "describe",
                                 into=self.out.server_records if record else [], failed=self.roster.failed)
        for node in ok:
            c = self.clients[node]
            if c.error:
                log.warning("[describe] client %d: %s", c.client_id, c.error)
        missing = len(self.nodes) - len(ok)
        log.info("[describe] %d clients described their classes in %.1f s%s", len(ok), time.perf_counter() - t0,
                 f", {missing} did not answer" if missing else "")

    # ---------------------------------------------------------------- messages and their replies
    def collect(self, replies: dict[int, Message | None], method: str, rnd: int, phase: str,
                expect: Expect = Expect(), sent: dict[int, dict[str, ArraySpec]] | None = None,
                **kw) -> dict[int, Message]:
        """Good replies by node, each checked against `expect` (fedtina.server.replies; `sent`: per node, the
        arrays of the record it was sent under `expect.upload`); the others filed as failed
        (fedtina.server.ledger.Ledger.collect)."""
        def validate(node: int, cid: int, content: RecordDict) -> Checked:
            return check(content, expect, self.roster.holds(cid), (sent or {}).get(node))

        return self.ledger.collect(replies, self.transport.failure, validate, method, rnd, phase, **kw)

    def send(self, message_type: str, records: dict[int, dict], method: str, rnd: int, phase: str, *,
             fail: Iterable[str] = (), up_key: str | None = None, per_node: dict[int, dict] | None = None,
             received_as: str | None = None, expect: Expect = Expect(), **extra) -> dict[int, Message]:
        """One message per node (`records[node]` plus the config, with `extra` and `per_node[node]`); good replies
        by node, as `expect` says (default: a score). Profiles are filed under `method`, failures as `failed`
        results of the methods in `fail`; the ArrayRecords sent count as the client's bytes received, its `up_key`
        ArrayRecord as bytes sent."""
        contents, down = self.transport.messages(records, method, rnd, per_node, **extra)
        sent = {n: specs(recs[expect.upload]) for n, recs in records.items() if expect.upload in recs}
        got = self.transport.exchange(message_type, contents, f"{method}:{rnd}:{phase}")
        return self.collect(got, method, rnd, phase, expect, sent, fail=fail, sent_down=down, up_key=up_key,
                            received_as=received_as)

    def send_heads(self, kind: str, heads: dict[int, Head], method: str, rnd: int, *, fail: Iterable[str] = (),
                   received_as: str | None = None, **extra) -> dict[int, Message]:
        """`evaluate.head` or `train.finetune` with one head per node (see `send`); with `received_as`, the
        fine-tune first evaluates the received head (its accuracy in the reply's `received`). A fine-tune reply
        may upload the head (`head`: the shapes of the one it was sent)."""
        mtype = {"evaluate": "evaluate.head", "finetune": "train.finetune"}[kind]
        expect = Expect()
        if kind == "finetune":
            expect = Expect(scores=("metrics", "received") if received_as else ("metrics",), upload="head")
        if received_as:
            extra["evaluate_received"] = True
        return self.send(mtype, {n: {"head": head_record(h)} for n, h in heads.items()}, method, rnd, kind,
                         fail=fail, up_key="head", received_as=received_as, expect=expect,
                         per_node={n: {"class_names": list(h.class_names)} for n, h in heads.items()}, **extra)

    def finetune_config(self, upload: bool) -> dict:
        """The clients' head fine-tuning (`head_ft`) as message config (`call.head_ft` on the client); `upload`: they
        send the head back."""
        return {**pack(self.spec.head_ft, HEAD_FT), "upload": bool(upload)}

    def serve_new(self, method: str, arrays: ArrayRecord, message_type: str, zero: str = "", **extra) -> None:
        """After the last round: the new clients get the final `arrays` through `message_type` (an evaluate step
        that applies the method's new-client procedure); their scores are the method's new-client results. With
        `zero` (why), a new client without labels is `unserved` instead."""
        rnd = self.spec.rounds
        clients = self.usable(self.new, [method], rnd)
        if zero:
            clients = self.labelled(method, clients, rnd, zero)
        ok = self.send(message_type, {c.node_id: {"arrays": arrays} for c in clients}, method, rnd, "evaluate",
                       fail=[method], new=True, **extra)
        self.score(ok, method, rnd)
        if self.new:
            self.progress(method, None, rnd, f"new clients: {self.acc_line(method, rnd, new=True)}")
