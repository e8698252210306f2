"""Transport and bookkeeping shared by every method: the Federation wraps the Grid, and `run_all` plays the requested
methods (fedtina.methods, in registration order) one after the other on the same clients.

`Federation` waits for the nodes, learns who is who (`query.describe`), sends messages with a finite timeout, turns
missing or error replies into `failed` results, and collects per-client results, phase profiles and the zoo's
growth. Clients are *old* (they take part in training) or *new* (partition.new_share: they arrive after the last
round and each method serves them by its new-client procedure); `fed.old` / `fed.new` are their nodes.

Bookkeeping: `Outcome.results` holds one ClientResult per (method, client, round) and `Outcome.records` the clients'
phase profiles, attributed to the method they served (`tina` = evaluating the generated head, `tina_ft` = fine-tuning
and uploading it). Server-side phases (generation, checks, zoo writes, Tina refreshes, aggregation; client id -1)
and the one-off `describe` of every client go to `Outcome.server_records`, kept apart so they do not count as a
client's cost.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtina.errors import FedtinaError
from fedtina.runtime.grid import GuardedGrid, Interrupted
from fedtina.report.loggers import RunLoggers
from fedtina.data.partition import load_partition
from fedtina.report.profiling import PhaseRecord, PhaseTimer, from_config
from fedtina.report.summary import ClientResult, worst_decile_mean
from fedtina.runtime.rundir import RunDir, resume_command
from fedtina.runtime.spec import RunSpec, head_record
from fedtina.server.reference import ServerReference
from fedtina.zoo.heads import Head
from fedtina.tina.generator import parse_label_text

log = logging.getLogger("fedtina.federation")


def _short(reason: str, limit: int = 300) -> str:
    """The useful line of a ClientApp error (Ray wraps it in a long traceback)."""
    reason = str(reason)
    if "Message:" in reason:  # "... ClientAppException occurred. Message: <the client's exception>'>"
        return reason.rsplit("Message:", 1)[1].strip().rstrip(">").rstrip("'").strip()[:limit]
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln[:limit]
    return (lines[-1] if lines else "error")[:limit]


def _mean_std(values: Iterable[float]) -> str:
    v = np.array(list(values), dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "n/a"


@dataclass
class Client:
    """What the server knows about a node after `query.describe`: its id, its text and the parsed class names."""

    node_id: int
    client_id: int
    text: str
    names: tuple[str, ...] = ()
    class_ids: tuple[int, ...] = ()
    error: str = ""            # a description the server cannot serve (unknown class, empty, duplicates)
    shots: list | None = None  # per class: [1, d] mean feature of its labelled images (None: none), method.tina.prompt


class MethodFailed(FedtinaError):
    """A method that cannot produce its result (e.g. every client failed in every FedAvg round)."""


@dataclass
class Outcome:
    results: list[ClientResult] = field(default_factory=list)
    records: list[PhaseRecord] = field(default_factory=list)          # client phases, per method
    server_records: list[PhaseRecord] = field(default_factory=list)   # server phases + the one-off describe
    zoo_growth: list[dict] = field(default_factory=list)
    rounds: dict[str, int] = field(default_factory=dict)
    method_status: dict[str, str] = field(default_factory=dict)       # ok | failed: why | interrupted | not run
    interrupted: str = ""                                             # why the run stopped early ("": it did not)
    summary: dict | None = None
    files: list[Path] = field(default_factory=list)

    _LISTS = {"results": ClientResult, "records": PhaseRecord, "server_records": PhaseRecord}

    def header(self) -> dict:
        """What a checkpoint keeps besides the per-client lists (the summary and files are rebuilt from both)."""
        return {"zoo_growth": self.zoo_growth, "rounds": self.rounds, "method_status": self.method_status}

    def lists(self) -> dict[str, list]:
        """The per-client lists a checkpoint keeps, written one record at a time (`write_json_lists`)."""
        return {k: getattr(self, k) for k in self._LISTS}

    @classmethod
    def from_json(cls, doc: dict) -> "Outcome":
        return cls(**{k: [t(**r) for r in doc[k]] for k, t in cls._LISTS.items()}, zoo_growth=doc["zoo_growth"],
                   rounds=doc["rounds"], method_status=doc["method_status"])


@dataclass
class Progress:
    """Where a run stands, for `resume`: finished methods, the Tina loop's cursor, FedAvg's final head."""

    done: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    tina_round: int = 0                    # cohorts finished
    tina_pending: int = 0                  # accepted heads since the last refresh
    tina_norm_scale: float | None = None   # the gate's row-norm scale, fixed for the run
    tina_zoo_size: int | None = None       # the run's zoo after the last finished cohort
    tina_checkpoint: str | None = None     # the run's Tina after it (None: the cached one)
    fedavg_head: dict | None = None        # {"class_names", "weight", "bias"} of FedAvg's final global head


class Federation:
    def __init__(self, grid: Grid, spec: RunSpec) -> None:
        if spec.assets is None:
            raise FedtinaError("RunSpec.assets is not set: the driver must attach build_assets(...)'s result")
        self.spec, self.assets = spec, spec.assets
        self.grid = GuardedGrid(grid, spec.stop, lambda: spec.concurrency, order=self._queue_position)
        self.out = Outcome()
        self.partition = load_partition(spec.partition_path)
        self.class_names = list(self.assets.dataset.class_names)
        self.class_index = {n: i for i, n in enumerate(self.class_names)}
        self.reference = ServerReference(self.assets, self.partition.server_val_idx)
        self.clients: dict[int, Client] = {}           # node id -> Client
        self.nodes: list[int] = []
        self.loggers = RunLoggers(spec.loggers, spec.out_dir, {"methods": spec.methods, "n_clients": spec.n_clients,
                                                              "rounds": spec.rounds, "options": spec.options})

    # ---------------------------------------------------------------- nodes and messages
    def wait_for_nodes(self) -> list[int]:
        """All `n_clients` simulated nodes, or a clear error after `node_wait_s` (a backend that failed to start
        would otherwise leave the ServerApp waiting forever)."""
        n, deadline = self.spec.n_clients, time.monotonic() + self.spec.node_wait_s
        while len(ids := sorted(self.grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise FedtinaError(f"only {len(ids)} of {n} simulated clients registered within "
                                   f"{self.spec.node_wait_s:g} s: the Ray backend probably failed to start (see the "
                                   f"log above), or node_wait_s is too short for this many clients")
            self.spec.stop.wait(0.1)
            self.spec.stop.check()
        self.nodes = ids
        return ids

    def config(self, method: str, rnd: int | None, **extra) -> ConfigRecord:
        """The ConfigRecord every message carries: data paths, method/round (for profiles), faults, extras.
        FedAvg's messages carry no `round`: Flower adds `server-round` itself."""
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
        (GuardedGrid). None for nodes that did not answer; `self.grid.last` says whether they timed out."""
        if not contents:
            return {}
        msgs = [Message(c, dst_node_id=n, message_type=message_type, group_id=group) for n, c in contents.items()]
        got = self.grid.exchange(msgs, timeout or self.spec.timeout_s)
        return {n: got[n].reply if n in got and got[n].status == "ok" else None for n in contents}

    def _queue_position(self, node: int) -> int:
        """The simulation engine queues messages by partition id (= client id), so sends go in that order."""
        c = self.clients.get(node)
        return c.client_id if c is not None else len(self.nodes)

    def client_id(self, node: int, reply: Message | None = None) -> int:
        if node in self.clients:
            return self.clients[node].client_id
        if reply is not None and not reply.has_error() and "prof" in reply.content.config_records:
            return int(reply.content["prof"]["client_id"])
        return -1

    def _spec_of(self, cid: int):
        return self.partition.clients[cid] if 0 <= cid < len(self.partition.clients) else None

    def has_unseen(self, cid: int) -> bool:
        return bool(c.has_unseen) if (c := self._spec_of(cid)) is not None else False

    def is_new(self, cid: int) -> bool:
        return bool(c.is_new) if (c := self._spec_of(cid)) is not None else False

    def labels(self, cid: int) -> int:
        """Labelled training images the client holds (all classes together)."""
        return len(c.train_idx) if (c := self._spec_of(cid)) is not None else 0

    @property
    def old(self) -> list[int]:
        """Nodes of the clients that take part in training, by client id."""
        return sorted((n for n in self.nodes if not self.is_new(self.client_id(n))), key=self._queue_position)

    @property
    def new(self) -> list[int]:
        """Nodes of the clients that arrive after the last round, by client id."""
        return sorted((n for n in self.nodes if self.is_new(self.client_id(n))), key=self._queue_position)

    def options(self, name: str, cls: type):
        """Method `name`'s options (its configs/method/<name>.yaml block over the dataclass defaults)."""
        from fedtina.config import from_dict

        return from_dict(cls, self.spec.options.get(name))

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

    def result(self, method: str, cid: int, rnd: int, acc: float | None = None, n: int = 0, status: str = "ok",
               detail: str = "") -> None:
        c = self._spec_of(cid)
        self.out.results.append(ClientResult(method=method, client_id=cid, round=rnd, acc=acc, num_examples=n,
                                             has_unseen=self.has_unseen(cid), status=status, detail=detail,
                                             label_budget=c.label_budget if c is not None else -1,
                                             is_new=self.is_new(cid)))

    def unserved(self, method: str, clients: Iterable[Client], rnd: int, why: str) -> None:
        """Clients the method cannot serve (e.g. a new client without labels for a method that fits on labels):
        an `unserved` result that says why, never a silent fallback."""
        for c in clients:
            self.result(method, c.client_id, rnd, status="unserved", detail=why)

    def labelled(self, method: str, clients: Iterable[Client], rnd: int, why: str) -> list[Client]:
        """The clients holding at least one labelled image; the others are `unserved` by `method` (why)."""
        out = []
        for c in clients:
            if self.labels(c.client_id):
                out.append(c)
            else:
                self.unserved(method, [c], rnd, why)
        return out

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

    def server_record(self, method: str, rnd: int, phase: str, timer: PhaseTimer, *, cid: int = -1,
                      acc: float | None = None, status: str = "ok", detail: str = "") -> None:
        self.out.server_records.append(timer.record(method, rnd, cid, phase, acc=acc, status=status, detail=detail))

    def collect(self, replies: dict[int, Message | None], method: str, rnd: int, phase: str, *,
                fail: Iterable[str] = (), sent_down: dict[int, int] | None = None, up_key: str | None = None,
                into: list[PhaseRecord] | None = None, received_as: str | None = None) -> dict[int, Message]:
        """Good replies by node. A missing reply (timeout) or an error reply gives a `failed` phase record and a
        `failed` ClientResult for each method in `fail`. Client profiles get the server-measured bytes:
        `bytes_recv` = arrays sent down to the client, `bytes_sent` = arrays it uploaded (`up_key`). A reply that
        also evaluated what it received (`prof_received`) gets that evaluate phase filed under `received_as`; both
        phases show the bytes that came down (each method's row says what it needed sent)."""
        into = self.out.records if into is None else into
        ok: dict[int, Message] = {}
        for node, rep in replies.items():
            cid = self.client_id(node, rep)
            down = (sent_down or {}).get(node, 0)
            if rep is None or rep.has_error():
                delivery = self.grid.last.get(node)
                status = "not_started" if delivery is not None and delivery.status == "not_started" else "failed"
                detail = (_short(rep.error.reason) if rep is not None else delivery.detail if delivery is not None
                          else f"no reply within timeout_s={self.spec.timeout_s:g}")
                log.warning("[%s] round %d: client %d %s in %s: %s%s", method, rnd, cid,
                            "did not start" if status == "not_started" else "failed", phase, detail,
                            "" if rep is None else " (traceback in the log file)")
                into.append(PhaseRecord(method, rnd, cid, phase, bytes_recv=down, status=status, detail=detail))
                for m in fail:
                    self.result(m, cid, rnd, status=status, detail=f"{phase}: {detail}")
                continue
            up = rep.content[up_key].count_bytes() if up_key and up_key in rep.content.array_records else 0
            if received_as and "prof_received" in rep.content.config_records:
                prof = from_config(dict(rep.content["prof_received"]))
                into.append(replace(prof, method=received_as, round=rnd, phase="evaluate", bytes_recv=down))
            if "prof" in rep.content.config_records:
                prof = from_config(dict(rep.content["prof"]))
                into.append(replace(prof, method=method, round=rnd, phase=phase, bytes_recv=down, bytes_sent=up))
            ok[node] = rep
        return ok

    # ---------------------------------------------------------------- who is who
    def describe(self, record: bool = True) -> None:
        """`query.describe` to every node: its client id and the text describing its classes, parsed here. The
        first message starts the Ray actors (imports, torch), so it may take up to `node_wait_s`. With `record`
        the clients' profiles of it go to `server_records`."""
        prompt = str(self.spec.options.get("tina", {}).get("prompt", "text"))
        contents = {n: RecordDict({"config": self.config("describe", 0, prompt=prompt)})
                    for n in self.nodes}
        t0 = time.perf_counter()
        wait = max(self.spec.timeout_s, self.spec.node_wait_s)
        ok = self.collect(self.exchange("query.describe", contents, "describe", timeout=wait), "describe", 0,
                          "describe", into=self.out.server_records if record else [])
        for node, rep in ok.items():
            desc = rep.content["desc"]
            c = Client(node, int(desc["client_id"]), str(desc["text"]))
            self._parse(c)
            if not c.error and "shots" in rep.content.array_records:
                self._parse_shots(c, rep.content["shots"])
            self.clients[node] = c
            if c.error:
                log.warning("[describe] client %d: %s", c.client_id, c.error)
        missing = len(self.nodes) - len(ok)
        log.info("[describe] %d clients described their classes in %.1f s%s", len(ok), time.perf_counter() - t0,
                 f", {missing} did not answer" if missing else "")

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

    def _parse_shots(self, c: Client, rec) -> None:
        """The client's image prompts: a [k, d] mean per class in its description's order, counts [k]."""
        mean, count = rec["mean"].numpy(), rec["count"].numpy()
        d = int(self.assets.bank.features.shape[1])
        if mean.shape != (len(c.names), d) or count.shape != (len(c.names),) or not np.isfinite(mean).all():
            c.error = f"image prompts of shape {mean.shape} / counts {count.shape}, expected [{len(c.names)}, {d}]"
            return
        c.shots = [mean[j:j + 1] if count[j] > 0 else None for j in range(len(c.names))]

    def usable(self, nodes: Iterable[int], methods: Iterable[str], rnd: int) -> list[Client]:
        """Clients whose description the server can serve; the others get an `error` ClientResult per method."""
        out = []
        for node in nodes:
            c = self.clients.get(node)
            if c is None:
                continue  # did not describe itself: recorded as failed in `describe`
            if c.error:
                for m in methods:
                    self.result(m, c.client_id, rnd, status="error", detail=c.error)
                continue
            out.append(c)
        return out

    def cohort_nodes(self, client_ids: Iterable[int]) -> list[int]:
        """The nodes of these clients, by client id: node ids are random per simulation, and the order decides the
        order of uploads in the zoo, hence Tina's refreshes (a resumed run must refresh as the original did)."""
        want = {int(i) for i in client_ids}
        return sorted((n for n, c in self.clients.items() if c.client_id in want), key=self._queue_position)

    # ---------------------------------------------------------------- server-side heads and data
    def selection(self, names: tuple[str, ...]) -> Head:
        return self.reference.selection(names)

    def val_data(self, class_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        return self.reference.val_data(class_ids)

    # ---------------------------------------------------------------- progress
    def checkpoint(self, prog: Progress) -> None:
        """What finished so far, for `resume` (atomic: a kill leaves the previous checkpoint whole)."""
        RunDir(self.spec.out_dir).save_checkpoint({"progress": asdict(prog), **self.out.header()}, self.out.lists(),
                                                  item=asdict)

    def progress(self, method: str, rnd: int | None, n_rounds: int, text: str) -> None:
        where = f" round {rnd}/{n_rounds}" if rnd is not None else ""
        log.info("[%s]%s: %s", method, where, text)

    def round_accs(self, method: str, rnd: int, new: bool = False) -> tuple[list[float], int, int]:
        rs = [r for r in self.out.results if r.method == method and r.round == rnd and r.is_new == new]
        return ([float(r.acc) for r in rs if r.status == "ok" and r.acc is not None],
                sum(r.status == "failed" for r in rs), sum(r.status == "error" for r in rs))

    def acc_line(self, method: str, rnd: int, new: bool = False) -> str:
        """The line that reports a finished round (old clients) or the new clients' serving; its numbers also go to
        the run's loggers (TensorBoard, W&B) at step `rnd`."""
        accs, failed, errors = self.round_accs(method, rnd, new)
        if accs or failed:
            g = f"{method}/{'new' if new else 'old'}"
            values = {f"{g}_clients": len(accs), f"{g}_failed": failed}
            if accs:
                values |= {f"{g}_acc_mean": float(np.mean(accs)), f"{g}_acc_worst10": worst_decile_mean(accs)}
            self.loggers.scalars(rnd, values)
        extra = (f", {failed} failed" if failed else "") + (f", {errors} refused (bad description)" if errors else "")
        return f"{len(accs)} clients, acc {_mean_std(accs)}{extra}"

    # ---------------------------------------------------------------- evaluate / fine-tune given heads
    def send(self, message_type: str, records: dict[int, dict], method: str, rnd: int, phase: str, *,
             fail: Iterable[str] = (), up_key: str | None = None, per_node: dict[int, dict] | None = None,
             received_as: str | None = None, **extra) -> dict[int, Message]:
        """One message per node (`records[node]` plus the config, with `extra` and `per_node[node]`); good replies
        by node. Profiles are filed under `method`, failures as `failed` results of the methods in `fail`; the
        ArrayRecords sent count as the client's bytes received, its `up_key` ArrayRecord as bytes sent."""
        contents, down = {}, {}
        for node, recs in records.items():
            down[node] = sum(r.count_bytes() for r in recs.values() if isinstance(r, ArrayRecord))
            cfg = self.config(method, rnd, **extra, **(per_node or {}).get(node, {}))
            contents[node] = RecordDict({**recs, "config": cfg})
        replies = self.exchange(message_type, contents, f"{method}:{rnd}:{phase}")
        return self.collect(replies, method, rnd, phase, fail=fail, sent_down=down, up_key=up_key,
                            received_as=received_as)

    def send_heads(self, kind: str, heads: dict[int, Head], method: str, rnd: int, *, fail: Iterable[str] = (),
                   received_as: str | None = None, **extra) -> dict[int, Message]:
        """`evaluate.head` or `train.finetune` with one head per node (see `send`); with `received_as`, the
        fine-tune first evaluates the received head (its accuracy in the reply's `received`)."""
        mtype = {"evaluate": "evaluate.head", "finetune": "train.finetune"}[kind]
        if received_as:
            extra["evaluate_received"] = True
        return self.send(mtype, {n: {"head": head_record(h)} for n, h in heads.items()}, method, rnd, kind,
                         fail=fail, up_key="head", received_as=received_as,
                         per_node={n: {"class_names": list(h.class_names)} for n, h in heads.items()}, **extra)

    def score(self, replies: dict[int, Message], method: str, rnd: int, key: str = "metrics") -> None:
        for node, rep in replies.items():
            m = rep.content[key]
            self.result(method, self.client_id(node, rep), rnd, float(m["acc"]), int(m["num-examples"]))

    def finetune_config(self, upload: bool) -> dict:
        ft = self.spec.head_ft
        return {"steps": int(ft.steps), "lr": float(ft.lr), "l2_to_init": float(ft.l2_to_init),
                "weight_decay": float(ft.weight_decay), "select": bool(ft.select), "upload": bool(upload)}


class NodeSubset:
    """A Grid whose `get_node_ids` lists only some nodes; messages go through the Federation's guarded grid."""

    def __init__(self, grid: GuardedGrid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def write_server_phases(path: Path, records: list[PhaseRecord]) -> Path:
    names = [f.name for f in fields(PhaseRecord)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows([getattr(r, k) for k in names] for r in records)
    return path


def server_summary(records: list[PhaseRecord]) -> dict[str, dict[str, float]]:
    """Server-side wall seconds per method and phase (sums), e.g. {"tina": {"generate": 1.2, "refresh": 8.0}}."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        if r.method != "describe":  # the describe records are the clients' own profiles
            per = out.setdefault(r.method, {})
            per[r.phase] = round(per.get(r.phase, 0.0) + r.wall_s, 4)
    return out


def run_all(grid: Grid, spec: RunSpec) -> Outcome:
    """Every requested method, in a fixed order, on the same clients; then the report in the run dir, whatever
    happened: a method that fails (e.g. every client failed) is recorded as failed and the others go on; a stop
    request (Ctrl-C, SIGTERM, a dead engine) ends the run after the current step with the report of what finished.
    With `spec.resume`, the run continues from the run dir's checkpoint."""
    fed = Federation(grid, spec)
    prog = Progress()
    doc = RunDir(spec.out_dir).checkpoint() if spec.resume else None
    if doc is not None:
        fed.out, prog = Outcome.from_json(doc), Progress(**doc["progress"])
        log.info("[federation] resuming after %s", ", ".join(prog.done) + (f" and tina cohort {prog.tina_round}"
                 if prog.tina_round and "tina" not in prog.done else "") if prog.done or prog.tina_round else
                 "the start")
    t0 = time.perf_counter()
    try:
        fed.wait_for_nodes()
        log.info("[federation] %d clients registered in %.1f s; methods: %s", len(fed.nodes),
                 time.perf_counter() - t0, ", ".join(spec.methods))
        fed.describe(record=doc is None)   # a resumed run keeps the first describe's profiles
        from fedtina.methods import plan

        for method in plan(spec.methods):
            name = method.name
            if name in prog.done:
                continue
            t = time.perf_counter()
            log.info("[%s] %s", name, method.summary or "starts")
            try:
                method.run(fed, prog)
                status = "ok"
            except Interrupted:
                raise
            except Exception as e:  # noqa: BLE001 - one method failing must not lose the others' results
                status = f"failed: {e}"
                log.error("[%s] failed: %s%s", name, e, "" if isinstance(e, FedtinaError) else
                          " (traceback in the log file)", exc_info=not isinstance(e, FedtinaError))
            fed.out.method_status[name] = status
            prog.timings[name] = prog.timings.get(name, 0.0) + round(time.perf_counter() - t, 3)
            prog.done.append(name)
            fed.checkpoint(prog)
    except Interrupted as e:
        fed.out.interrupted = str(e)
        log.warning("[federation] %s; writing the report of what finished (resume: %s)", e,
                    resume_command(Path(spec.out_dir)))
    finally:
        for name in spec.methods:
            fed.out.method_status.setdefault(name, "interrupted" if fed.out.interrupted else "not run")
        _report(fed, prog.timings)
        fed.loggers.close()
    log.info("[federation] %s in %.1f s (%s)", "stopped" if fed.out.interrupted else "done",
             time.perf_counter() - t0, ", ".join(f"{k} {v:.1f} s" for k, v in prog.timings.items()))
    return fed.out


def _report(fed: Federation, timings: dict[str, float]) -> None:
    from fedtina.report.summary import summarize, write_report

    out, spec = fed.out, fed.spec
    out.summary = summarize(out.results, out.records, out.rounds)
    out.summary["method_status"] = {m: out.method_status.get(m, "not run") for m in spec.methods}
    out.summary["interrupted"] = out.interrupted or None
    out.summary["server_wall_s"] = {"methods": timings, "phases": server_summary(out.server_records)}
    out.files = write_report(Path(spec.out_dir), out.summary, out.results, out.records, out.zoo_growth)
    out.files.append(write_server_phases(Path(spec.out_dir) / "server_phases.csv", out.server_records))
