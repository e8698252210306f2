"""Per-round metrics for TensorBoard and W&B (`loggers=[tensorboard]`, `loggers=[tensorboard,wandb]`), written as the
run goes, so a long run can be followed and runs compared: `tensorboard --logdir outputs/simulate`.

Tags are `<method>/<old|new>_acc_mean`, `.../acc_worst10`, `.../clients`, `.../failed`, stepped by round; W&B runs
offline (`wandb sync <run dir>/wandb/offline-run-*` uploads later) and only when the package is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtina.errors import FedtinaError

LOGGERS = ("tensorboard", "wandb")


class RunLoggers:
    """The run's metric writers; `scalars(step, values)` goes to every one, `close()` flushes them."""

    def __init__(self, names: list[str], out_dir: str | Path, config: dict[str, Any] | None = None) -> None:
        out_dir = Path(out_dir)
        self._tb = self._wandb = None
        for name in names:
            if name not in LOGGERS:
                raise FedtinaError(f"loggers: {name!r} is not a logger; valid: {list(LOGGERS)}")
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise FedtinaError("loggers: wandb is not installed (pip install wandb), or drop it from loggers")
            self._wandb = wandb.init(project="fedtina", dir=str(out_dir), mode="offline", config=config or {},
                                     name=out_dir.name, reinit="finish_previous")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for tag, v in values.items():
                self._tb.add_scalar(tag, v, global_step=step)
            self._tb.flush()   # a long run is watched while it goes
        if self._wandb is not None:
            self._wandb.log({**values, "round": step})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
