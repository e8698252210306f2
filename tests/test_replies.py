"""Every reply is untrusted input (fedtina.server.replies): one check per message type, where replies enter the
engine, so one hostile client fails alone. Fast tests of the checks, the ledger and the roster on hand-made replies;
then, through the real Flower simulation on Ray, a stand-in ClientApp (tests/hostile_app.py) whose clients send
malformed replies of every kind to every default method and FedPer, and a method stopped by a full disk."""

from __future__ import annotations

import errno
import json
import re
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtina.data.partition import ClientSpec, Partition, PartitionConfig
from fedtina.report.loggers import RunLoggers
from fedtina.report.profiling import PhaseRecord, from_reply, to_config
from fedtina.runtime.spec import head_record
from fedtina.server.ledger import Ledger
from fedtina.server.replies import (BadReply, Description, Expect, Holds, check, description, profiles,
                                    specs)
from fedtina.server.roster import Roster
from fedtina.zoo.heads import Head
from simkit import by_client as _by_client, compose as _compose, summary as _summary

CLASSES = ["circle", "square", "star", "arrow"]
D = 6


def _partition(n: int = 3) -> Partition:
    clients = [ClientSpec(i, (0, 1), ("circle", "square"), np.arange(5), np.arange(4), False, "circle, square")
               for i in range(n)]
    return Partition(clients, np.arange(2), PartitionConfig())


def _prof(**kw) -> ConfigRecord:
    return ConfigRecord(to_config(replace(PhaseRecord("m", 1, 0, "evaluate", wall_s=0.1, cpu_s=0.1,
                                                      peak_mem_mb=10.0, acc=0.5), **kw)))


def _score(acc=0.5, n=4, **extra) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"acc": acc, "num-examples": n}), "prof": _prof(), **extra})


def _head(k: int = 2, d: int = D) -> Head:
    return Head(tuple(CLASSES[:k]), np.ones((k, d), np.float32), np.zeros(k, np.float32))


HOLDS = Holds(train=5, test=4)


# ---------------------------------------------------------------------------------------------------------------
# the checks, one message type at a time


def test_a_score_is_a_finite_accuracy_on_at_most_the_test_images_the_partition_gives():
    check(_score(), Expect(), HOLDS)
    check(_score(acc=1, n=0), Expect(), HOLDS)
    check(_score(n=4.0), Expect(), HOLDS)   # Flower's MetricRecord may carry a count as a float
    for bad, why in [(_score(acc=1e9, n=int(1e9)), "metrics.acc=1000000000.0"),
                     (_score(acc=float("nan")), "metrics.acc=nan"), (_score(acc=-0.1), "metrics.acc=-0.1"),
                     (_score(n=5), "metrics.num-examples=5: must be an integer in [0, 4]"),
                     (_score(n=-1), "num-examples=-1"), (_score(n=2.5), "num-examples=2.5"),
                     (RecordDict({"prof": _prof()}), "no MetricRecord 'metrics'"),
                     (RecordDict({"metrics": MetricRecord({"acc": 0.5})}), "holds ['acc']"),
                     (_score(extra=ConfigRecord({"x": 1})), "unexpected record(s) ['extra']")]:
        with pytest.raises(BadReply, match=re.escape(why)):
            check(bad, Expect(), HOLDS)
    # a fine-tune that also scored the head it received must send both scores
    with pytest.raises(BadReply, match="no MetricRecord 'received'"):
        check(_score(), Expect(scores=("metrics", "received")), HOLDS)


def test_a_profile_is_the_clients_measures_and_the_server_says_whose_it_is():
    rec = from_reply(dict(_prof(client_id=0, method="lies", detail="x" * 5000)), "tina", 2, 7, "finetune")
    assert (rec.method, rec.round, rec.client_id, rec.phase, rec.acc) == ("tina", 2, 7, "finetune", 0.5)
    assert len(rec.detail) == 300 and rec.status == "ok"
    # the reply that failed `tina` for everyone: a profile without the PhaseRecord's fields
    with pytest.raises(BadReply, match="prof: profile field wall_s=None"):
        check(_score(prof=ConfigRecord({"junk": 1})), Expect(), HOLDS)
    for field, value in [("cpu_s", -1.0), ("wall_s", float("inf")), ("acc", 2.0), ("detail", 3)]:
        with pytest.raises(BadReply, match=f"profile field {field}"):
            check(_score(prof=ConfigRecord({**dict(_prof()), field: value})), Expect(), HOLDS)
    assert check(_score(), Expect(), HOLDS).profiles["prof"].wall_s == pytest.approx(0.1)


def _update(arrays: dict[str, np.ndarray], n: int = 5) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": n}), "prof": _prof()})


UPDATE = Expect(scores=(), upload="arrays", required=True, weight="metrics", finite=True)


def test_an_update_is_the_arrays_it_was_sent_finite_and_weighed_by_its_training_images():
    sent = {"weight": np.zeros((82, 64), np.float32), "bias": np.zeros(82, np.float32)}
    want = specs(ArrayRecord({k: Array(v) for k, v in sent.items()}))
    check(_update(sent), UPDATE, HOLDS, want)
    for bad, why in [
            (_update({**sent, "weight": np.zeros(7, np.float32)}), r"arrays.weight is float32\[7\]"),  # the issue's
            (_update({**sent, "weight": np.zeros((82, 64))}), r"arrays.weight is float64\[82, 64\]"),
            (_update({"weight": sent["weight"]}), r"arrays holds arrays \['weight'\]"),
            (_update({**sent, "bias": np.full(82, np.nan, np.float32)}), "arrays.bias holds non-finite"),
            (_update(sent, n=int(1e9)), r"metrics.num-examples=1000000000: must be an integer in \[0, 5\]"),
            (RecordDict({"metrics": MetricRecord({"num-examples": 5})}), "no ArrayRecord 'arrays'")]:
        with pytest.raises(BadReply, match=why):
            check(bad, UPDATE, HOLDS, want)
    # a method that keeps some arrays local (BodyOnly: the head) gets the others back
    body = Expect(scores=(), upload="arrays", required=True, keep=("bias",), weight="metrics")
    check(_update({"weight": sent["weight"]}), body, HOLDS, want)


def test_an_uploaded_head_is_sized_from_its_metadata_before_anything_is_decoded(monkeypatch):
    sent = specs(head_record(_head()))
    finetune = Expect(upload="head")
    check(_score(), finetune, HOLDS, sent)                                   # no upload: allowed
    check(_score(head=head_record(_head())), finetune, HOLDS, sent)
    nan = _head()
    nan.weight[0, 0] = np.nan
    check(_score(head=head_record(nan)), finetune, HOLDS, sent)              # its values are the gate's to judge
    huge = head_record(_head(k=2, d=D * 100_000))                             # 4.8 MB where 48 bytes are expected

    def no_decoding(self):
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(Array, "numpy", no_decoding)
    with pytest.raises(BadReply, match=r"head.weight is float32\[2, 600000\] in 4800128 bytes, expected "
                                       r"float32\[2, 6\]"):
        check(_score(head=huge), finetune, HOLDS, sent)
    # metadata that lies about the payload: the payload's size is checked too
    liar = head_record(_head(k=2, d=D * 100_000))
    liar["weight"].shape = [2, D]
    with pytest.raises(BadReply, match=r"head.weight is float32\[2, 6\] in 4800128 bytes"):
        check(_score(head=liar), finetune, HOLDS, sent)


def test_a_description_is_bounded_text_and_image_prompts_of_the_feature_size():
    ok = description(RecordDict({"desc": ConfigRecord({"text": "circle, square", "client_id": 1})}), 100, 4, D)
    assert (ok.text, ok.client_id, ok.shots) == ("circle, square", 1, None)
    shots = ArrayRecord({"mean": Array(np.zeros((2, D), np.float32)), "count": Array(np.ones(2, np.int64))})
    got = description(RecordDict({"desc": ConfigRecord({"text": "a"}), "shots": shots}), 100, 4, D)
    assert got.shots[0].shape == (2, D)
    for content, why in [
            (RecordDict({"desc": ConfigRecord({"text": 3})}), "desc.text is a int, not text"),
            (RecordDict({"desc": ConfigRecord({"text": "x" * 101})}), "desc.text has 101 characters"),
            (RecordDict({"prof": _prof()}), "no ConfigRecord 'desc'"),
            (RecordDict({"desc": ConfigRecord({"text": "a"}), "shots": ArrayRecord({
                "mean": Array(np.zeros((2, D + 1), np.float32)), "count": Array(np.ones(2, np.int64))})}),
             r"shots.mean is float32\[2, 7\]"),
            (RecordDict({"desc": ConfigRecord({"text": "a"}), "shots": ArrayRecord({
                "mean": Array(np.zeros((50, D), np.float32)), "count": Array(np.ones(50, np.int64))})}),
             r"0 < k <= 4")]:
        with pytest.raises(BadReply, match=why):
            description(content, 100, 4, D)


# ---------------------------------------------------------------------------------------------------------------
# identity: the engine's, never the client's word


def test_a_client_is_the_partition_the_engine_gave_its_node_whatever_it_says():
    roster = Roster(_partition(), CLASSES, D, identity={101: 0, 102: 1, 103: 2})
    roster.nodes = [101, 102, 103]
    roster.add(101, Description("circle, square", 0, None))
    liar = roster.add(102, Description("circle, square", 0, None))           # holds partition 1, says 0
    abc = roster.add(103, Description("circle, square", "abc", None))
    assert (liar.client_id, abc.client_id) == (1, 2)
    assert [roster.client_id(n) for n in roster.nodes] == [0, 1, 2]


def test_without_the_engines_map_a_claimed_id_must_be_a_free_partition_id():
    roster = Roster(_partition(), CLASSES, D)   # a deployment: the ServerApp did not start the nodes
    assert roster.add(101, Description("circle, square", 0, None)).client_id == 0
    for node, claim, why in [(102, 0, "claimed by another node"), (103, "abc", "desc.client_id='abc'"),
                             (104, 3, r"not a partition id in \[0, 3\)"), (105, True, "desc.client_id=True")]:
        with pytest.raises(BadReply, match=why):
            roster.add(node, Description("circle, square", claim, None))
    assert roster.add(102, Description("circle, square", 1, None)).client_id == 1


def test_the_engine_publishes_its_node_partition_map_to_the_running_spec(tmp_path):
    from flwr.server.superlink.fleet.vce import vce_api

    from fedtina.runtime import node_partitions
    from fedtina.runtime.spec import RunSpec, set_run_spec

    class State:
        def __init__(self):
            self.ids = iter([907, 311, 555])

        def create_node(self, *args, **kwargs):
            return next(self.ids)

        def acknowledge_node_heartbeat(self, **kwargs):
            pass

    class Factory:
        state_ = State()

        def state(self):
            return self.state_

    node_partitions.install()
    spec = RunSpec(str(tmp_path), "", "", "", "", 3, 1, ["selection"], node_partitions={})
    set_run_spec(spec)
    try:
        mapping = vce_api._register_nodes(num_nodes=3, state_factory=Factory())
    finally:
        set_run_spec(None)
    assert mapping == spec.node_partitions == {907: 0, 311: 1, 555: 2}


# ---------------------------------------------------------------------------------------------------------------
# the ledger: a bad reply fails its client alone


def _reply(node: int, content: RecordDict) -> Message:
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="evaluate.head"))


def test_one_bad_reply_fails_its_client_alone_with_the_reason(task_identity, tmp_path):
    roster = Roster(_partition(), CLASSES, D, identity={101: 0, 102: 1, 103: 2})
    roster.nodes = [101, 102, 103]
    ledger = Ledger(roster, RunLoggers([], tmp_path))
    replies = {101: _reply(101, _score(acc=0.75)), 102: _reply(102, RecordDict({"prof": _prof()})),
               103: _reply(103, _score(acc=1e9, n=int(1e9)))}

    def validate(node, cid, content):
        return check(content, Expect(), roster.holds(cid))

    ok = ledger.collect(replies, lambda n, r: ("failed", "?"), validate, "selection", 1, "evaluate",
                        fail=["selection"])
    ledger.score(ok, "selection", 1)
    rows = {r.client_id: r for r in ledger.out.results}
    assert list(ok) == [101] and rows[0].status == "ok" and rows[0].acc == 0.75 and rows[0].num_examples == 4
    assert rows[1].status == "failed" and rows[1].detail == "evaluate: bad reply: no MetricRecord 'metrics' in " \
                                                            "the reply"
    assert rows[2].status == "failed" and "metrics.acc=1000000000.0" in rows[2].detail
    recs = {r.client_id: r for r in ledger.out.records}
    assert recs[0].status == "ok" and recs[0].method == "selection" and recs[2].status == "failed"


def test_a_node_whose_describe_failed_gets_a_failed_row_in_every_method(tmp_path):
    roster = Roster(_partition(), CLASSES, D, identity={101: 0, 102: 1})
    roster.nodes = [101, 102]
    roster.add(101, Description("circle, square", 0, None))
    roster.failed[102] = "describe: bad reply: desc.text is a int, not text"
    ledger = Ledger(roster, RunLoggers([], tmp_path))
    assert [c.client_id for c in ledger.usable(roster.nodes, ["tina", "tina_ft"], 1)] == [0]
    assert [(r.method, r.client_id, r.status, r.detail) for r in ledger.out.results] == [
        ("tina", 1, "failed", "describe: bad reply: desc.text is a int, not text"),
        ("tina_ft", 1, "failed", "describe: bad reply: desc.text is a int, not text")]


# ---------------------------------------------------------------------------------------------------------------
# a full disk stops the run resumable


def test_an_error_of_the_machine_is_found_behind_what_it_was_raised_from():
    from fedtina.errors import FedtinaError
    from fedtina.server.loop import machine_error

    full = OSError(errno.ENOSPC, "No space left on device")
    assert machine_error(full) is full
    try:
        try:
            raise full
        except OSError as e:
            raise FedtinaError("zoo append failed") from e
    except FedtinaError as wrapped:
        assert machine_error(wrapped) is full
    assert machine_error(FileNotFoundError(errno.ENOENT, "no such file")) is None
    assert machine_error(ValueError("a method's own bug")) is None


def test_the_exit_status_says_how_a_run_ended():
    from fedtina.server.ledger import Outcome
    from fedtina.simulate import exit_status

    assert exit_status(Outcome()) == 0
    assert exit_status(Outcome(interrupted="SIGINT received")) == 130
    assert exit_status(Outcome(failed="[tina] OSError: [Errno 28] No space left on device")) == 1


# ---------------------------------------------------------------------------------------------------------------
# through Ray


HOSTILE = {1: "liar", 2: "no_metrics", 3: "numbers", 4: "profile", 5: "shape", 6: "abc"}
HONEST = (0, 1, 6)   # the liar and `abc` only lie about who they are: the engine knows
METHODS = ("tina", "tina_ft", "selection", "local_ft", "fedavg", "fedavg_ft", "fedper")


def _run(tiny, out, *overrides, plan=None):
    from fedtina.simulate import run

    cache, assets = tiny
    cfg = _compose(cache, "clients=7", "rounds=1", "partition.new_share=0", "checks.max_acc_drop=1.0",
                   "method.names=[tina,selection,local_ft,fedavg,fedavg_ft,fedper]",
                   "head_ft.select=false",   # honest clients move their heads: their uploads reach the zoo
                   *overrides)
    out.mkdir(parents=True)
    if plan:
        (out / "hostile.json").write_text(json.dumps(plan))
    return run(cfg, out, assets=assets)


@pytest.mark.slow
def test_hostile_clients_fail_alone_and_the_others_get_what_they_get_without_them(tiny, tmp_path, monkeypatch):
    from fedtina.runtime import launch

    bad = sorted(c for c in HOSTILE if c not in HONEST)
    _run(tiny, tmp_path / "clean", f"faults.crash_clients={bad}")
    monkeypatch.setitem(launch.APPS, "clientapp", "hostile_app:app")
    outcome = _run(tiny, tmp_path / "hostile", plan={str(c): k for c, k in HOSTILE.items()})
    clean, hostile = _summary(tmp_path / "clean"), _summary(tmp_path / "hostile")
    assert all(s == "ok" for s in hostile["summary"]["method_status"].values()), hostile["summary"]
    for m in METHODS:
        want, got = _by_client(clean, m), _by_client(hostile, m)
        assert sorted(got) == list(range(7)), (m, sorted(got))   # one row per client, none twice
        for c in HONEST + (0,):
            assert (got[c]["status"], got[c]["acc"]) == (want[c]["status"], want[c]["acc"]), (m, c, got[c])
        for c, why in [(2, "no MetricRecord 'metrics'"), (3, "acc=1000000000.0"), (4, "profile field")]:
            assert got[c]["status"] == "failed" and why in got[c]["detail"], (m, c, got[c])
    # the wrong-shaped update and upload: refused, never averaged nor put in the zoo; its scores stand
    shape = [r for r in outcome.records if r.client_id == 5 and r.status == "failed"]
    assert {(r.method, r.phase) for r in shape} >= {("fedavg", "train"), ("fedper", "train"),
                                                   ("tina_ft", "finetune")}, shape
    assert all("is float32[7]" in r.detail for r in shape), shape
    assert _by_client(hostile, "selection")[5]["status"] == "ok"
    assert not any(r.client_id == 5 for r in outcome.results if r.method == "tina_ft" and r.upload == "accepted")
    # the numbers never reach the report nor the zoo
    from fedtina.zoo.store import ZooStore

    accs = [e.metrics["acc"] for e in ZooStore(tmp_path / "hostile" / "zoo").entries()
            if e.source.startswith("client:")]
    assert accs and all(0 <= a <= 1 for a in accs)
    means = [v["acc_mean"] for v in hostile["summary"]["methods"].values()]
    assert len(means) == len(METHODS) and all(0 <= a <= 1 for a in means), means


@pytest.mark.slow
def test_a_full_disk_stops_the_run_resumable_and_resume_finishes_it(tiny, tmp_path, monkeypatch):
    from fedtina.methods import REGISTRY
    from fedtina.runtime.rundir import RunDir, find_resumable
    from fedtina.simulate import exit_status, run

    def full_disk(fed, state):
        raise OSError(errno.ENOSPC, "No space left on device")

    honest = REGISTRY["local_ft"]
    monkeypatch.setitem(REGISTRY, "local_ft", replace(honest, run=full_disk))
    cache, assets = tiny
    out = tmp_path / "run"
    cfg = _compose(cache, "clients=3", "rounds=1", "method.names=[selection,local_ft]")
    outcome = run(cfg, out, assets=assets)
    status = RunDir(out).status()
    assert exit_status(outcome) == 1 and "No space left on device" in outcome.failed
    assert status["state"] == "failed" and "[local_ft] OSError" in status["detail"], status
    assert json.loads((out / "checkpoint.json").read_text())["progress"]["done"] == ["selection"]
    assert find_resumable(str(out), tmp_path).path == out   # resumable, not `done`

    monkeypatch.setitem(REGISTRY, "local_ft", honest)   # space again
    outcome = run(None, out, assets=assets, resume=True)
    assert exit_status(outcome) == 0 and RunDir(out).status()["state"] == "done"
    assert _summary(out)["summary"]["method_status"] == {"selection": "ok", "local_ft": "ok"}
