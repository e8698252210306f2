"""How a federation run ends, through the real Flower simulation engine on Ray: a method whose every client
fails, slow clients that must not get healthy ones blamed, Ctrl-C, SIGKILL and resume, impossible resources.
The tiny assets are the session's `tiny` fixture (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtina.errors import FedtinaError
from simkit import TINY, by_client as _by_client, compose as _compose, summary as _summary

ROOT = Path(__file__).resolve().parents[1]


def _ray_processes() -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ray" in cmd and (b"raylet" in cmd or b"gcs_server" in cmd or b"agent" in cmd or b"ray::" in cmd):
                out.add(int(d.name))
    return out


def _simulate(cache: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "fedtina.simulate", *TINY, f"cache_dir={cache}", f"hydra.run.dir={run_dir}",
            *overrides]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc: subprocess.Popen, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"simulate ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _checkpoint(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "checkpoint.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_a_method_whose_every_client_fails_is_recorded_failed_and_the_others_are_kept(tiny, tmp_path):
    from fedtina.simulate import run

    cache, assets = tiny
    cfg = _compose(cache, "clients=3", "rounds=2", "method.names=[selection,fedavg,fedavg_ft]",
                   "faults.crash_clients=[0,1,2]")
    outcome = run(cfg, tmp_path / "run", assets=assets)
    doc = _summary(tmp_path / "run")
    status = doc["summary"]["method_status"]
    assert status["selection"] == "ok"
    assert status["fedavg"].startswith("failed: no FedAvg round had a client update"), status
    assert status["fedavg_ft"].startswith("failed: its FedAvg rounds failed"), status
    assert {r["status"] for r in _by_client(doc, "selection").values()} == {"failed"}
    assert not outcome.interrupted
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "done"


@pytest.mark.slow
def test_slow_clients_time_out_without_blaming_the_clients_queued_behind_them(tiny, tmp_path):
    from fedtina.simulate import run

    cache, assets = tiny
    # 2 actors (resources.num_cpus=1 on 2 CPUs), both held by the slow clients past their timeout
    cfg = _compose(cache, "clients=6", "method.names=[selection]", "faults.slow_clients=[0,1]", "faults.slow_s=5",
                   "timeout_s=3", "resources.init_num_cpus=2")
    run(cfg, tmp_path / "run", assets=assets)
    per = _by_client(_summary(tmp_path / "run"), "selection")
    assert [per[c]["status"] for c in range(6)] == ["failed", "failed", "ok", "ok", "ok", "ok"], per
    assert "of starting work" in per[0]["detail"]


@pytest.mark.slow
def test_ctrl_c_stops_promptly_and_keeps_the_report_of_what_finished(tiny, tmp_path):
    cache, _ = tiny
    run_dir = tmp_path / "run"
    before = _ray_processes()
    proc = _simulate(cache, run_dir, "clients=4", "rounds=1", "method.names=[selection,local_ft]",
                     "faults.slow_clients=[0,1,2,3]", "faults.slow_s=30", "timeout_s=600")
    # selection's evaluate is under way (every client sleeps 30 s): stop now
    _wait_for(lambda: "[describe]" in (run_dir / "simulate.log").read_text()
              if (run_dir / "simulate.log").exists() else False, proc)
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert time.monotonic() - t0 < 60, "one Ctrl-C must stop the run"
    assert proc.returncode == 130, out[-3000:]
    assert "resume with: python -m fedtina.simulate resume=" in out
    assert "Traceback" not in out, out[-3000:]
    doc = _summary(run_dir)
    assert doc["summary"]["interrupted"].startswith("run stopped: SIGINT received")
    assert doc["summary"]["method_status"] == {"selection": "interrupted", "local_ft": "interrupted"}
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    time.sleep(2)
    assert not (_ray_processes() - before), "Ray processes outlived the run"


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_report_of_an_uninterrupted_run(tiny, tmp_path):
    from fedtina.simulate import run

    cache, assets = tiny
    args = ["clients=6", "rounds=3", "method.names=[tina,selection,fedavg,fedavg_ft]", "method.tina.refresh_every=1",
            "method.tina.refresh_steps=5", "checks.max_acc_drop=1.0"]
    before = _ray_processes()
    run_dir = tmp_path / "killed"
    proc = _simulate(cache, run_dir, *args, "faults.slow_clients=[0,1,2,3,4,5]", "faults.slow_s=0.4")
    _wait_for(lambda: _checkpoint(run_dir).get("progress", {}).get("states", {}).get("tina", {}).get("round", 0) >= 1,
              proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = _checkpoint(run_dir)["progress"]
    assert "fedavg" not in done_before["done"], "the run finished before it could be killed"
    assert not (run_dir / "summary.json").exists()
    from fedtina.runtime.rundir import RunDir

    assert RunDir(run_dir).state() == "killed"
    deadline = time.monotonic() + 20
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (_ray_processes() - before), "Ray processes outlived the killed driver"

    # resume: the slow faults are part of the run's config, so they stay (they change no numbers)
    outcome = run(None, run_dir, assets=assets, resume=True)
    assert not outcome.interrupted
    resumed = _summary(run_dir)
    reference_dir = tmp_path / "reference"
    run(_compose(cache, *args), reference_dir, assets=assets)
    reference = _summary(reference_dir)

    def accs(doc: dict) -> dict:
        return {(r["method"], r["client_id"], r["round"]): (r["status"], r["acc"]) for r in doc["clients"]}

    assert accs(resumed) == accs(reference)
    for m in ("tina", "tina_ft", "selection", "fedavg", "fedavg_ft"):
        got, want = resumed["summary"]["methods"][m], reference["summary"]["methods"][m]
        assert got["acc_mean"] == pytest.approx(want["acc_mean"]) and got["n_ok"] == want["n_ok"] == 6, m
    assert resumed["zoo_growth"] == reference["zoo_growth"]
    assert RunDir(run_dir).state() == "done"
    with pytest.raises(FedtinaError, match="already holds a run"):
        run(_compose(cache, *args), run_dir, assets=assets)


@pytest.mark.slow
def test_resources_no_actor_can_get_fail_before_the_simulation_starts():
    import ray

    from fedtina.runtime import launch

    backend = launch.backend_config({"num_cpus": 4, "num_gpus": 0.0, "init_num_cpus": 1})
    try:
        launch._init_ray(backend)
        with pytest.raises(FedtinaError, match="no ClientApp actor fits: each needs resources.num_cpus=4"):
            launch.pool_size(backend)
    finally:
        ray.shutdown()
    assert not os.environ.get("RAY_ADDRESS")
