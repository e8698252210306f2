"""SIGTERM is Ctrl-C: `kill` during the asset build ends `python -m fedtina.simulate` with one line, exit status 143
and the run dir marked `interrupted` (it was left `running`, without a word)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_sigterm_during_the_asset_build_is_an_interrupt(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtina.simulate", "clients=3", "rounds=1", "method.names=[selection]",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}", "dataset.images_per_class=8",
         "backbone.epochs=1000"],   # a backbone that trains far longer than the test waits
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        status = run_dir / "status.json"
        _wait_for(lambda: status.exists() or proc.poll() is not None, 120, "the run to start")
        _wait_for(lambda: (run_dir / "simulate.log").exists() and "backbone" in (run_dir / "simulate.log").read_text()
                  or proc.poll() is not None, 120, "the backbone build")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "interrupted (SIGTERM); resume with: python -m fedtina.simulate resume=" in errors[0]
    assert json.loads(status.read_text())["state"] == "interrupted"
