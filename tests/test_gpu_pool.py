"""resources=gpu without a GPU: Ray accepts declared GPUs (`ray.init(num_gpus=1)` on a CPU machine), so the actor
pool that `num_gpus: auto` sizes, the `[ray]` line, and the device each actor picks are tested here."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from fedtina.device import auto_device, pick_device, ray_gpu_ids
from fedtina.runtime import launch


@contextlib.contextmanager
def declared_ray(num_cpus: int, num_gpus: int):
    """A local Ray started by the launcher, told it has these CPUs and GPUs."""
    import ray

    backend = launch.backend_config({"num_cpus": 1})
    backend["init_args"].update(num_cpus=num_cpus, num_gpus=num_gpus)
    launch._init_ray(backend)
    try:
        yield
    finally:
        ray.shutdown()


def sized(resources: dict) -> tuple[dict, int, str]:
    """The launcher's steps once Ray is up: the GPU share, the pool, the `[ray]` line."""
    backend = launch.share_gpus(launch.backend_config(resources))
    actors = launch.pool_size(backend)
    return backend, actors, launch.pool_line(backend, actors, launch._alive_nodes())


class Probe:
    """Runs in a Ray actor: what Ray gave it and which device `auto` picks there."""

    def view(self) -> dict:
        ids = ray_gpu_ids()
        return {"ids": [str(i) for i in ids], "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "auto": str(pick_device("auto")), "if_cuda": auto_device(ids, cuda_available=True)}


def test_the_gpu_share_of_every_actor():
    assert launch.gpu_share([{"CPU": 16, "GPU": 1}], num_cpus=1) == 1 / 16
    assert launch.gpu_share([{"CPU": 16, "GPU": 2}], num_cpus=1) == 1 / 8
    assert launch.gpu_share([{"CPU": 16, "GPU": 1}], num_cpus=2) == 1 / 8       # 8 actors of 2 CPUs
    assert launch.gpu_share([{"CPU": 2, "GPU": 4}], num_cpus=1) == 2.0          # fewer actors than GPUs: whole ones
    assert launch.gpu_share([{"CPU": 2, "GPU": 3}], num_cpus=1) == 1.0          # Ray takes no 1.5 GPUs
    assert launch.gpu_share([{"CPU": 3, "GPU": 1}], num_cpus=1) == 0.3333       # Ray's precision, rounded down
    share = launch.gpu_share([{"CPU": 92, "GPU": 1}], num_cpus=1)
    assert share == 0.0108 and int(1 / share) == 92 and 92 * share <= 1         # 1/92 would fit only 91 (float)
    # nodes: the tightest GPU node sets the share, so every actor fits on every node; CPU-only nodes do not count
    assert launch.gpu_share([{"CPU": 16, "GPU": 1}, {"CPU": 8, "GPU": 1}, {"CPU": 64}], num_cpus=1) == 1 / 16
    assert launch.gpu_share([{"CPU": 16}], num_cpus=1) == 0.0
    assert launch.gpu_share([{"CPU": 16, "GPU": 1}], num_cpus=32) == 0.0       # no room for one actor


def test_auto_device_takes_what_the_process_was_given():
    assert auto_device(None, cuda_available=True) == "cuda"       # the driver (ServerApp, Tina): the GPU it sees
    assert auto_device(["0"], cuda_available=True) == "cuda"      # an actor with a GPU share: its own GPU
    assert auto_device([], cuda_available=True) == "cpu"          # an actor given num_gpus=0: no GPU of its own
    assert auto_device(["0"], cuda_available=False) == "cpu"      # a CPU-only machine runs on the CPU
    assert auto_device(None, cuda_available=False) == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda:1")        # an explicit device is taken as given


def test_one_declared_gpu_and_16_cpus_runs_16_actors_and_each_picks_its_share(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")   # the driver sees GPU 0, as on a one-GPU machine
    with declared_ray(num_cpus=16, num_gpus=1):
        assert os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "0"   # set by the launcher before ray.init
        backend, actors, line = sized({"num_cpus": 1, "num_gpus": "auto"})
        assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0625} and actors == 16
        assert line == "[ray] 16 ClientApp actor(s) on 1 Ray node(s), started here, 16 actor(s) per GPU " \
                       "(1 GPU(s), num_gpus=0.0625 each)"
        backend, actors, line = sized({"num_cpus": 1, "num_gpus": 0.25})   # an explicit share overrides auto
        assert backend["client_resources"]["num_gpus"] == 0.25 and actors == 4
        assert line.endswith(", 4 actor(s) per GPU (1 GPU(s), num_gpus=0.25 each)")
        backend, actors, line = sized({"num_cpus": 2, "num_gpus": "auto"})
        assert backend["client_resources"]["num_gpus"] == 0.125 and actors == 8
        assert sized({"num_cpus": 1, "num_gpus": 0.0})[1:] == (16, "[ray] 16 ClientApp actor(s) on 1 Ray node(s), "
                                                                  "started here")

        assert ray_gpu_ids() is None   # the driver is no Ray worker: it uses what it sees
        with_gpu = ray.remote(num_cpus=1, num_gpus=0.0625)(Probe).remote()
        without = ray.remote(num_cpus=1, num_gpus=0)(Probe).remote()
        given, not_given = ray.get([with_gpu.view.remote(), without.view.remote()], timeout=120)
    assert given == {"ids": ["0"], "visible": "0", "if_cuda": "cuda",
                     "auto": "cuda" if torch.cuda.is_available() else "cpu"}   # CPU-only machine: still the CPU
    # num_gpus=0: the GPU stays visible (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0), but the actor was given none
    assert not_given == {"ids": [], "visible": "0", "if_cuda": "cpu", "auto": "cpu"}


def test_two_declared_gpus_share_16_actors():
    with declared_ray(num_cpus=16, num_gpus=2):
        backend, actors, line = sized({"num_cpus": 1, "num_gpus": "auto"})
    assert backend["client_resources"]["num_gpus"] == 0.125 and actors == 16
    assert line.endswith(", 8 actor(s) per GPU (2 GPU(s), num_gpus=0.125 each)")


def test_auto_on_a_ray_without_gpus_is_one_line():
    from fedtina.errors import FedtinaError

    with declared_ray(num_cpus=2, num_gpus=0):
        with pytest.raises(FedtinaError, match=r"^resources.num_gpus=auto: no Ray node has a GPU and "
                                               r"resources.num_cpus=1 CPU\(s\) for an actor \(the cluster has "
                                               r"\{'CPU': 2.0, 'GPU': 0\}\); use resources=cpu$"):
            sized({"num_cpus": 1, "num_gpus": "auto"})
