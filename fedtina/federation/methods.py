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
from typing import Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtina.errors import FedtinaError
from fedtina.federation.checks import HeadCheckConfig, check_head, server_val_data
from fedtina.federation.partition import load_partition
from fedtina.federation.profiling import PhaseRecord, PhaseTimer, from_config
from fedtina.federation.report import ClientResult
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


@dataclass
class Outcome:
    results: list[ClientResult] = field(default_factory=list)
    records: list[PhaseRecord] = field(default_factory=list)          # client phases, per method
    server_records: list[PhaseRecord] = field(default_factory=list)   # server phases + the one-off describe
    zoo_growth: list[dict] = field(default_factory=list)
    rounds: dict[str, int] = field(default_factory=dict)
    summary: dict | None = None
    files: list[Path] = field(default_factory=list)


class Federation:
    def __init__(self, grid: Grid, spec: RunSpec) -> None:
        if spec.assets is None:
            raise FedtinaError("RunSpec.assets is not set: the driver must attach build_assets(...)'s result")
        self.grid, self.spec, self.assets = grid, spec, spec.assets
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
            time.sleep(0.1)
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
        """Send one message per node and wait at most `timeout` (default `timeout_s`); None for nodes that did not
        answer in time."""
        if not contents:
            return {}
        msgs = [Message(c, dst_node_id=n, message_type=message_type, group_id=group) for n, c in contents.items()]
        replies = self.grid.send_and_receive(msgs, timeout=timeout or self.spec.timeout_s)
        got = {r.metadata.src_node_id: r for r in replies}
        return {n: got.get(n) for n in contents}

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
        self.out.results.append(ClientResult(method=method, client_id=cid, round=rnd, acc=acc, num_examples=n,
                                             has_unseen=self.has_unseen(cid), status=status, detail=detail))

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
                detail = (f"no reply within timeout_s={self.spec.timeout_s:g}" if rep is None
                          else _short(rep.error.reason))
                log.warning("[%s] round %d: client %d failed in %s: %s%s", method, rnd, cid, phase, detail,
                            "" if rep is None else " (traceback in the log file)")
                into.append(PhaseRecord(method, rnd, cid, phase, bytes_recv=down, status="failed", detail=detail))
                for m in fail:
                    self.result(m, cid, rnd, status="failed", detail=f"{phase}: {detail}")
                continue
            up = rep.content[up_key].count_bytes() if up_key and up_key in rep.content.array_records else 0
            if "prof" in rep.content.config_records:
                prof = from_config(dict(rep.content["prof"]))
                into.append(replace(prof, method=method, round=rnd, phase=phase, bytes_recv=down, bytes_sent=up))
            ok[node] = rep
        return ok

    # ---------------------------------------------------------------- who is who
    def describe(self) -> None:
        """`query.describe` to every node: its client id and the text describing its classes, parsed here. The
        first message starts the Ray actors (imports, torch), so it may take up to `node_wait_s`."""
        contents = {n: RecordDict({"config": self.config("describe", 0)}) for n in self.nodes}
        t0 = time.perf_counter()
        wait = max(self.spec.timeout_s, self.spec.node_wait_s)
        ok = self.collect(self.exchange("query.describe", contents, "describe", timeout=wait), "describe", 0,
                          "describe", into=self.out.server_records)
        for node, rep in ok.items():
            desc = rep.content["desc"]
            c = Client(node, int(desc["client_id"]), str(desc["text"]))
            self._parse(c)
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
        want = {int(i) for i in client_ids}
        return [n for n, c in self.clients.items() if c.client_id in want]

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


def refresh_tina(fed: Federation, zoo, rnd: int) -> None:
    """Continue training Tina on the grown zoo for `refresh_steps` steps (warm start from the current weights and
    normalisation); save the run's checkpoint atomically."""
    from fedtina.tina import train as tina_train

    opts, tina = fed.spec.options, fed.tina
    cfg = replace(tina.cfg, train_steps=int(opts.refresh_steps),
                  warmup_steps=min(int(tina.cfg.warmup_steps), max(1, opts.refresh_steps // 5)))
    with PhaseTimer() as t:
        entries = zoo.entries()
        new = tina_train.train_tina(entries, tina.encoder, cfg, log=None, init=tina)
        tina_train.save_checkpoint(Path(fed.spec.tina_path), new)   # temp file + os.replace
    fed.tina = new
    fed.server_record("tina", rnd, "refresh", t, detail=f"{opts.refresh_steps} steps on {len(entries)} heads")
    fed.progress("tina", rnd, fed.spec.rounds, f"Tina refreshed on {len(entries)} zoo heads "
                 f"({opts.refresh_steps} steps, {t.wall_s:.1f} s)")


def row_norm_scale(fed: Federation, zoo) -> float:
    """The row norm of a plausible head, for the gate's `max_row_norm_ratio`: the mean row norm of the zoo's heads
    (fine-tuned heads have rows several times longer than the generic head's: measured 6x-9x on shapes, so the
    generic scale would refuse the zoo itself); the generic head's mean row norm while the zoo is empty."""
    rows = [np.linalg.norm(np.asarray(e.params["head.weight"], np.float32), axis=1) for e in zoo.entries()]
    if rows:
        return float(np.concatenate(rows).mean())
    return float(np.linalg.norm(np.asarray(fed.assets.bank.generic_weight), axis=1).mean())


def check_uploads(fed: Federation, ok: dict[int, Message], rnd: int, norm_scale: float) -> tuple[list, int]:
    """Run every uploaded head through the server's gate: (accepted ZooEntries, number refused)."""
    from fedtina.zoo import ZooEntry

    check_cfg = HeadCheckConfig(**fed.spec.checks)
    d = int(fed.assets.bank.features.shape[1])
    entries, refused = [], 0
    for node, rep in ok.items():
        c = fed.clients[node]
        with PhaseTimer() as t:
            try:
                up = record_head(rep.content["head"], c.names)
                res = check_head(up, c.names, d, fed.selection(c.names), *fed.val_data(c.class_ids), norm_scale,
                                 check_cfg)
                reason, acc = res.reason, res.acc
            except Exception as e:  # noqa: BLE001 - a malformed upload is refused, never fatal
                res, reason, acc = None, f"malformed upload: {type(e).__name__}: {e}", None
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


def run_tina(fed: Federation) -> None:
    """Clients arrive in `rounds` cohorts (by client id). Per cohort: one batched generation for every usable
    description, `evaluate.head`, then (method.finetune) `train.finetune` with upload, the server's checks, the
    accepted heads appended to the run's zoo, and a Tina refresh every `refresh_every` accepted heads."""
    from fedtina.zoo import ZooStore

    with ZooStore(Path(fed.spec.zoo_dir)) as zoo:
        _tina_rounds(fed, zoo)


def _tina_rounds(fed: Federation, zoo) -> None:
    spec, opts = fed.spec, fed.spec.options
    norm_scale = row_norm_scale(fed, zoo)  # fixed for the run: the gate does not drift with what it admits
    methods = ["tina", "tina_ft"] if opts.finetune else ["tina"]
    fed.out.rounds.update({m: spec.rounds for m in methods})
    pending = 0  # accepted heads since the last refresh
    for rnd, cohort in enumerate(np.array_split(np.arange(spec.n_clients), spec.rounds), start=1):
        clients = fed.usable(fed.cohort_nodes(cohort), methods, rnd)
        accepted = refused = 0
        zoo_at_arrival = len(zoo)  # the zoo Tina was trained on when this cohort asked
        if clients:
            with PhaseTimer() as t:
                heads = fed.tina.generate([list(c.names) for c in clients], seed=opts.gen_seed)
            fed.server_record("tina", rnd, "generate", t, detail=f"{len(clients)} heads in one batch")
            by_node = {c.node_id: h for c, h in zip(clients, heads)}
            fed.score(fed.send_heads("evaluate", by_node, "tina", rnd, fail=["tina"]), "tina", rnd)
            if opts.finetune:
                ok = fed.send_heads("finetune", by_node, "tina_ft", rnd, fail=["tina_ft"],
                                    **fed.finetune_config(upload=True))
                fed.score(ok, "tina_ft", rnd)
                entries, refused = check_uploads(fed, {n: r for n, r in ok.items() if "head" in r.content}, rnd,
                                                  norm_scale)
                if entries:
                    with PhaseTimer() as t:
                        zoo.append_many(entries)
                    fed.server_record("tina", rnd, "zoo", t, detail=f"appended {len(entries)} heads")
                accepted = len(entries)
                pending += accepted
                if opts.refresh_every > 0 and pending >= opts.refresh_every:
                    refresh_tina(fed, zoo, rnd)
                    pending = 0
        accs, _, _ = fed.round_accs("tina", rnd)
        fed.out.zoo_growth.append({"round": rnd, "zoo_size": zoo_at_arrival, "zoo_size_after": len(zoo),
                                   "mean_acc": float(np.mean(accs)) if accs else None,
                                   "std_acc": float(np.std(accs)) if accs else None,
                                   "accepted": accepted, "refused": refused})
        ft = f" (after ft {_mean_std(fed.round_accs('tina_ft', rnd)[0])})" if opts.finetune else ""
        fed.progress("tina", rnd, spec.rounds, f"{fed.acc_line('tina', rnd)}{ft}, {accepted} heads accepted"
                     f"{f', {refused} refused' if refused else ''}, zoo {len(zoo)}")


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
    return record_head(result.arrays if result.arrays is not None else arrays, init.class_names)


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


def run_all(grid: Grid, spec: RunSpec) -> Outcome:
    """Every requested method, in a fixed order, on the same clients; then the report in the run dir."""
    from fedtina.federation.report import summarize, write_report

    fed = Federation(grid, spec)
    t0 = time.perf_counter()
    fed.wait_for_nodes()
    log.info("[federation] %d clients registered in %.1f s; methods: %s", len(fed.nodes), time.perf_counter() - t0,
             ", ".join(spec.methods))
    fed.describe()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - t, 3)
        return out

    for name, fn in (("tina", run_tina), ("selection", run_selection), ("local_ft", run_local_ft)):
        if name in spec.methods:
            timed(name, fn, fed)
    if "fedavg" in spec.methods or "fedavg_ft" in spec.methods:
        head = timed("fedavg", run_fedavg, fed)
        if "fedavg_ft" in spec.methods:
            timed("fedavg_ft", run_fedavg_ft, fed, head)
    if "fedavg_full" in spec.methods:
        timed("fedavg_full", run_fedavg_full, fed)
    log.info("[federation] done in %.1f s (%s)", time.perf_counter() - t0,
             ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))

    out = fed.out
    out.summary = summarize(out.results, out.records, out.rounds)
    out.summary["server_wall_s"] = {"methods": timings, "phases": server_summary(out.server_records)}
    out.files = write_report(Path(spec.out_dir), out.summary, out.results, out.records, out.zoo_growth)
    out.files.append(write_server_phases(Path(spec.out_dir) / "server_phases.csv", out.server_records))
    return out
