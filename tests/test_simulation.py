"""The federation end to end, through the real Flower simulation engine on Ray (`fedtina.simulate.run`, the code
behind `python -m fedtina.simulate`), on tiny assets built once per module in a temporary cache.

Two simulations (one Ray start each): a clean comparison of every default method, and one run with every injected
fault at once (a crashing client, a poisoned upload, an unknown class in a description). The rest is fast unit tests
of the glue (backend config, RunSpec, logging filters) without Ray.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from fedtina.errors import FedtinaError
from fedtina.federation import launch
from fedtina.federation.runtime import RunSpec, get_run_spec, set_run_spec, spec_from_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Small everything: 82 shape classes x 16 images, a 1-epoch narrow ResNet-20, 40 zoo heads, a 2-block Tina.
TINY = [
    "dataset.images_per_class=16",
    "backbone.width=8", "backbone.epochs=1", "backbone.batch_size=64", "backbone.device=cpu",
    "zoo.num_tasks=40", "zoo.k_min=5", "zoo.k_max=8", "zoo.finetune.steps=20",
    "tina.d_model=64", "tina.depth=2", "tina.num_heads=4", "tina.train_steps=200", "tina.batch_size=32",
    "tina.warmup_steps=20", "tina.sample_steps=8", "tina.log_every=1000", "tina.device=cpu",
    "encoder.device=cpu",
    "partition.k_min=3", "partition.k_max=5", "partition.unseen_per_client=1",
    "head_ft.steps=10", "timeout_s=60", "node_wait_s=180",
]


def _compose(cache: Path, *overrides: str, tiny: bool = True):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("simulate", overrides=[*(TINY if tiny else []), f"cache_dir={cache}", *overrides])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cache dir, assets): the core pipeline run once; later builds with the same config load from the cache."""
    from fedtina.assets import build_assets
    from fedtina.config import CoreConfig, from_dict
    from fedtina.simulate import CORE_KEYS, _plain

    cache = tmp_path_factory.mktemp("cache")
    plain = _plain(_compose(cache))
    assets = build_assets(from_dict(CoreConfig, {k: plain[k] for k in CORE_KEYS if k in plain}), log=lambda _m: None)
    return cache, assets


def _summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


def _by_client(doc: dict, method: str) -> dict[int, dict]:
    """The latest result per client of one method, from summary.json's per-client records."""
    out: dict[int, dict] = {}
    for r in doc["clients"]:
        if r["method"] == method and (r["client_id"] not in out or r["round"] >= out[r["client_id"]]["round"]):
            out[r["client_id"]] = r
    return out


# ----------------------------------------------------------------------------------------------------------------
# through Ray


@pytest.mark.slow
def test_compare_every_method_on_the_same_clients(tiny, tmp_path):
    from fedtina.simulate import run
    from fedtina.tina.train import load_checkpoint
    from fedtina.zoo import ZooStore

    cache, assets = tiny
    cached_zoo = len(ZooStore(assets.zoo_dir))
    cfg = _compose(cache, "clients=4", "rounds=2", "method=compare", "method.refresh_every=2",
                   "method.refresh_steps=5", "checks.max_acc_drop=1.0")
    out = tmp_path / "run"
    outcome = run(cfg, out)  # assets from the cache, as `python -m fedtina.simulate` does

    doc = _summary(out)
    methods = doc["summary"]["methods"]
    for m in ("tina", "tina_ft", "selection", "local_ft", "fedavg", "fedavg_ft"):
        assert m in methods, f"{m} missing from summary.json: {sorted(methods)}"
        per = _by_client(doc, m)
        assert sorted(per) == [0, 1, 2, 3], (m, per)
        for r in per.values():
            assert r["status"] == "ok", r
            assert 0.0 <= r["acc"] <= 1.0 and r["num_examples"] > 0, r
        assert methods[m]["n_ok"] == 4 and 0.0 <= methods[m]["acc_mean"] <= 1.0
    assert methods["fedavg"]["rounds"] == 2
    assert {r["round"] for r in doc["clients"] if r["method"] == "fedavg"} == {1, 2}
    assert {r["round"] for r in doc["clients"] if r["method"] == "tina"} == {1, 2}   # two cohorts

    # client profiles came back through the replies, with the bytes the server counted
    phases = {(p["method"], p["phase"]) for p in doc["phases"]}
    assert {("tina", "evaluate"), ("tina_ft", "finetune"), ("fedavg", "train"), ("fedavg", "evaluate")} <= phases
    assert all(p["bytes_recv"] > 0 for p in doc["phases"] if p["phase"] in ("evaluate", "finetune", "train"))
    assert all(p["bytes_sent"] > 0 for p in doc["phases"] if p["method"] == "tina_ft")

    # the run's zoo grew by the accepted uploads, Tina was refreshed and saved; the cached zoo is untouched
    growth = doc["zoo_growth"]
    accepted = sum(g["accepted"] for g in growth)
    assert accepted >= 2 and len(ZooStore(out / "zoo")) == cached_zoo + accepted == growth[-1]["zoo_size_after"]
    assert growth[0]["zoo_size"] == cached_zoo  # the zoo Tina served the first cohort from
    assert len(ZooStore(assets.zoo_dir)) == cached_zoo
    assert {e.source for e in ZooStore(out / "zoo").entries()} >= {"client:0", "client:1"}
    assert load_checkpoint(out / "tina" / "tina.safetensors", assets.encoder).generate([["red solid circle"]])
    with open(out / "server_phases.csv") as f:
        assert "refresh" in {row["phase"] for row in csv.DictReader(f)}

    for name in ("clients.csv", "phases.csv", "comparison.csv", "acc_by_method.png", "partition.json",
                 "features.npy", "run_spec.json"):
        assert (out / name).exists(), name
    assert not (out / "images.npy").exists()  # only for fedavg_full
    assert outcome.summary["methods"].keys() == methods.keys()
    assert get_run_spec() is None


@pytest.mark.slow
def test_faults_failed_refused_and_unknown_class_do_not_stop_the_run(tiny, tmp_path):
    from fedtina.simulate import run
    from fedtina.zoo import ZooStore

    cache, assets = tiny
    cached_zoo = len(ZooStore(assets.zoo_dir))
    cfg = _compose(cache, "clients=5", "rounds=1", "method.names=[tina,selection,fedavg]", "method.refresh_every=0",
                   "checks.max_acc_drop=1.0", "faults.crash_clients=[1]",
                   "faults.poison_clients=[2]", "faults.unknown_class_clients=[3]")
    out = tmp_path / "run"
    outcome = run(cfg, out, assets=assets)
    doc = _summary(out)

    # (b) the crashing client is recorded as failed in every method; the others are served
    for m in ("tina", "tina_ft", "selection", "fedavg"):
        per = _by_client(doc, m)
        assert per[1]["status"] == "failed" and "injected crash" in per[1]["detail"], (m, per[1])
        assert all(per[c]["status"] == "ok" and 0 <= per[c]["acc"] <= 1 for c in (0, 4)), (m, per)
    # FedAvg averaged the other clients' updates (it does not use descriptions)
    assert _by_client(doc, "fedavg")[3]["status"] == "ok"

    # (d) the unknown class is an error record for the methods that read descriptions, named in the detail
    for m in ("tina", "tina_ft", "selection"):
        r = _by_client(doc, m)[3]
        assert r["status"] == "error" and "unknown class 'no such class'" in r["detail"], r

    # (c) the poisoned upload was refused and never entered the zoo; the honest ones did
    checks = [r for r in outcome.server_records if r.phase == "check"]
    refused = [r for r in checks if r.status == "refused"]
    assert [r.client_id for r in refused] == [2] and "non-finite" in refused[0].detail
    assert _by_client(doc, "tina_ft")[2]["status"] == "ok"  # the client itself still got its fine-tuned head
    zoo = ZooStore(out / "zoo")
    sources = [e.source for e in zoo.entries()]
    assert "client:2" not in sources and {"client:0", "client:4"} <= set(sources)
    assert len(zoo) == cached_zoo + 2
    assert doc["zoo_growth"] == [{"round": 1, "zoo_size": cached_zoo, "zoo_size_after": cached_zoo + 2, "mean_acc": pytest.approx(
        np.mean([_by_client(doc, "tina")[c]["acc"] for c in (0, 2, 4)])), "std_acc": pytest.approx(
        np.std([_by_client(doc, "tina")[c]["acc"] for c in (0, 2, 4)])), "accepted": 2, "refused": 1}]


# ----------------------------------------------------------------------------------------------------------------
# the glue, without Ray


def test_backend_config_local_and_cluster():
    local = launch.backend_config({"num_cpus": 1, "num_gpus": 0.0, "init_num_cpus": 2, "object_store_mb": 512})
    assert local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert local["init_args"] == {"logging_level": "ERROR", "log_to_driver": False, "num_cpus": 2,
                                  "object_store_memory": 512 * 2**20}
    # joining a running cluster: num_cpus in init_args would make ray.init fail (and the ServerApp hang)
    cluster = launch.backend_config({"num_cpus": 1, "num_gpus": 0.0, "ray_address": "auto", "init_num_cpus": 2})
    assert cluster["init_args"] == {"logging_level": "ERROR", "log_to_driver": False, "address": "auto"}


def test_backend_config_gpu_share_needs_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FedtinaError, match="no CUDA device"):
        launch.backend_config({"num_cpus": 1, "num_gpus": 0.25})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch.backend_config({"num_cpus": 1, "num_gpus": 0.25})["client_resources"]["num_gpus"] == 0.25


def _spec(tmp_path: Path, **kw) -> RunSpec:
    base = dict(out_dir=str(tmp_path), features_path="f.npy", partition_path="p.json", zoo_dir="zoo",
                tina_path="t.safetensors", n_clients=3, rounds=2, methods=["tina", "fedavg"])
    return RunSpec(**{**base, **kw})


def test_run_spec_validation_and_roundtrip(tmp_path):
    with pytest.raises(FedtinaError, match="unknown method"):
        _spec(tmp_path, methods=["tina", "fedprox"])
    with pytest.raises(FedtinaError, match="images_path"):
        _spec(tmp_path, methods=["fedavg_full"])
    with pytest.raises(FedtinaError, match="clients >= 1"):
        _spec(tmp_path, n_clients=0)
    spec = _spec(tmp_path)
    spec.faults.crash_clients = [1]
    spec.assets = object()
    loaded = RunSpec.from_json(json.loads(spec.save().read_text()))
    assert loaded == spec and loaded.assets is None and loaded.faults.crash_clients == [1]
    set_run_spec(spec)
    try:
        assert get_run_spec() is spec
    finally:
        set_run_spec(None)


def test_server_app_without_a_spec_names_the_entry_point(tmp_path):
    with pytest.raises(FedtinaError, match="python -m fedtina.simulate"):
        spec_from_run_config({})
    with pytest.raises(FedtinaError, match="no run_spec.json"):
        spec_from_run_config({"run-dir": str(tmp_path)})


def test_flower_logging_filters():
    launch.quiet_flower()
    flwr_log = logging.getLogger("flwr")
    assert flwr_log.propagate is False

    def passes(flt, msg, level=logging.WARNING):
        return flt.filter(logging.LogRecord("flwr", level, __file__, 1, msg, None, None))

    once = launch._OnceFilter()
    banner = "DEPRECATED FEATURE: The `run_simulation` function is deprecated\n\n  more"
    assert passes(once, banner) and not passes(once, banner) and passes(once, "other line")
    tb = launch._client_tracebacks
    assert not passes(tb, "ray.exceptions.RayTaskError(ClientAppException): boom", logging.ERROR)
    assert not passes(tb, "An exception was raised when processing a message by RayBackend", logging.ERROR)
    assert passes(tb, "Simulation Runtime crashed", logging.ERROR)
    assert passes(tb, "ClientAppException as a warning", logging.WARNING)


def test_simulate_config_composes_as_documented(tmp_path):
    cfg = _compose(tmp_path, "clients=100", "rounds=5", "method=fedavg", "dataset=caltech101", "resources=gpu",
                   tiny=False)
    assert cfg.clients == 100 and cfg.rounds == 5 and list(cfg.method.names) == ["fedavg"]
    assert cfg.dataset.name == "caltech101" and cfg.resources.num_gpus == 0.25
    assert list(_compose(tmp_path).method.names) == ["tina", "selection", "local_ft", "fedavg", "fedavg_ft"]
    assert math.isclose(_compose(tmp_path).resources.num_gpus, 0.0)
    assert _compose(tmp_path, "partition=sentence").partition.description == "sentence"
