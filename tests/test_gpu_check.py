"""fedtina.experiments.gpu_check: every stage runs and is timed (on the CPU here, on CUDA where there is one), the
command composes the core config every other command composes (the same cached assets), and asking for CUDA
without one is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedtina.config import core_config, from_dict
from fedtina.errors import FedtinaError
from fedtina.experiments import gpu_check, harness

ROOT = Path(__file__).resolve().parents[1]


def composed(name: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose(name, overrides=list(overrides)), resolve=True)


def test_every_stage_runs_and_is_timed_on_the_cpu(tiny):
    _, assets = tiny
    large = gpu_check.LargeTina(d_model=96, depth=3, num_heads=4, steps=2, heads=5)
    rows = gpu_check.stages(assets, "cpu", heads=20, tina_steps=3, large=large)
    t = assets.cfg.tina
    assert [r.name for r in rows] == [
        "backbone: 1 epoch", "features: whole dataset",
        f"tina (d_model {t.d_model}, depth {t.depth}): 3 training steps",
        f"tina (d_model {t.d_model}, depth {t.depth}): generate 20 heads",
        "tina large (d_model 96, depth 3): 2 training steps", "tina large (d_model 96, depth 3): generate 5 heads",
        "client: local training, 512 images x 1 epoch"]
    assert all(r.seconds > 0 and r.work > 0 for r in rows)
    assert rows[1].work == len(assets.dataset.images) and [r.work for r in rows[2:6]] == [3, 20, 2, 5]
    assert all(r.row().startswith(f"| {r.name} | ") and r.row().endswith("/s |") for r in rows)


@pytest.mark.parametrize("overrides", [(), ("dataset=caltech101", "tina.depth=2", "zoo.num_tasks=50")])
def test_the_same_core_config_as_simulate(overrides):
    """The same CoreConfig, hence the same cache keys: gpu_check times the assets simulate builds."""
    check = composed("gpu_check", "device=cpu", "simulation=false", *overrides)
    assert core_config(check) == core_config(composed("simulate", *overrides))
    assert from_dict(gpu_check.GpuCheckConfig, {k: check[k] for k in ("device", "simulation", "clients", "heads",
                                                                      "tina_steps", "large")}).device == "cpu"
    # the simulation stage gets the core overrides, not gpu_check's own
    assert gpu_check.core_overrides(["device=cpu", *overrides, "large.depth=3", "+tina.x=1", "simulation=false"]) \
        == [*overrides, "+tina.x=1"]


def test_cuda_without_a_device_is_one_line(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FedtinaError) as err:
        harness.execute("gpu_check", composed("gpu_check", "simulation=false"), tmp_path)
    assert str(err.value) == ("device=cuda: no CUDA device here (torch.cuda.is_available() is False); run with "
                              "device=cpu for the CPU column")


def test_the_command_exits_2_with_that_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fedtina.experiments.gpu_check", "simulation=false",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1 and errors[0].endswith("device=cuda: no CUDA device here (torch.cuda.is_available() is "
                                                   "False); run with device=cpu for the CPU column")
