"""The Hydra entry point shared by the report commands (bench, analyses): compose `configs/<name>.yaml` with the
command line's overrides, run, and turn bad input into one clear line and exit code 2."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from fedtina.errors import FedtinaError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def hydra_entry(config_name: str, run: Callable[[dict, Path], object], log: logging.Logger) -> None:
    """`run(resolved config dict, Hydra run dir)` under `@hydra.main`."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    import fedtina.schema.simulate  # noqa: F401 - the dataclasses' defaults into Hydra's ConfigStore

    @hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name=config_name)
    def main(cfg: DictConfig) -> None:
        try:
            run(OmegaConf.to_container(cfg, resolve=True), Path(HydraConfig.get().runtime.output_dir))
        except FedtinaError as exc:  # bad input: one clear line, no traceback
            log.error("%s", exc)
            raise SystemExit(2) from None

    main()
