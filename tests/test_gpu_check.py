"""fedtina.experiments.gpu_check: every stage runs and is timed (on the CPU here, on CUDA where there is one); asking for CUDA
without one is one clear line."""

from __future__ import annotations

from fedtina.experiments import gpu_check


def test_every_stage_runs_and_is_timed_on_the_cpu(tiny):
    _, assets = tiny
    rows = gpu_check.stages(assets, "cpu", n_heads=20, tina_steps=3)
    assert [r.name.split(":")[0] for r in rows] == ["backbone", "features", "tina", "tina", "client"]
    assert all(r.seconds > 0 and r.work > 0 for r in rows)
    assert rows[1].work == len(assets.dataset.images) and rows[3].work == 20
    assert all(r.row().startswith(f"| {r.name} | ") and r.row().endswith("/s |") for r in rows)


def test_cuda_without_a_device_is_one_line(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda", "--no-simulation"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device cuda: no CUDA device here (torch.cuda.is_available() is False); run with "
                   "--device cpu for the CPU column"]
