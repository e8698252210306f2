"""Device selection: CUDA when this process may use one, the CPU otherwise.

Inside a Ray actor (a Flower ClientApp) "may use" means Ray gave the actor a GPU share: launch.py keeps the driver's
CUDA_VISIBLE_DEVICES in actors given `num_gpus=0` (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0), so such an actor can see
the GPU, but nothing was reserved for it there; it runs on the CPU.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch


def auto_device(ray_gpu_ids: Sequence[int | str] | None, cuda_available: bool) -> str:
    """What `auto` means: cpu without CUDA; in a Ray worker (`ray_gpu_ids` not None) cuda only when Ray assigned it
    GPUs (they are then the only ones it sees, so `cuda` is its own); elsewhere (the driver) cuda when available."""
    if not cuda_available or (ray_gpu_ids is not None and len(ray_gpu_ids) == 0):
        return "cpu"
    return "cuda"


def ray_gpu_ids() -> list[int | str] | None:
    """The GPU ids Ray assigned to this process if it is a Ray worker (an actor or a task), else None. Ray is only
    looked at when already imported: a process that never used Ray does not pay for importing it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return list(ray.get_gpu_ids())


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` -> `auto_device` (cuda if this process may use it, else cpu); `cpu` / `cuda` / `cuda:1` as given."""
    if preference == "auto":
        return torch.device(auto_device(ray_gpu_ids(), torch.cuda.is_available()))
    return torch.device(preference)
