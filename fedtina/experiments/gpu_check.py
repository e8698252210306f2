"""The GPU check: each CUDA path timed on one device, and a 1,000-client simulation with fractional GPUs per actor.

    python -m fedtina.experiments.gpu_check                      # on a machine with a CUDA device
    python -m fedtina.experiments.gpu_check --device cpu         # the same table on the CPU, for comparison
    python -m fedtina.experiments.gpu_check --no-simulation      # the stages only

Stages (warm cache, the default core config): one epoch of the generic ResNet-20, feature extraction of the whole
dataset, Tina training steps, head generation for 1,000 label sets, one client's local training of the image model
(FedAvg-of-the-model's client step), then `python -m fedtina.simulate clients=1000` with `resources=gpu` (4 actors
per GPU) or `resources=cpu`. Prints one table; nothing is written to the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtina.errors import FedtinaError


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


def _timed(name: str, device: str, work: float, unit: str, fn) -> Stage:
    fn()   # warm-up: kernels, allocator, lazy imports
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return Stage(name, time.perf_counter() - t0, work, unit)


def stages(assets, device: str, n_heads: int = 1000, tina_steps: int = 50) -> list[Stage]:
    """Each CUDA path of fedtina on `device`, timed after one warm-up call."""
    from fedtina.features.backbone import extract_features, train_generic
    from fedtina.client import image_model as body
    from fedtina.data.split import sample_tasks
    from fedtina.tina.train import TinaTrainer, load_checkpoint

    core, ds, split = assets.cfg, assets.dataset, assets.split
    bb_cfg = dataclasses.replace(core.backbone, epochs=1, device=device)
    quiet = lambda _m: None  # noqa: E731
    out = [_timed("backbone: 1 epoch", device, 1, "epochs", lambda: train_generic(ds, split, bb_cfg, log=quiet))]
    model = train_generic(ds, split, bb_cfg, log=quiet)
    out.append(_timed("features: whole dataset", device, len(ds.images), "images",
                      lambda: extract_features(model, ds.images, device=device)))
    trainer = TinaTrainer(assets.zoo.entries(), assets.encoder,
                          dataclasses.replace(core.tina, device=device, log_every=10**9), log=quiet)
    out.append(_timed(f"tina: {tina_steps} training steps", device, tina_steps, "steps",
                      lambda: [trainer.train_step() for _ in range(tina_steps)]))
    tina = load_checkpoint(assets.tina_path, assets.encoder, device=device)
    names = ds.class_names
    sets = [[names[c] for c in t] for t in sample_tasks(np.asarray(split.seen), n_heads, 5, 10,
                                                          np.random.default_rng(0))]
    out.append(_timed(f"tina: generate {n_heads} heads", device, n_heads, "heads", lambda: tina.generate(sets)))
    idx = split.zoo_idx[:512]
    labels = np.unique(ds.labels[idx], return_inverse=True)[1]
    state = body.init_state(int(labels.max()) + 1, core.backbone)
    out.append(_timed("client: local training, 512 images x 1 epoch", device, 512, "images",
                      lambda: body.train(state, ds.images[idx], labels, epochs=1, lr=0.05, batch_size=64,
                                         device=device)))
    return out


def simulation(device: str, clients: int = 1000) -> Stage:
    resources = "resources=gpu" if device.startswith("cuda") else "resources=cpu"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fedtina.simulate", f"clients={clients}", resources,
                               f"hydra.run.dir={Path(tmp) / 'run'}"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FedtinaError(f"the {clients}-client simulation ({resources}) failed: {tail[0]}")
    return Stage(f"simulate clients={clients} ({resources})", wall, clients, "clients")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedtina.experiments.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu for the CPU column")
    ap.add_argument("--no-simulation", action="store_true", help="skip the 1,000-client simulation")
    args = ap.parse_args(argv)
    import torch

    from fedtina.assets import build_assets
    from fedtina.config import CoreConfig

    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise FedtinaError(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False); "
                               f"run with --device cpu for the CPU column")
        assets = build_assets(CoreConfig(), log=lambda _m: None)
        rows = stages(assets, args.device)
        if not args.no_simulation:
            rows.append(simulation(args.device))
    except FedtinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}), torch {torch.__version__}")
    print("| stage | seconds | throughput |\n|---|---|---|")
    print("\n".join(r.row() for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
