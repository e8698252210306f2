"""Server-side loops of every method, played one after the other on the same clients in one simulation.

`Federation` wraps the Grid: it waits for the nodes, learns who is who (`query.describe`), sends messages with a
finite timeout, turns missing or error replies into `failed` results, and collects per-client results, phase profiles
and the zoo's growth. The method functions (`run_tina`, `run_selection`, ...) are the loops of docs/federation.md.

Bookkeeping: `Outcome.results` holds one ClientResult per (method, client, round) and `Outcome.records` the clients'
phase profiles, attributed to the method they served (`tina` = evaluating the generated head, `tina_ft` = fine-tuning
and uploading it). Server-side phases (generation, checks, zoo writes, Tina refreshes, FedAvg aggregation; client id
-1) and the one-off `describe` of every client go to `Outcome.server_records`, kept apart so they do not count as a
client's cost.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtina.errors import FedtinaError
from fedtina.federation.checks import HeadCheckConfig, check_head, server_val_data
from fedtina.federation.grid import GuardedGrid, Interrupted
from fedtina.federation.partition import load_partition
from fedtina.federation.profiling import PhaseRecord, PhaseTimer, from_config
from fedtina.federation.report import ClientResult
from fedtina.federation.rundir import RunDir, resume_command
from fedtina.federation.runtime import RunSpec, arrays_record, head_record, record_head
from fedtina.heads import Head, generic_rows, selection_head
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
    shots: list | None = None  # per class: [1, d] mean feature of its labelled images (None: none), method.prompt


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

    def to_json(self) -> dict:
        """What a checkpoint keeps (the summary and files are rebuilt from it)."""
        return {**{k: [asdict(r) for r in getattr(self, k)] for k in self._LISTS}, "zoo_growth": self.zoo_growth,
                "rounds": self.rounds, "method_status": self.method_status}

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
        self.rows = generic_rows(self.assets.bank, self.class_names)
        self.clients: dict[int, Client] = {}           # node id -> Client
        self.nodes: list[int] = []
        self.tina = self.assets.tina
        self._val_cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._selection: dict[tuple[str, ...], Head] = {}

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
                     "device": s.client_device, **asdict(s.faults)}
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

    def has_unseen(self, cid: int) -> bool:
        return bool(self.partition.clients[cid].has_unseen) if 0 <= cid < len(self.partition.clients) else False

    def result(self, method: str, cid: int, rnd: int, acc: float | None = None, n: int = 0, status: str = "ok",
               detail: str = "") -> None:
        budget = self.partition.clients[cid].label_budget if 0 <= cid < len(self.partition.clients) else -1
        self.out.results.append(ClientResult(method=method, client_id=cid, round=rnd, acc=acc, num_examples=n,
                                             has_unseen=self.has_unseen(cid), status=status, detail=detail,
                                             label_budget=budget))

    def server_record(self, method: str, rnd: int, phase: str, timer: PhaseTimer, *, cid: int = -1,
                      acc: float | None = None, status: str = "ok", detail: str = "") -> None:
        self.out.server_records.append(timer.record(method, rnd, cid, phase, acc=acc, status=status, detail=detail))

    def collect(self, replies: dict[int, Message | None], method: str, rnd: int, phase: str, *,
                fail: Iterable[str] = (), sent_down: dict[int, int] | None = None, up_key: str | None = None,
                into: list[PhaseRecord] | None = None) -> dict[int, Message]:
        """Good replies by node. A missing reply (timeout) or an error reply gives a `failed` phase record and a
        `failed` ClientResult for each method in `fail`. Client profiles get the server-measured bytes:
        `bytes_recv` = arrays sent down to the client, `bytes_sent` = arrays it uploaded (`up_key`)."""
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
        contents = {n: RecordDict({"config": self.config("describe", 0, prompt=self.spec.options.prompt)})
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
        if names not in self._selection:
            self._selection[names] = selection_head(names, self.rows, self.assets.encoder.embed_names)
        return self._selection[names]

    def val_data(self, class_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if class_ids not in self._val_cache:
            self._val_cache[class_ids] = server_val_data(self.assets.bank.features, self.assets.dataset.labels,
                                                         self.partition.server_val_idx, class_ids)
        return self._val_cache[class_ids]

    # ---------------------------------------------------------------- progress
    def checkpoint(self, prog: Progress) -> None:
        """What finished so far, for `resume` (atomic: a kill leaves the previous checkpoint whole)."""
        RunDir(self.spec.out_dir).save_checkpoint({"progress": asdict(prog), "outcome": self.out.to_json()})

    def progress(self, method: str, rnd: int | None, n_rounds: int, text: str) -> None:
        where = f" round {rnd}/{n_rounds}" if rnd is not None else ""
        log.info("[%s]%s: %s", method, where, text)

    def round_accs(self, method: str, rnd: int) -> tuple[list[float], int, int]:
        rs = [r for r in self.out.results if r.method == method and r.round == rnd]
        return ([float(r.acc) for r in rs if r.status == "ok" and r.acc is not None],
                sum(r.status == "failed" for r in rs), sum(r.status == "error" for r in rs))

    def acc_line(self, method: str, rnd: int) -> str:
        accs, failed, errors = self.round_accs(method, rnd)
        extra = (f", {failed} failed" if failed else "") + (f", {errors} refused (bad description)" if errors else "")
        return f"{len(accs)} clients, acc {_mean_std(accs)}{extra}"

    # ---------------------------------------------------------------- evaluate / fine-tune given heads
    def send_heads(self, kind: str, heads: dict[int, Head], method: str, rnd: int, *, fail: Iterable[str] = (),
                   **extra) -> dict[int, Message]:
        """`evaluate.head` or `train.finetune` with one head per node; good replies by node. Profiles are filed
        under `method`, failures as `failed` results of the methods in `fail`."""
        mtype = {"evaluate": "evaluate.head", "finetune": "train.finetune"}[kind]
        contents, down = {}, {}
        for node, h in heads.items():
            rec = head_record(h)
            down[node] = rec.count_bytes()
            cfg = self.config(method, rnd, class_names=list(h.class_names), **extra)
            contents[node] = RecordDict({"head": rec, "config": cfg})
        replies = self.exchange(mtype, contents, f"{method}:{rnd}:{kind}")
        return self.collect(replies, method, rnd, kind, fail=fail, sent_down=down, up_key="head")

    def score(self, replies: dict[int, Message], method: str, rnd: int) -> None:
        for node, rep in replies.items():
            m = rep.content["metrics"]
            self.result(method, self.client_id(node, rep), rnd, float(m["acc"]), int(m["num-examples"]))

    def finetune_config(self, upload: bool) -> dict:
        ft = self.spec.head_ft
        return {"steps": int(ft.steps), "lr": float(ft.lr), "l2_to_init": float(ft.l2_to_init),
                "weight_decay": float(ft.weight_decay), "select": bool(ft.select), "upload": bool(upload)}


# ------------------------------------------------------------------------------------------------------------------
# tina


def refresh_tina(fed: Federation, zoo, rnd: int) -> str:
    """Continue training Tina on the grown zoo for `refresh_steps` steps (warm start from the current weights and
    normalisation); save it atomically as the run's Tina and as this cohort's (`tina-c<rnd>`, which a resumed run
    restarts from). Returns the cohort file's path."""
    from fedtina.tina import train as tina_train

    opts, tina = fed.spec.options, fed.tina
    # one thread: the cores are shared with the ClientApp actors, and one-thread CPU training is bit-reproducible,
    # so a resumed run refreshes exactly as an uninterrupted one
    cfg = replace(tina.cfg, train_steps=int(opts.refresh_steps), cpu_threads=1,
                  warmup_steps=min(int(tina.cfg.warmup_steps), max(1, opts.refresh_steps // 5)))
    with PhaseTimer() as t:
        entries = zoo.entries()
        new = tina_train.train_tina(entries, tina.encoder, cfg, log=None, init=tina, shots=fed.assets.shots,
                                    descriptions=fed.assets.descriptions)
        cohort_path = Path(fed.spec.tina_path).with_name(f"tina-c{rnd}.safetensors")
        for path in (cohort_path, Path(fed.spec.tina_path)):
            tina_train.save_checkpoint(path, new)   # temp file + os.replace
    fed.tina = new
    fed.server_record("tina", rnd, "refresh", t, detail=f"{opts.refresh_steps} steps on {len(entries)} heads")
    fed.progress("tina", rnd, fed.spec.rounds, f"Tina refreshed on {len(entries)} zoo heads "
                 f"({opts.refresh_steps} steps, {t.wall_s:.1f} s)")
    return str(cohort_path)


def row_norm_scale(fed: Federation, zoo) -> float:
    """The row norm of a plausible head, for the gate's `max_row_norm_ratio`: the mean row norm of the zoo's heads
    (fine-tuned heads have rows several times longer than the generic head's: measured 6x-9x on shapes, so the
    generic scale would refuse the zoo itself); the generic head's mean row norm while the zoo is empty."""
    rows = [np.linalg.norm(np.asarray(e.params["head.weight"], np.float32), axis=1) for e in zoo.entries()]
    if rows:
        return float(np.concatenate(rows).mean())
    return float(np.linalg.norm(np.asarray(fed.assets.bank.generic_weight), axis=1).mean())


def check_uploads(fed: Federation, ok: dict[int, Message], rnd: int, norm_scale: float,
                  sent: dict[int, Head]) -> tuple[list, int]:
    """Run every uploaded head through the server's gate, against the selection head and the head the server sent
    that node (`sent`): (accepted ZooEntries, number refused). The verdict and its reason also go on the client's
    tina_ft result of this round (`upload`, `upload_detail`)."""
    from fedtina.zoo import ZooEntry

    check_cfg = HeadCheckConfig(**fed.spec.checks)
    d = int(fed.assets.bank.features.shape[1])
    rows = {r.client_id: r for r in fed.out.results if r.method == "tina_ft" and r.round == rnd}
    entries, refused = [], 0
    for node, rep in ok.items():
        c = fed.clients[node]
        with PhaseTimer() as t:
            try:
                up = record_head(rep.content["head"], c.names)
                res = check_head(up, c.names, d, fed.selection(c.names), *fed.val_data(c.class_ids), norm_scale,
                                 check_cfg, sent=sent[node])
                reason, acc = res.reason, res.acc
                if res.accepted and res.class_drop is not None:  # how close an accepted head came to the limit
                    reason = f"{reason} (largest class-pair AUC drop {res.class_drop:.2f})"
            except Exception as e:  # noqa: BLE001 - a malformed upload is refused, never fatal
                res, reason, acc = None, f"malformed upload: {type(e).__name__}: {e}", None
        if c.client_id in rows:
            rows[c.client_id].upload = "accepted" if res is not None and res.accepted else "refused"
            rows[c.client_id].upload_detail = reason
        if res is not None and res.accepted:
            entries.append(ZooEntry(class_names=c.names, params=up.params(),
                                    metrics={"acc": float(rep.content["metrics"]["acc"]),
                                             "server_val_acc": float(acc) if acc is not None else float("nan")},
                                    source=f"client:{c.client_id}"))
            fed.server_record("tina", rnd, "check", t, cid=c.client_id, acc=acc, detail=reason)
        else:
            refused += 1
            log.warning("[tina] round %d: refused the head uploaded by client %d: %s", rnd, c.client_id, reason)
            fed.server_record("tina", rnd, "check", t, cid=c.client_id, acc=acc, status="refused", detail=reason)
    return entries, refused


def run_tina(fed: Federation, prog: Progress) -> None:
    """Clients arrive in `rounds` cohorts (by client id). Per cohort: one batched generation for every usable
    description, `evaluate.head`, then (method.finetune) `train.finetune` with upload, the server's checks, the
    accepted heads appended to the run's zoo, and a Tina refresh every `refresh_every` accepted heads. A checkpoint
    follows every cohort; a resumed run continues after the last one, with that point's zoo and Tina."""
    from fedtina.tina.train import load_checkpoint
    from fedtina.zoo import ZooStore

    if prog.tina_zoo_size is not None:
        trim_run_zoo(Path(fed.spec.zoo_dir), prog.tina_zoo_size)
    if prog.tina_checkpoint:
        fed.tina = load_checkpoint(prog.tina_checkpoint, fed.assets.encoder, base=fed.tina.base)
    with ZooStore(Path(fed.spec.zoo_dir)) as zoo:
        if prog.tina_norm_scale is None:  # fixed for the run: the gate does not drift with what it admits
            prog.tina_norm_scale, prog.tina_zoo_size = row_norm_scale(fed, zoo), len(zoo)
            fed.checkpoint(prog)
        _tina_rounds(fed, zoo, prog)


def trim_run_zoo(zoo_dir: Path, size: int) -> None:
    """Back to the checkpoint's zoo: a kill between a cohort's zoo append and its checkpoint leaves heads that the
    resumed cohort will upload again. The append-only store is rebuilt from its first `size` entries (same ids);
    the longer one is kept beside it, renamed."""
    from fedtina.zoo import ZooStore

    with ZooStore(zoo_dir) as zoo:
        n = len(zoo)
        if n < size:
            raise FedtinaError(f"the run's zoo {zoo_dir} has {n} entries, fewer than the checkpoint's {size}: it was "
                               f"modified outside the run; the run cannot be resumed")
        keep = zoo.entries(zoo.ids()[:size]) if n > size else None
    if keep is None:
        return
    aside = zoo_dir.with_name(f"{zoo_dir.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
    zoo_dir.rename(aside)
    with ZooStore(zoo_dir) as zoo:
        zoo.append_many(keep)
    log.info("[tina] resume: the run's zoo had %d heads, %d from an unfinished cohort; continuing from the "
             "checkpoint's %d (the longer zoo is kept in %s)", n, n - size, size, aside)


def _tina_rounds(fed: Federation, zoo, prog: Progress) -> None:
    spec, opts = fed.spec, fed.spec.options
    norm_scale = prog.tina_norm_scale
    methods = ["tina", "tina_ft"] if opts.finetune else ["tina"]
    fed.out.rounds.update({m: spec.rounds for m in methods})
    pending = prog.tina_pending  # accepted heads since the last refresh
    for rnd, cohort in enumerate(np.array_split(np.arange(spec.n_clients), spec.rounds), start=1):
        if rnd <= prog.tina_round:
            continue  # finished before a resume
        clients = fed.usable(fed.cohort_nodes(cohort), methods, rnd)
        accepted = refused = 0
        zoo_at_arrival = len(zoo)  # the zoo Tina was trained on when this cohort asked
        if clients:
            with PhaseTimer() as t:   # one batch, whatever each client's prompts are
                shots = [c.shots for c in clients] if opts.prompt != "text" else None
                heads = fed.tina.generate([list(c.names) for c in clients], seed=opts.gen_seed, shots=shots,
                                          use_names=opts.prompt != "images")
            fed.server_record("tina", rnd, "generate", t, detail=f"{len(clients)} heads in one batch")
            by_node = {c.node_id: h for c, h in zip(clients, heads)}
            fed.score(fed.send_heads("evaluate", by_node, "tina", rnd, fail=["tina"]), "tina", rnd)
            if opts.finetune:
                ok = fed.send_heads("finetune", by_node, "tina_ft", rnd, fail=["tina_ft"],
                                    **fed.finetune_config(upload=True))
                fed.score(ok, "tina_ft", rnd)
                entries, refused = check_uploads(fed, {n: r for n, r in ok.items() if "head" in r.content}, rnd,
                                                  norm_scale, by_node)
                if entries:
                    with PhaseTimer() as t:
                        zoo.append_many(entries)
                    fed.server_record("tina", rnd, "zoo", t, detail=f"appended {len(entries)} heads")
                accepted = len(entries)
                pending += accepted
                if opts.refresh_every > 0 and pending >= opts.refresh_every:
                    prog.tina_checkpoint = refresh_tina(fed, zoo, rnd)
                    pending = 0
        accs, _, _ = fed.round_accs("tina", rnd)
        fed.out.zoo_growth.append({"round": rnd, "zoo_size": zoo_at_arrival, "zoo_size_after": len(zoo),
                                   "mean_acc": float(np.mean(accs)) if accs else None,
                                   "std_acc": float(np.std(accs)) if accs else None,
                                   "accepted": accepted, "refused": refused})
        ft = f" (after ft {_mean_std(fed.round_accs('tina_ft', rnd)[0])})" if opts.finetune else ""
        fed.progress("tina", rnd, spec.rounds, f"{fed.acc_line('tina', rnd)}{ft}, {accepted} heads accepted"
                     f"{f', {refused} refused' if refused else ''}, zoo {len(zoo)}")
        prog.tina_round, prog.tina_pending, prog.tina_zoo_size = rnd, pending, len(zoo)
        fed.checkpoint(prog)


# ------------------------------------------------------------------------------------------------------------------
# selection and local fine-tuning


def run_selection(fed: Federation) -> None:
    fed.out.rounds["selection"] = 1
    clients = fed.usable(fed.nodes, ["selection"], 1)
    with PhaseTimer() as t:
        heads = {c.node_id: fed.selection(c.names) for c in clients}
    fed.server_record("selection", 1, "generate", t, detail=f"{len(heads)} selection heads")
    fed.score(fed.send_heads("evaluate", heads, "selection", 1, fail=["selection"]), "selection", 1)
    fed.progress("selection", None, 1, fed.acc_line("selection", 1))


def run_local_ft(fed: Federation) -> None:
    """The per-client oracle: the selection head fine-tuned on the client's own data (nothing is uploaded)."""
    fed.out.rounds["local_ft"] = 1
    clients = fed.usable(fed.nodes, ["local_ft"], 1)
    heads = {c.node_id: fed.selection(c.names) for c in clients}
    ok = fed.send_heads("finetune", heads, "local_ft", 1, fail=["local_ft"], **fed.finetune_config(upload=False))
    fed.score(ok, "local_ft", 1)
    fed.progress("local_ft", None, 1, fed.acc_line("local_ft", 1))


# ------------------------------------------------------------------------------------------------------------------
# FedAvg (Flower's strategy), on the head over frozen features or on the whole model


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, plus per-client records read from the replies (results, profiles, failures).
    `train_type` / `evaluate_type` route its messages to other ClientApp handlers (e.g. `train.full`)."""

    def __init__(self, fed: Federation, method: str, train_type: str = "train", evaluate_type: str = "evaluate",
                 record_results: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fed, self.method, self.record_results = fed, method, record_results
        self.train_type, self.evaluate_type = train_type, evaluate_type
        self._sent: dict[tuple[str, int], dict[int, int]] = {}

    def _route(self, msgs, mtype: str, phase: str, server_round: int) -> list[Message]:
        out = []
        for m in msgs:
            if m.metadata.message_type != mtype:
                m = Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=mtype,
                            group_id=f"{self.method}:{server_round}:{phase}")
            out.append(m)
        self._sent[(phase, server_round)] = {m.metadata.dst_node_id: m.content[self.arrayrecord_key].count_bytes()
                                             for m in out}
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

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.fed.collect(self._by_node("train", server_round, replies), self.method, server_round, "train",
                         sent_down=self._sent.get(("train", server_round)), up_key=self.arrayrecord_key)
        with PhaseTimer() as t:
            out = super().aggregate_train(server_round, replies)
        self.fed.server_record(self.method, server_round, "aggregate", t,
                               detail=f"{sum(not r.has_error() for r in replies)} updates")
        return out

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        ok = self.fed.collect(self._by_node("evaluate", server_round, replies), self.method, server_round,
                              "evaluate", fail=[self.method] if self.record_results else [],
                              sent_down=self._sent.get(("evaluate", server_round)))
        accs = [float(r.content["metrics"]["acc"]) for r in ok.values()]
        if self.record_results:
            self.fed.score(ok, self.method, server_round)
            line = self.fed.acc_line(self.method, server_round)
        else:
            line = f"{len(accs)} clients, acc {_mean_std(accs)}"
        self.fed.progress(self.method, server_round, self.fed.spec.rounds, line)
        return super().aggregate_evaluate(server_round, replies)


def global_head(fed: Federation) -> Head:
    """The FedAvg starting point: a head over every class of the dataset (row i = class id i): the generic row of a
    seen class, the nearest-name seen row for an unseen one (the selection baseline's rule)."""
    return selection_head(tuple(fed.class_names), fed.rows, fed.assets.encoder.embed_names)


def _strategy(fed: Federation, method: str, **kwargs) -> RecordingFedAvg:
    n = len(fed.nodes)
    return RecordingFedAvg(fed, method, fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n,
                           min_evaluate_nodes=n, min_available_nodes=n, **kwargs)


def run_fedavg(fed: Federation) -> Head:
    """FedAvg (Flower's strategy) of the global head on frozen features. Each round every client evaluates the
    aggregate k-way over its own classes (its rows of the global head); the last round's scores are the method's
    result. Returns the final global head."""
    spec, opts = fed.spec, fed.spec.options
    init = global_head(fed)
    record = "fedavg" in spec.methods
    if record:
        fed.out.rounds["fedavg"] = spec.rounds
    # with fedavg_ft alone, the FedAvg rounds are part of fedavg_ft's cost (and progress lines)
    strategy = _strategy(fed, "fedavg" if record else "fedavg_ft", record_results=record)
    arrays = head_record(init)
    train_cfg = fed.config("fedavg", None, epochs=opts.fedavg_epochs, lr=opts.fedavg_lr,
                           batch_size=opts.fedavg_batch_size)
    result = strategy.start(fed.grid, arrays, num_rounds=spec.rounds, timeout=spec.timeout_s, train_config=train_cfg,
                            evaluate_config=fed.config("fedavg", None))
    if "weight" not in result.arrays:  # Flower keeps the initial arrays out of its Result until a round aggregates
        raise MethodFailed(f"no FedAvg round had a client update to aggregate (every client failed in all "
                           f"{spec.rounds} rounds)")
    return record_head(result.arrays, init.class_names)


def run_fedavg_ft(fed: Federation, head: Head) -> None:
    """The final FedAvg head's rows for each client's classes (from its description), fine-tuned locally."""
    from fedtina.federation.client_ops import restrict_head

    rnd = fed.spec.rounds
    fed.out.rounds["fedavg_ft"] = rnd
    clients = fed.usable(fed.nodes, ["fedavg_ft"], rnd)
    heads = {c.node_id: restrict_head(head.weight, head.bias, c.class_ids, c.names) for c in clients}
    ok = fed.send_heads("finetune", heads, "fedavg_ft", rnd, fail=["fedavg_ft"], **fed.finetune_config(upload=False))
    fed.score(ok, "fedavg_ft", rnd)
    fed.progress("fedavg_ft", None, 1, fed.acc_line("fedavg_ft", rnd))


def full_model_state(fed: Federation) -> dict[str, np.ndarray]:
    """fedavg_full's start: the generic ResNet-20 (all but its classifier) with a classifier over every class of the
    dataset, initialised like `global_head`."""
    from fedtina.federation.client_ops import init_full_model_state

    state = init_full_model_state(len(fed.class_names), fed.assets.cfg.backbone, seed=fed.spec.options.gen_seed,
                                  backbone_path=str(fed.assets.bank.backbone_path))
    head = global_head(fed)
    if state["fc.weight"].shape != head.weight.shape:
        raise FedtinaError(f"full model fc {state['fc.weight'].shape} does not match the head {head.weight.shape}")
    state["fc.weight"], state["fc.bias"] = head.weight.copy(), head.bias.copy()
    return state


def run_fedavg_full(fed: Federation) -> None:
    spec, opts = fed.spec, fed.spec.options
    fed.out.rounds["fedavg_full"] = spec.rounds
    strategy = _strategy(fed, "fedavg_full", train_type="train.full", evaluate_type="evaluate.full")
    train_cfg = fed.config("fedavg_full", None, epochs=opts.full_epochs, lr=opts.full_lr,
                           batch_size=opts.full_batch_size)
    strategy.start(fed.grid, arrays_record(full_model_state(fed)), num_rounds=spec.rounds, timeout=spec.timeout_s,
                   train_config=train_cfg, evaluate_config=fed.config("fedavg_full", None))


# ------------------------------------------------------------------------------------------------------------------


def write_server_phases(path: Path, records: list[PhaseRecord]) -> Path:
    names = [f.name for f in fields(PhaseRecord)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows([[getattr(r, k) for k in names] for r in records])
    return path


def server_summary(records: list[PhaseRecord]) -> dict[str, dict[str, float]]:
    """Server-side wall seconds per method and phase (sums), e.g. {"tina": {"generate": 1.2, "refresh": 8.0}}."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        if r.method != "describe":  # the describe records are the clients' own profiles
            per = out.setdefault(r.method, {})
            per[r.phase] = round(per.get(r.phase, 0.0) + r.wall_s, 4)
    return out


def _plan(spec: RunSpec) -> list[tuple[str, Callable[[Federation, Progress], None]]]:
    """The methods to play, in a fixed order, each a step `fn(fed, progress)` (FedAvg's rounds are one step, shared
    by fedavg and fedavg_ft)."""
    def fedavg(fed: Federation, prog: Progress) -> None:
        head = run_fedavg(fed)
        prog.fedavg_head = {"class_names": list(head.class_names), "weight": head.weight.tolist(),
                            "bias": head.bias.tolist()}

    def fedavg_ft(fed: Federation, prog: Progress) -> None:
        if prog.fedavg_head is None:
            why = fed.out.method_status.get("fedavg", "see the log").removeprefix("failed: ")
            raise MethodFailed(f"its FedAvg rounds failed ({why})")
        h = prog.fedavg_head
        run_fedavg_ft(fed, Head(tuple(h["class_names"]), np.asarray(h["weight"], np.float32),
                                np.asarray(h["bias"], np.float32)))

    steps = {"tina": run_tina, "selection": lambda fed, _p: run_selection(fed),
             "local_ft": lambda fed, _p: run_local_ft(fed), "fedavg": fedavg, "fedavg_ft": fedavg_ft,
             "fedavg_full": lambda fed, _p: run_fedavg_full(fed)}
    wanted = set(spec.methods) | ({"fedavg"} if "fedavg_ft" in spec.methods else set())
    return [(name, fn) for name, fn in steps.items() if name in wanted]


def run_all(grid: Grid, spec: RunSpec) -> Outcome:
    """Every requested method, in a fixed order, on the same clients; then the report in the run dir, whatever
    happened: a method that fails (e.g. every client failed) is recorded as failed and the others go on; a stop
    request (Ctrl-C, SIGTERM, a dead engine) ends the run after the current step with the report of what finished.
    With `spec.resume`, the run continues from the run dir's checkpoint."""
    fed = Federation(grid, spec)
    prog = Progress()
    doc = RunDir(spec.out_dir).checkpoint() if spec.resume else None
    if doc is not None:
        fed.out, prog = Outcome.from_json(doc["outcome"]), Progress(**doc["progress"])
        log.info("[federation] resuming after %s", ", ".join(prog.done) + (f" and tina cohort {prog.tina_round}"
                 if prog.tina_round and "tina" not in prog.done else "") if prog.done or prog.tina_round else
                 "the start")
    t0 = time.perf_counter()
    try:
        fed.wait_for_nodes()
        log.info("[federation] %d clients registered in %.1f s; methods: %s", len(fed.nodes),
                 time.perf_counter() - t0, ", ".join(spec.methods))
        fed.describe(record=doc is None)   # a resumed run keeps the first describe's profiles
        for name, step in _plan(spec):
            if name in prog.done:
                continue
            t = time.perf_counter()
            try:
                step(fed, prog)
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
    log.info("[federation] %s in %.1f s (%s)", "stopped" if fed.out.interrupted else "done",
             time.perf_counter() - t0, ", ".join(f"{k} {v:.1f} s" for k, v in prog.timings.items()))
    return fed.out


def _report(fed: Federation, timings: dict[str, float]) -> None:
    from fedtina.federation.report import summarize, write_report

    out, spec = fed.out, fed.spec
    out.summary = summarize(out.results, out.records, out.rounds)
    out.summary["method_status"] = {m: out.method_status.get(m, "not run") for m in spec.methods}
    out.summary["interrupted"] = out.interrupted or None
    out.summary["server_wall_s"] = {"methods": timings, "phases": server_summary(out.server_records)}
    out.files = write_report(Path(spec.out_dir), out.summary, out.results, out.records, out.zoo_growth)
    out.files.append(write_server_phases(Path(spec.out_dir) / "server_phases.csv", out.server_records))
