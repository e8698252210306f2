"""The GPU check: each CUDA path timed on one device, and a 1,000-client simulation with the GPUs shared by the actors.

    python -m fedtina.experiments.gpu_check                            # on a machine with a CUDA device
    python -m fedtina.experiments.gpu_check device=cpu simulation=false   # the CPU column, the stages only
    python -m fedtina.experiments.gpu_check large.d_model=2048 large.depth=24   # the paper's width as the large Tina

It composes configs/gpu_check.yaml, i.e. the core config of every other command (configs/core.yaml and the same
dataset and encoder defaults), so it times the cached assets that `python -m fedtina.simulate` with the same core
overrides builds and uses; the simulation stage passes those overrides on.

Stages (warm cache): one epoch of the generic ResNet-20, feature extraction of the whole dataset, training steps of
the default Tina (as the cache trains it: image prompts, descriptions if configured), head generation by the cached
Tina, the same two for an untrained large Tina (`large`), one client's local training of the image model
(FedAvg-of-the-model's client step), then `python -m fedtina.simulate clients=1000` with `resources=gpu` (every actor
an even share of the GPUs) or `resources=cpu`. Prints one table (also gpu_check.md and .json in the Hydra run dir);
nothing is written to the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedtina.errors import FedtinaError

log = logging.getLogger("fedtina.gpu_check")


@dataclass
class LargeTina:
    """The large Tina's rows: its size, training steps timed and heads generated (defaults: configs/gpu_check.yaml)."""
    d_model: int
    depth: int
    num_heads: int
    steps: int
    heads: int


@dataclass
class GpuCheckConfig:
    """configs/gpu_check.yaml's own keys (the rest is the core config)."""
    device: str
    simulation: bool
    clients: int
    heads: int
    tina_steps: int
    large: LargeTina


@dataclass
class Stage:
    name: str
    seconds: float
    work: float
    unit: str

    def row(self) -> str:
        return f"| {self.name} | {self.seconds:.2f} | {self.work / self.seconds:,.1f} {self.unit}/s |"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(name: str, device: str, work: float, unit: str, fn: Callable[[], Any]) -> Stage:
    fn()   # warm-up: kernels, allocator, lazy imports
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return Stage(name, time.perf_counter() - t0, work, unit)


def _tina_rows(assets, tina_cfg, device: str, steps: int, heads: int, label: str, generator=None) -> list[Stage]:
    """Training steps of a Tina trained as the cache trains it, then `heads` heads generated (by `generator`, else
    by the trainer's own untrained EMA: generation costs the same)."""
    from fedtina.data.split import sample_tasks
    from fedtina.tina.train import TinaTrainer

    cfg = dataclasses.replace(tina_cfg, device=device, log_every=10**9)
    trainer = TinaTrainer(assets.zoo.entries(), assets.encoder, cfg, log=None, shots=assets.shots,
                          descriptions=assets.descriptions if cfg.prompt_sentences else None)
    rows = [_timed(f"{label}: {steps} training steps", device, steps, "steps",
                   lambda: [trainer.train_step() for _ in range(steps)])]
    tina = generator or trainer.generator()
    names, split = assets.dataset.class_names, assets.split
    sets = [[names[c] for c in t] for t in sample_tasks(np.asarray(split.seen), heads, 5, 10,
                                                          np.random.default_rng(0))]
    rows.append(_timed(f"{label}: generate {heads} heads", device, heads, "heads", lambda: tina.generate(sets)))
    return rows


def stages(assets, device: str, heads: int, tina_steps: int, large: LargeTina) -> list[Stage]:
    """Each CUDA path of fedtina on `device`, timed after one warm-up call."""
    from fedtina.client import image_model as body
    from fedtina.features.backbone import extract_features, train_generic
    from fedtina.tina.train import load_checkpoint

    core, ds, split = assets.cfg, assets.dataset, assets.split
    bb_cfg = dataclasses.replace(core.backbone, epochs=1, device=device)
    quiet = lambda _m: None  # noqa: E731
    out = [_timed("backbone: 1 epoch", device, 1, "epochs", lambda: train_generic(ds, split, bb_cfg, log=quiet))]
    model = train_generic(ds, split, bb_cfg, log=quiet)
    out.append(_timed("features: whole dataset", device, len(ds.images), "images",
                      lambda: extract_features(model, ds.images, device=device)))
    t = core.tina
    out += _tina_rows(assets, t, device, tina_steps, heads, f"tina (d_model {t.d_model}, depth {t.depth})",
                      generator=load_checkpoint(assets.tina_path, assets.encoder, device=device))
    big = dataclasses.replace(t, d_model=large.d_model, depth=large.depth, num_heads=large.num_heads)
    out += _tina_rows(assets, big, device, large.steps, large.heads,
                      f"tina large (d_model {large.d_model}, depth {large.depth})")
    idx = split.zoo_idx[:512]
    labels = np.unique(ds.labels[idx], return_inverse=True)[1]
    state = body.init_state(int(labels.max()) + 1, core.backbone)
    out.append(_timed("client: local training, 512 images x 1 epoch", device, 512, "images",
                      lambda: body.train(state, ds.images[idx], labels, epochs=1, lr=0.05, batch_size=64,
                                         device=device)))
    return out


def core_overrides(task_overrides: list[str]) -> list[str]:
    """The command line's overrides of the core config (dataset=..., tina.depth=...), for the simulation."""
    from fedtina.config import CoreConfig

    names = {f.name for f in dataclasses.fields(CoreConfig)}
    return [o for o in task_overrides if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] in names]


def simulation(device: str, clients: int, overrides: list[str]) -> Stage:
    resources = "resources=gpu" if device.startswith("cuda") else "resources=cpu"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fedtina.simulate", f"clients={clients}", resources,
                               *overrides, f"hydra.run.dir={Path(tmp) / 'run'}"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FedtinaError(f"the {clients}-client simulation ({resources}) failed: {tail[0]}")
    return Stage(f"simulate clients={clients} ({resources})", wall, clients, "clients")


ASSETS = "core"   # the harness validates the core config and builds (or loads) its cached assets


def _options(cfg: dict) -> GpuCheckConfig:
    from fedtina.config import from_dict

    return from_dict(GpuCheckConfig, {k: cfg[k] for k in (f.name for f in dataclasses.fields(GpuCheckConfig))})


def check(cfg: dict) -> None:
    """A CUDA device asked for and none here: one line, before anything is built."""
    import torch

    device = _options(cfg).device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FedtinaError(f"device={device}: no CUDA device here (torch.cuda.is_available() is False); "
                           f"run with device=cpu for the CPU column")


def _command_overrides() -> list[str]:
    """The command line's core overrides, for the simulation stage (none outside a Hydra command)."""
    from hydra.core.hydra_config import HydraConfig

    return core_overrides(list(HydraConfig.get().overrides.task)) if HydraConfig.initialized() else []


def _table(data: dict) -> str:
    return "\n".join([f"device: {data['device']} ({data['device_name']}), torch {data['torch']}, "
                      f"{data['threads']} CPU thread(s)", "| stage | seconds | throughput |", "|---|---|---|",
                      *(Stage(**r).row() for r in data["stages"])])


def run(cfg: dict, assets, out_dir: Path):
    """Every stage timed on the configured device (and the simulation, with `simulation`)."""
    import torch

    from fedtina.experiments.harness import Result

    opts = _options(cfg)
    rows = stages(assets, opts.device, opts.heads, opts.tina_steps, opts.large)
    if opts.simulation:
        rows.append(simulation(opts.device, opts.clients, _command_overrides()))
    name = torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda") else "CPU"
    data = {"device": opts.device, "device_name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "stages": [dataclasses.asdict(r) for r in rows]}
    return Result(data, _table)


if __name__ == "__main__":
    from fedtina.experiments import harness

    harness.main(__spec__.name)
