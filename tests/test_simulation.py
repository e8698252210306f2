"""The federation end to end, through the real Flower simulation engine on Ray (`fedtina.simulate.run`, the code
behind `python -m fedtina.simulate`), on tiny assets built once per test session in a temporary cache (`tiny`, tests/conftest.py).

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

from fedtina.errors import FedtinaError
from fedtina.runtime import launch
from fedtina.runtime.spec import RunSpec, get_run_spec, set_run_spec, spec_from_run_config
from simkit import by_client as _by_client, compose as _compose, summary as _summary

# ----------------------------------------------------------------------------------------------------------------
# through Ray


@pytest.mark.slow
def test_compare_every_method_on_the_same_clients(tiny, tmp_path):
    from fedtina.simulate import run
    from fedtina.tina.train import load_checkpoint
    from fedtina.zoo.store import ZooStore

    cache, assets = tiny
    cached_zoo = len(ZooStore(assets.zoo_dir))
    cfg = _compose(cache, "clients=4", "rounds=2", "method=compare", "method.tina.refresh_every=2",
                   "method.tina.refresh_steps=5", "checks.max_acc_drop=1.0", "loggers=[tensorboard]",
                   "head_ft.select=false")   # clients always move their head: their uploads are not echoes
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
        # client 2 is the new one (partition.new_share=0.2): it arrived after the last round, served by every method
        assert [r["is_new"] for _, r in sorted(per.items())] == [False, False, True, False], (m, per)
        assert methods[m]["new_clients"]["n_ok"] == 1 and methods[m]["old_clients"]["n_ok"] == 3, m
    assert methods["fedavg"]["rounds"] == 2
    assert {r["round"] for r in doc["clients"] if r["method"] == "fedavg"} == {1, 2}
    assert {r["round"] for r in doc["clients"] if r["method"] == "tina"} == {1, 2}   # two cohorts

    # client profiles came back through the replies, with the bytes the server counted
    phases = {(p["method"], p["phase"]) for p in doc["phases"]}
    assert {("tina", "evaluate"), ("tina_ft", "finetune"), ("fedavg", "train"), ("fedavg", "evaluate")} <= phases
    assert all(p["bytes_recv"] > 0 for p in doc["phases"] if p["phase"] in ("evaluate", "finetune", "train"))
    uploads = {p["client_id"]: p["bytes_sent"] for p in doc["phases"] if p["method"] == "tina_ft"}
    assert all(uploads[c] > 0 for c in (0, 1, 3)) and uploads[2] == 0, uploads   # the new client uploads nothing

    # the run's zoo grew by the accepted uploads, Tina was refreshed and saved; the cached zoo is untouched
    growth = doc["zoo_growth"]
    accepted = sum(g["accepted"] for g in growth)
    assert accepted >= 2 and len(ZooStore(out / "zoo")) == cached_zoo + accepted == growth[-1]["zoo_size_after"]
    assert growth[0]["zoo_size"] == cached_zoo  # the zoo Tina served the first cohort from
    assert len(ZooStore(assets.zoo_dir)) == cached_zoo
    assert {e.source for e in ZooStore(out / "zoo").entries()} >= {"client:0", "client:1"}
    assert "client:2" not in {e.source for e in ZooStore(out / "zoo").entries()}   # new clients do not upload
    # FedAvg's curve: the old clients' mean after each of its rounds
    assert [p["round"] for p in methods["fedavg"]["curve"]] == [1, 2] and methods["fedavg"]["rounds_to_95"] in (1, 2)
    assert load_checkpoint(out / "tina" / "tina.safetensors", assets.encoder).generate([["red solid circle"]])
    with open(out / "server_phases.csv") as f:
        assert "refresh" in {row["phase"] for row in csv.DictReader(f)}

    for name in ("clients.csv", "phases.csv", "comparison.csv", "acc_by_method.png", "partition.json",
                 "features.npy", "run_spec.json"):
        assert (out / name).exists(), name
    assert not (out / "images.npy").exists()  # only for fedavg_full
    assert outcome.summary["methods"].keys() == methods.keys()
    assert get_run_spec() is None

    # loggers=[tensorboard]: every method's rounds as scalars, the old clients' means equal to the report's curve
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert {f"{m}/old_acc_mean" for m in ("tina", "selection", "local_ft", "fedavg", "fedavg_ft")} | {
        "tina/new_acc_mean", "fedavg/new_acc_mean"} <= set(tb.Tags()["scalars"])
    assert [(e.step, round(e.value, 6)) for e in tb.Scalars("fedavg/old_acc_mean")] == [
        (p["round"], round(p["acc_mean"], 6)) for p in methods["fedavg"]["curve"]]


@pytest.mark.slow
def test_faults_failed_refused_and_unknown_class_do_not_stop_the_run(tiny, tmp_path):
    from fedtina.simulate import run
    from fedtina.zoo.store import ZooStore

    cache, assets = tiny
    cached_zoo = len(ZooStore(assets.zoo_dir))
    cfg = _compose(cache, "clients=5", "rounds=1", "method.names=[tina,selection,fedavg]",
                   "method.tina.refresh_every=0", "partition.new_share=0", "checks.max_acc_drop=1.0", "faults.crash_clients=[1]",
                   "faults.poison_clients=[2]", "faults.unknown_class_clients=[3]",
                   "head_ft.select=false")   # clients always move their head: their uploads are not echoes
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
    # the report's per-client rows say which upload the gate refused and why. (A label flip cannot be shown here:
    # on these tiny assets every head is near chance on the server's 1 held-out image per class, so the per-class
    # check does not apply; tests/test_federation_lib.py covers it.)
    ft = _by_client(doc, "tina_ft")
    assert ft[2]["upload"] == "refused" and "non-finite" in ft[2]["upload_detail"], ft[2]
    assert all(ft[c]["upload"] == "accepted" and ft[c]["upload_detail"].startswith("ok") for c in (0, 4)), ft
    assert _by_client(doc, "tina")[0]["upload"] == ""  # only tina_ft rows carry a verdict
    with open(out / "clients.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "tina_ft"]
    assert {int(r["client_id"]): r["upload"] for r in rows} == {0: "accepted", 1: "", 2: "refused", 3: "",
                                                                4: "accepted"}
    zoo = ZooStore(out / "zoo")
    sources = [e.source for e in zoo.entries()]
    assert "client:2" not in sources and {"client:0", "client:4"} <= set(sources)
    assert len(zoo) == cached_zoo + 2
    (growth,) = doc["zoo_growth"]
    assert {k: growth[k] for k in ("round", "zoo_size", "zoo_size_after", "mean_acc", "std_acc", "accepted",
                                   "refused", "echoes", "refresh", "probe")} == {
        "round": 1, "zoo_size": cached_zoo, "zoo_size_after": cached_zoo + 2, "mean_acc": pytest.approx(
            np.mean([_by_client(doc, "tina")[c]["acc"] for c in (0, 2, 4)])), "std_acc": pytest.approx(
            np.std([_by_client(doc, "tina")[c]["acc"] for c in (0, 2, 4)])), "accepted": 2, "refused": 1,
        "echoes": 0, "refresh": "", "probe": None}   # refresh_every=0: no refresh, so no probe
    # an accepted entry's evidence is the partition's count of its labelled images, not the client's word
    from fedtina.data.partition import load_partition

    part = load_partition(out / "partition.json")
    evidence = {e.source: e.metrics["images_per_class"] for e in zoo.entries() if e.source.startswith("client:")}
    assert evidence == {f"client:{c}": pytest.approx(len(part.clients[c].train_idx) / part.clients[c].k)
                        for c in (0, 4)}
    assert growth["accepted_images_per_class"] == pytest.approx(np.mean(list(evidence.values())))


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


def _spec(tmp_path: Path, **kw) -> RunSpec:
    base = dict(out_dir=str(tmp_path), features_path="f.npy", partition_path="p.json", zoo_dir="zoo",
                tina_path="t.safetensors", n_clients=3, rounds=2, methods=["tina", "fedavg"])
    return RunSpec(**{**base, **kw})


def test_run_spec_validation_and_roundtrip(tmp_path):
    from fedtina.methods import run_plan

    with pytest.raises(FedtinaError, match="unknown method"):
        run_plan(_spec(tmp_path, methods=["tina", "fedfoo"]))
    with pytest.raises(FedtinaError, match=r"\['fedavg_full', 'ditto'\] train on images and need images_path"):
        run_plan(_spec(tmp_path, methods=["fedavg_full", "ditto", "pfedhn"]))
    assert [m.name for m in run_plan(_spec(tmp_path, methods=["fedavg_ft"]))] == ["fedavg", "fedavg_ft"]
    with pytest.raises(FedtinaError, match="clients >= 1"):
        _spec(tmp_path, n_clients=0)
    with pytest.raises(FedtinaError, match=r"fraction_train=0.0: must be in \(0, 1\]"):
        _spec(tmp_path, fraction_train=0.0)
    spec = _spec(tmp_path, options={"tina": {"refresh_every": 3}}, fraction_train=0.5)
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
    assert cfg.dataset.name == "caltech101" and cfg.resources.num_gpus == "auto"
    assert list(_compose(tmp_path).method.names) == ["tina", "selection", "local_ft", "fedavg", "fedavg_ft"]
    assert math.isclose(_compose(tmp_path).resources.num_gpus, 0.0)
    assert _compose(tmp_path, "partition=sentence").partition.description == "sentence"


@pytest.mark.slow
def test_clients_with_label_budgets_and_image_prompts(tiny, tmp_path):
    """Label budgets 0 / 1 / 2 per class, round robin; clients describe their classes by names and the mean of
    their labelled images: a budget-0 client is served from its names only, uploads nothing, and the methods that
    fit on labels report it unserved instead of falling back."""
    from fedtina.data.partition import load_partition
    from fedtina.simulate import run

    cache, assets = tiny
    cfg = _compose(cache, "clients=6", "rounds=1", "method.names=[tina,local_ft,fedavg]", "method.tina.prompt=both",
                   "partition.labels_per_class=[0,1,2]", "partition.new_share=0", "method.tina.refresh_every=0",
                   "checks.max_acc_drop=1.0")
    outcome = run(cfg, tmp_path / "run", assets=assets)
    part = load_partition(tmp_path / "run" / "partition.json")
    for c in part.clients:
        assert c.label_budget == [0, 1, 2][c.client_id % 3]
        assert max(np.bincount(c.train_labels).tolist() or [0]) <= c.label_budget
    doc = _summary(tmp_path / "run")
    for m in ("tina", "tina_ft", "local_ft", "fedavg"):
        per = _by_client(doc, m)
        zero = m in ("tina_ft", "local_ft")   # they fit on labels: a budget-0 client is unserved, and says why
        for c, r in per.items():
            assert r["status"] == ("unserved" if zero and c in (0, 3) else "ok"), (m, r)
            assert r["status"] != "unserved" or "has none" in r["detail"], r
        assert set(doc["summary"]["methods"][m]["acc_by_labels"]) == ({"1", "2"} if zero else {"0", "1", "2"}), m
        assert doc["summary"]["methods"][m]["old_clients"]["n_unserved"] == (2 if zero else 0), m
    ft = _by_client(doc, "tina_ft")
    assert all(ft[c]["upload"] in ("accepted", "refused", "echo") for c in (2, 5)), ft
    # with one label per class there is no hold-out, so head_ft.select keeps the received head: an echo, which
    # teaches Tina nothing and is not appended to the run's zoo
    from fedtina.zoo.store import ZooStore

    assert all(ft[c]["upload"] == "echo" for c in (1, 4)), ft
    sources = {e.source for e in ZooStore(tmp_path / "run" / "zoo").entries()}
    assert not sources & {"client:1", "client:4"}
    assert sum(g["echoes"] for g in doc["zoo_growth"]) == sum(r["upload"] == "echo" for r in ft.values())
    from fedtina.report.summary import format_by_labels

    table = format_by_labels(outcome.summary, "old_clients")
    assert "labels   0" in table and "unserved" in table.splitlines()[[ln.split()[0] for ln in
                                                                       table.splitlines()].index("local_ft")]


def test_the_launcher_finds_the_apps_as_flwr_run_does():
    """launch.APPS names the apps exactly as pyproject.toml's [tool.flwr.app.components] (what `flwr run` loads),
    and each names a Flower app object."""
    import tomllib

    from flwr.client import ClientApp
    from flwr.server import ServerApp

    from fedtina.runtime import launch

    components = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "components"]
    assert launch.APPS == components
    assert isinstance(launch.load_app(launch.APPS["serverapp"]), ServerApp)
    assert isinstance(launch.load_app(launch.APPS["clientapp"]), ClientApp)


def test_the_clientapp_goes_to_the_actors_by_name():
    """What Flower's Ray backend pickles with every message: its own loader carries the ClientApp by value (its
    handler closures included); app_by_name's is a module function and a string, and loads the same app."""
    from functools import partial

    from ray import cloudpickle

    from fedtina.runtime import app_by_name
    from fedtina.runtime import launch

    app = launch.load_app(launch.APPS["clientapp"])

    def flowers_loader():   # what flwr 1.42's start_vce hands the backend: a closure over the ClientApp object
        return app

    ours = partial(app_by_name.load_app, launch.APPS["clientapp"])
    by_value, by_name = cloudpickle.dumps(flowers_loader), cloudpickle.dumps(ours)
    assert len(by_name) * 20 < len(by_value), (len(by_name), len(by_value))
    assert cloudpickle.loads(by_name)() is app
    app_by_name.install(launch.APPS["clientapp"])
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    assert RayBackend.build is not app_by_name._ORIGINAL["build"]
