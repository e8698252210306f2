"""Flower's deployment runtime on loopback: a SuperLink and 3 SuperNodes as real processes, `flwr run` against them;
the per-client results equal the simulation's on the same clients and seeds. Every process is stopped, also when
the run fails."""

from __future__ import annotations

import os
import socket

import pytest
from simkit import compose, summary

from fedtina.errors import FedtinaError
from fedtina.runtime.deployment import Deployment, fresh_replay

METHODS = "method.names=[tina,selection,fedavg]"


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
    doc = replay(small, tmp_path / "replay_tls", tls=True, timeout_s=600)
    assert _accs(doc) == _accs(simulated) and len(_accs(doc)) == 3
    assert (tmp_path / "replay_tls" / "deployment" / "certs" / "ca.pem").exists()


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
