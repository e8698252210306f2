"""Shared by the simulation tests: the tiny config, composing it, reading a run's summary."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose as hydra_compose, initialize_config_dir

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


def compose(cache: Path, *overrides: str, tiny: bool = True):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose("simulate", overrides=[*(TINY if tiny else []), f"cache_dir={cache}", *overrides])


def summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


def by_client(doc: dict, method: str) -> dict[int, dict]:
    """The latest result per client of one method, from summary.json's per-client records."""
    out: dict[int, dict] = {}
    for r in doc["clients"]:
        if r["method"] == method and (r["client_id"] not in out or r["round"] >= out[r["client_id"]]["round"]):
            out[r["client_id"]] = r
    return out
