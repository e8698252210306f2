"""Flower's deployment runtime on loopback: a SuperLink and 3 SuperNodes as real processes, `flwr run` against them;
the per-client results equal the simulation's on the same clients and seeds. Every process is stopped, also when
the run fails or the deploy is sent SIGTERM. With auth, a SuperNode without a registered key is refused, and the
ServerApp knows each client by the node its key gives it (the node -> partition map), never by what it claims."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from simkit import compose, summary

from fedtina.errors import FedtinaError
from fedtina.runtime.deployment import Deployment, fresh_replay, partition_map
from fedtina.runtime.spec import read_node_partitions, write_node_partitions

METHODS = "method.names=[tina,selection,fedavg]"
NO_MAP = "no node -> partition map from the engine"   # the ServerApp's warning when client ids are claimed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:   # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def _accs(doc: dict) -> dict[tuple[str, int, int], float]:
    return {(r["method"], r["client_id"], r["round"]): round(r["acc"], 6) for r in doc["clients"]
            if r["status"] == "ok"}


def _prepare(cache, assets, out, methods: str):
    """A 3-client, 1-round run dir prepared by fedtina.simulate, and the simulation's own results on the same config."""
    from fedtina.simulate import _plain, prepare, run

    cfg = compose(cache, "clients=3", "rounds=1", methods, "partition.new_share=0")
    prepare(_plain(cfg), out / "prepared", assets)
    run(cfg, out / "simulated")
    return out / "prepared", summary(out / "simulated")


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    cache, assets = tiny
    return _prepare(cache, assets, tmp_path_factory.mktemp("deploy"), METHODS)


@pytest.mark.slow
def test_deployment_runtime_gives_the_simulations_results(tiny, prepared, tmp_path):
    from fedtina.deploy import replay

    prepared_dir, simulated = prepared
    zoo_before = sorted(p.name for p in (prepared_dir / "zoo").iterdir())
    doc = replay(prepared_dir, tmp_path / "replay", timeout_s=600)
    assert _accs(doc) == _accs(simulated) and len(_accs(doc)) == 3 * 4   # tina, tina_ft, selection, fedavg
    assert sorted(p.name for p in (prepared_dir / "zoo").iterdir()) == zoo_before   # replays start from it
    logs = {p.name for p in (tmp_path / "replay" / "deployment").iterdir()}
    assert {"superlink.log", "supernode_0.log", "supernode_2.log", "flwr_run.log"} <= logs
    # with TLS (a selection-only run, to keep CI short): the results of its simulation
    cache, assets = tiny
    small, simulated = _prepare(cache, assets, tmp_path, "method.names=[selection]")
    doc = replay(small, tmp_path / "replay_tls", tls=True, auth=True, timeout_s=600)
    assert _accs(doc) == _accs(simulated) and len(_accs(doc)) == 3
    assert (tmp_path / "replay_tls" / "deployment" / "certs" / "ca.pem").exists()
    assert sorted(r["client_id"] for r in doc["clients"]) == [0, 1, 2]   # one row per partition
    # the ServerApp took the clients' ids from the keys' node -> partition map; the insecure run had none
    assert sorted(read_node_partitions(tmp_path / "replay_tls" / "deployment" / "node_partitions.json").values()) \
        == [0, 1, 2]
    assert NO_MAP not in (tmp_path / "replay_tls" / "deployment" / "flwr_run.log").read_text()
    assert NO_MAP in (tmp_path / "replay" / "deployment" / "flwr_run.log").read_text()


@pytest.mark.slow
def test_every_process_is_stopped_when_the_run_fails(prepared, tmp_path):
    prepared_dir, _ = prepared
    spec = fresh_replay(prepared_dir, tmp_path / "replay")
    (tmp_path / "replay" / "run_spec.json").write_text("{not json")   # the ServerApp will fail on it
    with Deployment(tmp_path / "replay" / "deployment", spec.n_clients) as d:
        pids = [p.pid for p in d.procs]
        res = d.run(tmp_path, tmp_path / "replay", timeout_s=300)   # not a Flower app: flwr run fails
        assert res.returncode != 0
        assert all(_alive(pid) for pid in pids)
    assert len(pids) == 4 and not any(_alive(pid) for pid in pids)


def test_a_superlink_that_refuses_is_named_at_once(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound, not listening: connections are refused
        with pytest.raises(FedtinaError, match=rf"superlink='127.0.0.1:{port}': nobody answers at 127.0.0.1:{port}"):
            with Deployment(tmp_path, 1, superlink=f"127.0.0.1:{port}"):
                pass
    with pytest.raises(FedtinaError, match="supernodes=0: need at least one SuperNode"):
        Deployment(tmp_path, 0)
    with pytest.raises(FedtinaError, match="replay dir .* exists already"):
        (tmp_path / "x").mkdir()
        fresh_replay(tmp_path, tmp_path / "x")


def _in_dir(work: Path) -> list[int]:
    """Live processes whose working dir is inside `work` (a Deployment's SuperLink, SuperNodes and the apps they
    start all run there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")).is_relative_to(work) and \
                    _alive(int(entry.name)):
                pids.append(int(entry.name))
        except OSError:   # gone meanwhile, or not ours to read
            continue
    return pids


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_stops_every_process_with_one_line(prepared, tmp_path):
    prepared_dir, _ = prepared
    out = tmp_path / "replay"
    proc = subprocess.Popen([sys.executable, "-m", "fedtina.deploy", f"run_dir={prepared_dir}", f"out={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        work = (out / "deployment").resolve()
        _wait_for(lambda: (work / "flwr_run.log").exists() or proc.poll() is not None, 120, "flwr run to start")
        started = _in_dir(work)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert len(started) >= 4, started   # the SuperLink and 3 SuperNodes at least
    assert proc.returncode == 143, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines == ["interrupted (SIGTERM): the SuperLink and SuperNodes were stopped"], text
    assert _in_dir(work) == [] and not any(_alive(pid) for pid in started)


def test_a_supernode_without_a_registered_key_is_refused(tmp_path):
    """SuperNode authentication (on by default in fedtina.deploy): a rogue SuperNode with an unknown key, or with
    none, is refused at once and never counted; every key file is readable by its owner only."""
    from fedtina.runtime.deployment import make_node_keys

    with Deployment(tmp_path / "d", 2, tls=True, auth=True) as d:
        (rogue_key, _), = make_node_keys(tmp_path / "rogue", 1)
        rogues = [d._spawn("rogue_key", ["flower-supernode", *d.node_args(rogue_key)])[0],
                  d._spawn("rogue_nokey", ["flower-supernode", *d.node_args()])[0]]
        _wait_for(lambda: all(r.poll() is not None for r in rogues), 60, "the rogue SuperNodes to be refused")
        assert [r.returncode for r in rogues] != [0, 0]
        assert "registered via the CLI" in (tmp_path / "d" / "rogue_nokey.log").read_text()
        nodes = json.loads(d.flwr("list", "supernode", "list", "--format", "json", "fedtina-local"))["nodes"]
        assert len(nodes) == 2
        keys = [*(tmp_path / "d" / "keys").glob("supernode_*"), tmp_path / "d" / "certs" / "server.key"]
        private = {p.name: oct(p.stat().st_mode & 0o777) for p in keys if p.suffix != ".pub"}
        assert private == {"supernode_0": "0o600", "supernode_1": "0o600", "server.key": "0o600"}
        # the node -> partition map: SuperNode i (partition-id=i) runs as the node the map gives partition i
        mapping = read_node_partitions(d.node_partitions)
        assert sorted(mapping) == sorted(int(n["node-id"]) for n in nodes) and sorted(mapping.values()) == [0, 1]
        logs = [tmp_path / "d" / f"supernode_{i}.log" for i in range(2)]
        _wait_for(lambda: all("SuperNode ID:" in log.read_text() for log in logs), 60, "the SuperNodes' ids")
        for i, log in enumerate(logs):
            node = int(log.read_text().split("SuperNode ID:")[1].split()[0])
            assert mapping[node] == i, (node, mapping)


def test_the_node_partition_map_comes_from_the_keys_registrations(tmp_path):
    """Key i's registration answer names the node of partition i; anything else in an answer is one error line,
    and so is a map file that is not one."""
    answers = ['{"success": true, "node-id": 907}', '{\n  "success": true,\n  "node-id": 18446744073709551000\n}']
    assert partition_map(answers) == {907: 0, 18446744073709551000: 1}
    for bad, why in [('{"success": false, "error-message": "key in use"}', "no node id for SuperNode 1"),
                     ("not json", "no node id for SuperNode 1"), ('{"success": true, "node-id": "3"}', "no node id"),
                     ('{"success": true, "node-id": 0}', "no node id"), ("[1]", "no node id"),
                     ('{"success": true, "node-id": 907}', "gave node 907 to SuperNodes 0 and 1")]:
        with pytest.raises(FedtinaError, match=why):
            partition_map([answers[0], bad])
    path = write_node_partitions(tmp_path / "m.json", {907: 0, 311: 2})
    assert read_node_partitions(path) == {907: 0, 311: 2}
    for text, why in [("[1, 2]", "not a node -> partition map"), ('{"x": 1}', "not a node -> partition map"),
                      ('{"5": 0, "6": 0}', "a partition twice"), ('{"5": -1}', r"\(5, -1\)"),
                      ('{"5": "0"}', r"\(5, '0'\)"), ('{"-5": 0}', r"\(-5, 0\)")]:
        path.write_text(text)
        with pytest.raises(FedtinaError, match=why):
            read_node_partitions(path)
    with pytest.raises(FedtinaError, match="No such file"):
        read_node_partitions(tmp_path / "missing.json")


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _roster(identity):
    import numpy as np

    from fedtina.data.partition import ClientSpec, Partition, PartitionConfig
    from fedtina.server.roster import Roster

    clients = [ClientSpec(i, (0, 1), ("circle", "square"), np.arange(5), np.arange(4), False, "circle, square")
               for i in range(3)]
    return Roster(Partition(clients, np.arange(2), PartitionConfig()), ["circle", "square"], 4, identity=identity)


def test_under_deployment_a_client_is_who_its_key_says_not_what_it_claims(tmp_path, caplog):
    """The ServerApp under `flwr run` with the deployment's map: each client's id is its node's partition whatever
    `desc.client_id` says; a node the map does not name is refused, never messaged; without a map (auth=false) the
    claims stand, with one warning."""
    from fedtina.runtime.spec import RunSpec, spec_from_run_config
    from fedtina.server.replies import Description
    from fedtina.server.transport import Transport

    spec = RunSpec(str(tmp_path), "", "", "", str(tmp_path / "no_tina.pt"), 3, 1, ["selection"], node_wait_s=5.0)
    spec.save()
    write_node_partitions(tmp_path / "nodes.json", {907: 0, 311: 1, 555: 2})
    with pytest.MonkeyPatch.context() as mp:   # the assets are not what this test is about
        mp.setattr("fedtina.assets.build_assets", lambda *a, **k: None)
        spec = spec_from_run_config({"run-dir": str(tmp_path), "node-partitions": str(tmp_path / "nodes.json")})
    assert spec.node_partitions == {907: 0, 311: 1, 555: 2}
    with caplog.at_level("WARNING", logger="fedtina.federation"):
        roster = _roster(spec.node_partitions)
    assert NO_MAP not in caplog.text
    transport = Transport(_Grid([555, 4242, 311, 907]), spec, order=roster.queue_position)   # 4242: a rogue
    ids = transport.wait_for_nodes(roster.identity)
    assert roster.seat(ids) == [4242] and roster.nodes == [311, 555, 907]
    for node, lie in [(907, 2), (311, 0), (555, 1)]:   # every client claims another's partition
        assert roster.add(node, Description("circle, square", lie, None)).client_id == roster.identity[node]
    assert [roster.client_id(n) for n in roster.old] == [0, 1, 2] and 4242 not in roster.old
    # without auth: no map, the claims are the ids (one warning), a rogue is seated like any node
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fedtina.assets.build_assets", lambda *a, **k: None)
        spec = spec_from_run_config({"run-dir": str(tmp_path), "node-partitions": ""})
    with caplog.at_level("WARNING", logger="fedtina.federation"):
        roster = _roster(spec.node_partitions)
    assert spec.node_partitions is None and caplog.text.count(NO_MAP) == 1
    assert roster.seat([907, 311]) == [] and roster.add(907, Description("circle, square", 2, None)).client_id == 2


def test_deploy_options_are_key_value_and_checked(tmp_path, capsys):
    from fedtina.deploy import main

    for argv, match in ([[str(tmp_path)], "arguments are key=value"], [["run_dir=x", "tls=maybe"], "tls='maybe' is "
                         "invalid: must be true or false"], [["run_dir=x", "port=3"], "unknown option 'port'"],
                        [[], "run_dir is required"], [[f"run_dir={tmp_path}", "tls=false"], "auth=true needs tls=true"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and match in err, (argv, err)
