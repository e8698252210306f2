"""The results ledger: what a run produced, what it cost, and the checkpoint that a resumed run restarts from.

`Outcome.results` holds one ClientResult per (method, client, round) and `Outcome.records` the clients' phase
profiles, attributed to the method they served (a reply that also evaluated what it received files that evaluation
under the method named by `received_as`). Server-side phases (generation, checks, zoo writes, model refreshes,
aggregation; client id -1) and the one-off `describe` of every client go to `Outcome.server_records`, kept apart so
they do not count as a client's cost.

The checkpoint is the Outcome so far plus `Progress`: the methods finished, their server wall seconds, and each
method's own resume state (the dataclass it registered as `state`), stored under its name.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Message, RecordDict

from fedtina.errors import FedtinaError
from fedtina.report.loggers import RunLoggers
from fedtina.report.profiling import PhaseRecord, PhaseTimer
from fedtina.report.summary import ClientResult, worst_decile_mean
from fedtina.runtime.rundir import CHECKPOINT, RunDir
from fedtina.server.replies import BadReply, Checked
from fedtina.server.roster import Client, Roster

log = logging.getLogger("fedtina.federation")


def mean_std(values: Iterable[float]) -> str:
    v = np.array(list(values), dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "n/a"


class MethodFailed(FedtinaError):
    """A method that cannot produce its result (e.g. every client failed in every round)."""


@dataclass
class Outcome:
    results: list[ClientResult] = field(default_factory=list)
    records: list[PhaseRecord] = field(default_factory=list)          # client phases, per method
    server_records: list[PhaseRecord] = field(default_factory=list)   # server phases + the one-off describe
    zoo_growth: list[dict] = field(default_factory=list)
    rounds: dict[str, int] = field(default_factory=dict)
    method_status: dict[str, str] = field(default_factory=dict)       # ok | failed: why | interrupted | not run
    interrupted: str = ""                                             # why the run stopped early ("": it did not)
    failed: str = ""                                                  # the machine error that stopped it (a full
                                                                      # disk; "": none): resumable, not done
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
    """Where a run stands, for `resume`: finished methods, their server wall seconds, and per method its own resume
    state (an instance of the dataclass it registered as `state`)."""

    done: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)

    def state(self, playing: Any, name: str) -> Any:
        """Method `name`'s state as method `playing` may read it: its own, or that of a method it `requires`."""
        if playing is None or (name != playing.name and name not in playing.requires):
            raise FedtinaError(f"{playing.name if playing is not None else 'the engine'} reads the state of method "
                               f"{name!r}, which it does not require")
        if name not in self.states:
            raise FedtinaError(f"method {name!r} registered no state")
        return self.states[name]

    @classmethod
    def fresh(cls, state_types: dict[str, type]) -> "Progress":
        return cls(states={name: t() for name, t in state_types.items()})

    @classmethod
    def from_json(cls, doc: dict, state_types: dict[str, type], where: str | Path) -> "Progress":
        """A checkpoint's progress, each state rebuilt as its method's dataclass. A checkpoint of another layout
        (an older fedtina's, or one whose methods' states have other fields) fails with one line."""
        prog = doc.get("progress")
        keys = {f.name for f in fields(cls)}
        if not isinstance(prog, dict) or set(prog) != keys:
            got = sorted(prog) if isinstance(prog, dict) else type(prog).__name__
            raise FedtinaError(f"{where} is a checkpoint of another fedtina version (its progress holds {got}, "
                               f"expected {sorted(keys)}); it cannot be resumed: start the run again in a new dir")
        states = {}
        for name, t in state_types.items():
            raw = prog["states"].get(name, {})
            want = {f.name for f in fields(t)}
            if not isinstance(raw, dict) or not set(raw) <= want:
                raise FedtinaError(f"{where}: the saved state of method {name} ({sorted(raw)}) does not match its "
                                   f"{t.__name__} ({sorted(want)}); it cannot be resumed: start the run again in a "
                                   f"new dir")
            states[name] = t(**raw)
        return cls(done=list(prog["done"]), timings=dict(prog["timings"]), states=states)


def load_checkpoint(out_dir: str | Path, state_types: dict[str, type]) -> tuple[Outcome, Progress] | None:
    """The run dir's checkpoint as (Outcome so far, Progress); None when it has none."""
    doc = RunDir(out_dir).checkpoint()
    if doc is None:
        return None
    prog = Progress.from_json(doc, state_types, Path(out_dir) / CHECKPOINT)
    return Outcome.from_json(doc), prog


def save_checkpoint(out_dir: str | Path, out: Outcome, prog: Progress) -> None:
    """What finished so far, for `resume` (atomic: a kill leaves the previous checkpoint whole)."""
    RunDir(out_dir).save_checkpoint({"progress": asdict(prog), **out.header()}, out.lists(), item=asdict)


class Ledger:
    """The Outcome of one run and the lines that report it (also to the run's loggers: TensorBoard, W&B)."""

    def __init__(self, roster: Roster, loggers: RunLoggers) -> None:
        self.roster, self.loggers = roster, loggers
        self.out = Outcome()

    # ---------------------------------------------------------------- per-client results
    def result(self, method: str, cid: int, rnd: int, acc: float | None = None, n: int = 0, status: str = "ok",
               detail: str = "") -> None:
        r = self.roster
        self.out.results.append(ClientResult(method=method, client_id=cid, round=rnd, acc=acc, num_examples=n,
                                             has_unseen=r.has_unseen(cid), status=status, detail=detail,
                                             label_budget=r.label_budget(cid), is_new=r.is_new(cid)))

    def unserved(self, method: str, clients: Iterable[Client], rnd: int, why: str) -> None:
        """Clients the method cannot serve (e.g. a new client without labels for a method that fits on labels):
        an `unserved` result that says why, never a silent fallback."""
        for c in clients:
            self.result(method, c.client_id, rnd, status="unserved", detail=why)

    def labelled(self, method: str, clients: Iterable[Client], rnd: int, why: str) -> list[Client]:
        """The clients holding at least one labelled image; the others are `unserved` by `method` (why)."""
        out = []
        for c in clients:
            if self.roster.labels(c.client_id):
                out.append(c)
            else:
                self.unserved(method, [c], rnd, why)
        return out

    def usable(self, nodes: Iterable[int], methods: Iterable[str], rnd: int) -> list[Client]:
        """Clients whose description the server can serve; the others get an `error` ClientResult per method (a
        node whose `describe` failed, a `failed` one)."""
        out = []
        for node in nodes:
            c = self.roster.clients.get(node)
            if c is None:
                why = self.roster.failed.get(node)
                for m in methods if why is not None else ():
                    self.result(m, self.roster.client_id(node), rnd, status="failed", detail=why)
                continue
            if c.error:
                for m in methods:
                    self.result(m, c.client_id, rnd, status="error", detail=c.error)
                continue
            out.append(c)
        return out

    def score(self, replies: dict[int, Message], method: str, rnd: int, key: str = "metrics") -> None:
        for node, rep in replies.items():
            m = rep.content[key]
            self.result(method, self.roster.client_id(node), rnd, float(m["acc"]), int(m["num-examples"]))

    # ---------------------------------------------------------------- phase profiles
    def server_record(self, method: str, rnd: int, phase: str, timer: PhaseTimer, *, cid: int = -1,
                      acc: float | None = None, status: str = "ok", detail: str = "") -> None:
        self.out.server_records.append(timer.record(method, rnd, cid, phase, acc=acc, status=status, detail=detail))

    def collect(self, replies: dict[int, Message | None], failure: Callable[[int, Message | None], tuple[str, str]],
                validate: Callable[[int, int, RecordDict], Checked], method: str, rnd: int, phase: str, *,
                fail: Iterable[str] = (), sent_down: dict[int, int] | None = None, up_key: str | None = None,
                into: list[PhaseRecord] | None = None, received_as: str | None = None,
                failed: dict[int, str] | None = None) -> dict[int, Message]:
        """Good replies by node. A missing reply (timeout), an error reply, or one that `validate` (node, client id,
        content; fedtina.server.replies) refuses gives a `failed` phase record (status and detail from `failure`,
        or the refusal) and a `failed` ClientResult for each method in `fail`. Client profiles get the
        server-measured bytes: `bytes_recv` = arrays sent down to the client, `bytes_sent` = arrays it uploaded
        (`up_key`). A reply that also evaluated what it received (`prof_received`) gets that evaluate phase filed
        under `received_as`; both phases show the bytes that came down (each method's row says what it needed
        sent). `failed` collects why each failed node failed."""
        into = self.out.records if into is None else into
        ok: dict[int, Message] = {}
        for node, rep in replies.items():
            cid = self.roster.client_id(node)
            down = (sent_down or {}).get(node, 0)
            checked, status, detail, where = None, "failed", "", ""
            if rep is None or rep.has_error():
                status, detail = failure(node, rep)
                where = "" if rep is None else " (traceback in the log file)"
            else:
                try:
                    checked = validate(node, cid, rep.content)
                except BadReply as e:
                    detail = f"bad reply: {e}"
                cid = self.roster.client_id(node)   # a deployment's describe: the id it claimed, if accepted
            if checked is None:
                log.warning("[%s] round %d: client %d %s in %s: %s%s", method, rnd, cid,
                            "did not start" if status == "not_started" else "failed", phase, detail, where)
                into.append(PhaseRecord(method, rnd, cid, phase, bytes_recv=down, status=status, detail=detail))
                if failed is not None:
                    failed[node] = f"{phase}: {detail}"
                for m in fail:
                    self.result(m, cid, rnd, status=status, detail=f"{phase}: {detail}")
                continue
            up = rep.content[up_key].count_bytes() if up_key and up_key in rep.content.array_records else 0
            if received_as and "prof_received" in checked.profiles:
                into.append(replace(checked.profiles["prof_received"], method=received_as, client_id=cid,
                                    round=rnd, phase="evaluate", bytes_recv=down))
            if "prof" in checked.profiles:
                into.append(replace(checked.profiles["prof"], method=method, client_id=cid, round=rnd, phase=phase,
                                    bytes_recv=down, bytes_sent=up))
            ok[node] = rep
        return ok

    # ---------------------------------------------------------------- per-round lines
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
        return f"{len(accs)} clients, acc {mean_std(accs)}{extra}"


def write_server_phases(path: Path, records: list[PhaseRecord]) -> Path:
    names = [f.name for f in fields(PhaseRecord)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows([getattr(r, k) for k in names] for r in records)
    return path


def server_summary(records: list[PhaseRecord]) -> dict[str, dict[str, float]]:
    """Server-side wall seconds per method and phase (sums), e.g. {"<method>": {"generate": 1.2, "refresh": 8.0}}."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        if r.method != "describe":  # the describe records are the clients' own profiles
            per = out.setdefault(r.method, {})
            per[r.phase] = round(per.get(r.phase, 0.0) + r.wall_s, 4)
    return out
