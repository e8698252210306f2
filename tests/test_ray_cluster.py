"""`resources.ray_address`: the federation on an existing Ray cluster of two nodes started on this machine (a head
and a second node, 1 CPU each, as `ray start --head` + `ray start --address=...` would). Skipped cleanly where Ray
cannot start a second node."""

from __future__ import annotations

import logging

import pytest
from simkit import by_client, compose, summary


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=60)
    except Exception as e:  # noqa: BLE001 - whatever stops Ray here, the test cannot run
        pytest.skip(f"Ray cannot start a second node on this machine: {type(e).__name__}: {e}")
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_the_federation_runs_on_a_two_node_ray_cluster(tiny, tmp_path, two_nodes, caplog):
    from fedtina.simulate import run

    caplog.set_level(logging.INFO, logger="fedtina.federation")
    cache, _ = tiny
    cfg = compose(cache, "clients=4", "rounds=1", "method.names=[selection,fedavg]",
                  f"resources.ray_address='{two_nodes.address}'")
    out = tmp_path / "run"
    run(cfg, out)
    doc = summary(out)
    for m in ("selection", "fedavg"):
        assert sorted(by_client(doc, m)) == [0, 1, 2, 3] and doc["summary"]["methods"][m]["n_ok"] == 4
    # 1 CPU per node and 1 per actor: a pool of 2 actors means one on each node
    assert f"[ray] 2 ClientApp actor(s) on 2 Ray node(s), joined {two_nodes.address}" in caplog.messages
