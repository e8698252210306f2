"""Run control without Ray: GuardedGrid's per-client timeouts and stop flag against a fake engine that, like
Flower's simulation engine, runs queued messages in order on a fixed pool of workers; the run dir's lock, status
marker, resume lookup and checkpoint (each method's state by name); unique Hydra run dirs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedtina.errors import FedtinaError
from fedtina.runtime.grid import GuardedGrid, Interrupted, StopFlag
from fedtina.runtime.rundir import RunDir, check_resume_overrides, find_resumable


@dataclass
class _Meta:
    dst_node_id: int = 0
    reply_to_message_id: str = ""


@dataclass
class _Msg:
    metadata: _Meta = field(default_factory=_Meta)


class FakeEngine:
    """`workers` threads take pushed messages in push order; node n's work takes `durations[n]` seconds."""

    def __init__(self, workers: int, durations: dict[int, float]) -> None:
        self.durations, self.queue, self.replies = durations, [], []
        self.cv = threading.Condition()
        self.n = 0
        for _ in range(workers):
            threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.queue:
                    self.cv.wait()
                mid, node = self.queue.pop(0)
            time.sleep(self.durations.get(node, 0.0))
            with self.cv:
                self.replies.append(_Msg(_Meta(node, mid)))

    def push_messages(self, msgs):
        ids = []
        with self.cv:
            for m in msgs:
                self.n += 1
                ids.append(f"m{self.n}")
                self.queue.append((ids[-1], m.metadata.dst_node_id))
            self.cv.notify_all()
        return ids

    def pull_messages(self, ids):
        want = set(ids)
        with self.cv:
            got = [r for r in self.replies if r.metadata.reply_to_message_id in want]
            self.replies = [r for r in self.replies if r not in got]
        return got


def _batch(nodes):
    return [_Msg(_Meta(n)) for n in nodes]


def test_healthy_clients_queued_behind_slow_ones_are_not_blamed():
    # 2 workers, clients 0 and 1 take 0.8 s, timeout 0.5 s: Flower's one deadline for the batch failed all six
    engine = FakeEngine(2, {0: 0.8, 1: 0.8})
    grid = GuardedGrid(engine, StopFlag(), concurrency=lambda: 2, poll_s=0.01)
    got = grid.exchange(_batch(range(6)), timeout=0.5)
    assert {n: d.status for n, d in got.items()} == {0: "timed_out", 1: "timed_out", 2: "ok", 3: "ok", 4: "ok",
                                                      5: "ok"}
    assert "timeout_s=0.5" in got[0].detail
    # their actors were busy until the late replies: the next batch queues behind nothing and is served
    again = grid.exchange(_batch([2, 3]), timeout=0.5)
    assert all(d.status == "ok" for d in again.values())


def test_one_deadline_without_the_queue_model_blames_queued_clients():
    """The same engine with the queue model off (unknown concurrency = every message starts when pushed): the
    queued clients time out, which is the defect the model fixes."""
    engine = FakeEngine(2, {0: 0.8, 1: 0.8})
    grid = GuardedGrid(engine, StopFlag(), concurrency=lambda: None, poll_s=0.01)
    got = grid.exchange(_batch(range(6)), timeout=0.5)
    assert sum(d.status == "timed_out" for d in got.values()) == 6


def test_messages_that_never_get_an_actor_are_reported_as_not_started():
    engine = FakeEngine(2, {0: 30.0, 1: 30.0})   # both workers stuck far beyond the timeout
    grid = GuardedGrid(engine, StopFlag(), concurrency=lambda: 2, poll_s=0.01)
    t0 = time.monotonic()
    got = grid.exchange(_batch(range(4)), timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert [got[n].status for n in range(4)] == ["timed_out", "timed_out", "not_started", "not_started"]
    assert got[2].detail.startswith("never started")


def test_a_stop_request_ends_a_wait_within_a_poll():
    engine = FakeEngine(1, {0: 30.0})
    stop = StopFlag()
    grid = GuardedGrid(engine, stop, concurrency=lambda: 1, poll_s=0.01)
    threading.Timer(0.2, stop.request, args=("SIGINT received",)).start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted, match="SIGINT received"):
        grid.exchange(_batch([0]), timeout=60)
    assert time.monotonic() - t0 < 2
    with pytest.raises(Interrupted):   # and every later send, before it pushes anything
        grid.exchange(_batch([1]), timeout=60)
    assert engine.n == 1


def test_send_and_receive_returns_only_timely_replies_for_flower_strategies():
    engine = FakeEngine(2, {1: 1.0})
    grid = GuardedGrid(engine, StopFlag(), concurrency=lambda: 2, poll_s=0.01)
    replies = grid.send_and_receive(_batch([0, 1, 2]), timeout=0.4)
    assert sorted(r.metadata.dst_node_id for r in replies) == [0, 2]
    assert grid.last[1].status == "timed_out"


# ----------------------------------------------------------------------------------------------------------------
# run dirs


def test_a_run_dir_is_held_by_one_process(tmp_path):
    first = RunDir(tmp_path)
    first.acquire()
    first.mark("running")
    code = ("import sys; from fedtina.runtime.rundir import RunDir\n"
            "try:\n    RunDir(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(e); sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode == 3 and "in use by another fedtina process" in other.stdout
    assert f"pid {os.getpid()}" in other.stdout
    assert RunDir(tmp_path).state() == "running"
    first.release()
    assert RunDir(tmp_path).state() == "killed"   # marked running, nobody holds it


def test_find_resumable(tmp_path):
    root = tmp_path / "runs"
    for name, state in (("a", "done"), ("b", "interrupted"), ("c", None)):
        rd = RunDir(root / name)
        rd.acquire()
        if state:
            rd.mark(state)
        rd.release()
    assert find_resumable("true", root).path == root / "b"
    with pytest.raises(FedtinaError, match="already finished"):
        find_resumable(str(root / "a"), root)
    with pytest.raises(FedtinaError, match="holds no fedtina run"):
        find_resumable(str(root / "c"), root)
    with pytest.raises(FedtinaError, match="no killed, interrupted or failed run"):
        find_resumable("true", tmp_path / "empty")


def test_resume_refuses_overrides_that_differ_from_the_run(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rd.save_config({"clients": 100, "method": {"names": ["tina"]}, "partition": {"seed": 0}})
    same = {"clients": 100, "method": {"names": ["tina"]}, "partition": {"seed": 0}, "resume": "x"}
    check_resume_overrides(rd, same, ["resume=x", "clients=100", "hydra.run.dir=y"])   # nothing differs
    other = {**same, "clients": 50, "method": {"names": ["tina", "fedavg"]}}
    with pytest.raises(FedtinaError) as err:
        check_resume_overrides(rd, other, ["resume=x", "clients=50", "method=compare", "partition.seed=0"])
    assert str(err.value) == ('resume continues the run with its own config; these overrides differ from it: '
                              'clients (this command: 50; the run: 100); method (this command: {"names": ["tina", '
                              '"fedavg"]}; the run: {"names": ["tina"]}). Drop them to resume, or start a new run')
    check_resume_overrides(RunDir(tmp_path / "none"), other, ["resume=x"])   # no override: the config is not read


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: the engine keeps each method's own resume state under its name


@dataclass
class _Cursor:
    round: int = 0
    scale: float | None = None


@dataclass
class _Head:
    head: list | None = None


@dataclass(frozen=True)
class _Played:
    name: str
    requires: tuple[str, ...] = ()


def test_a_checkpoint_hands_each_method_its_own_state_back(tmp_path):
    from fedtina.report.summary import ClientResult
    from fedtina.server.ledger import Outcome, Progress, load_checkpoint, save_checkpoint

    types = {"gen": _Cursor, "avg": _Head}
    prog = Progress.fresh(types)
    prog.states["gen"].round, prog.states["gen"].scale = 2, 0.5
    prog.done.append("avg")
    out = Outcome(results=[ClientResult("gen", 0, 2, 0.75, 10, False, "ok")], rounds={"gen": 3})
    assert load_checkpoint(tmp_path, types) is None
    save_checkpoint(tmp_path, out, prog)
    got_out, got = load_checkpoint(tmp_path, types)
    assert got == prog and isinstance(got.states["gen"], _Cursor) and got.states["avg"] == _Head()
    assert got_out.results == out.results and got_out.rounds == {"gen": 3}


def test_a_method_reads_its_own_state_and_those_of_the_methods_it_requires():
    from fedtina.server.ledger import Progress

    prog = Progress.fresh({"avg": _Head, "gen": _Cursor})
    prog.states["avg"].head = [1.0]
    assert prog.state(_Played("avg_ft", requires=("avg",)), "avg").head == [1.0]
    assert prog.state(_Played("gen"), "gen") is prog.states["gen"]
    with pytest.raises(FedtinaError, match="gen reads the state of method 'avg', which it does not require"):
        prog.state(_Played("gen"), "avg")
    with pytest.raises(FedtinaError, match="method 'plain' registered no state"):
        prog.state(_Played("plain"), "plain")


def test_a_checkpoint_of_another_layout_fails_to_resume_in_one_line(tmp_path):
    """A checkpoint of an older fedtina (Tina's cursor in the engine's progress) or one whose method states have
    other fields: one error line, no traceback, and the checkpoint is left as it was."""
    import json

    from fedtina.runtime.spec import RunSpec
    from fedtina.server.ledger import load_checkpoint

    run_dir = tmp_path / "run"
    rd = RunDir(run_dir)
    rd.acquire()
    rd.mark("interrupted")
    rd.release()
    rd.save_config({"resources": {}})
    RunSpec(out_dir=str(run_dir), features_path="f.npy", partition_path="p.json", zoo_dir="zoo",
            tina_path="t.safetensors", n_clients=3, rounds=2, methods=["tina", "fedavg"]).save()
    old = {"progress": {"done": ["selection"], "timings": {}, "tina_round": 1, "tina_pending": 0,
                        "tina_norm_scale": 1.0, "tina_zoo_size": 40, "tina_checkpoint": None, "fedavg_head": None},
           "zoo_growth": [], "rounds": {}, "method_status": {}, "results": [], "records": [], "server_records": []}
    (run_dir / "checkpoint.json").write_text(json.dumps(old))
    before = (run_dir / "checkpoint.json").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "fedtina.simulate", f"resume={run_dir}",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if "checkpoint of another fedtina version" in ln]
    assert len(errors) == 1 and "tina_round" in errors[0] and "start the run again in a new dir" in errors[0], out
    assert (run_dir / "checkpoint.json").read_bytes() == before

    old["progress"] = {"done": [], "timings": {}, "states": {"gen": {"round": 1, "cohort": 2}}}
    (run_dir / "checkpoint.json").write_text(json.dumps(old))
    with pytest.raises(FedtinaError, match=r"saved state of method gen \(\['cohort', 'round'\]\) does not match "
                                           r"its _Cursor"):
        load_checkpoint(run_dir, {"gen": _Cursor})


def test_hydra_run_dirs_carry_the_process_id():
    import fedtina.config  # noqa: F401 - registers the resolver

    text = (Path(__file__).resolve().parents[1] / "configs" / "simulate.yaml").read_text()
    assert "${now:%Y-%m-%d_%H-%M-%S}_${fedtina_pid:}" in text
    assert OmegaConf.create({"d": "x_${fedtina_pid:}"}).d == f"x_{os.getpid()}"
