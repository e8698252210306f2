"""The one harness of the experiments. `python -m fedtina.experiments.<name> key=value ...` composes
`configs/<name>.yaml` with the command line's Hydra overrides, validates it, builds (or loads from the cache) the
assets, runs the experiment and writes its result into the Hydra run dir: `<name>.json` (its data, the config and
the times), `<name>.md` (the table it prints) and its figures. Bad input ends in one clear line and exit code 2.

An experiment is a module of this package with a docstring (its first paragraph is its summary in
`python -m fedtina.experiments`) and

    ASSETS = "core" | "simulate" | None   # its base config (validated, and the assets built from it), or None
    def check(cfg) -> None                 # optional: its own keys, checked before anything is built
    def run(cfg: dict, assets, out_dir: Path) -> Result

and ends with the three lines that hand it to the harness (`harness.main(__spec__.name)`).
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedtina.errors import FedtinaError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PACKAGE = Path(__file__).resolve().parent
APPS = ("simulate", "generate", "deploy")
log = logging.getLogger("fedtina.experiments")


@dataclass
class Result:
    """What an experiment returns: its data (JSON-able), how to print it, and its figures (file name -> draw(path,
    data))."""

    data: dict[str, Any]
    format: Callable[[dict], str]
    figures: dict[str, Callable[[Path, dict], object]] = field(default_factory=dict)

    def table(self) -> str:
        return self.format(self.data)


def summary(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line, read without importing it (imports pull in
    torch)."""
    doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def experiments() -> dict[str, str]:
    """{name: summary} of every experiment module of this package."""
    return {p.stem: summary(p) for p in sorted(PACKAGE.glob("*.py"))
            if not p.stem.startswith("_") and p.stem != "harness"}


def compose(name: str, overrides: list[str]) -> dict:
    """`configs/<name>.yaml` with `overrides`, resolved; a bad override (unknown key, syntax) is one FedtinaError."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    import fedtina.schema.simulate  # noqa: F401 - the dataclasses' defaults into Hydra's ConfigStore

    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return OmegaConf.to_container(hydra_compose(config_name=name, overrides=overrides), resolve=True)
    except HydraException as e:
        raise FedtinaError(" ".join(line.strip() for line in str(e).splitlines() if line.strip())) from None


def validate(module, cfg: dict) -> None:
    """The base config (every section, before the build: a bad value fails in a second, naming its key), then the
    experiment's own keys."""
    from fedtina.validate import validate_core_config, validate_simulate_config

    base = getattr(module, "ASSETS", None)
    if base == "core":
        validate_core_config(cfg)
    elif base == "simulate":
        validate_simulate_config(cfg)
    if hasattr(module, "check"):
        module.check(cfg)


def write(name: str, result: Result, out_dir: Path) -> str:
    """<name>.json, <name>.md and the figures into `out_dir`; the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result.data, indent=2, default=str))
    table = result.table()
    (out_dir / f"{name}.md").write_text(table + "\n")
    for file, draw in result.figures.items():
        draw(out_dir / file, result.data)
    return table


def execute(name: str, cfg: dict, out_dir: Path) -> Result:
    """Validate `cfg` (a resolved configs/<name>.yaml), build the assets, run experiment `name`, write its result;
    the result, its data completed with `setup_s` (the assets), `run_s` and `config`."""
    from fedtina.assets import build_assets
    from fedtina.config import core_config

    module = importlib.import_module(f"fedtina.experiments.{name}")
    validate(module, cfg)
    t0 = time.perf_counter()
    assets = build_assets(core_config(cfg), log=log.info) if getattr(module, "ASSETS", None) else None
    t1 = time.perf_counter()
    result = module.run(cfg, assets, out_dir)
    result.data.update(setup_s=t1 - t0, run_s=time.perf_counter() - t1, config=cfg)
    print(write(name, result, out_dir))
    print(f"setup {t1 - t0:.1f} s, run {result.data['run_s']:.0f} s; results in {out_dir}")
    return result


def main(module_name: str) -> None:
    """`python -m fedtina.experiments.<name> key=value ...` under `@hydra.main` (the run dir, logging, overrides)."""
    import sys

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    import fedtina.schema.simulate  # noqa: F401 - the dataclasses' defaults into Hydra's ConfigStore

    name = module_name.rsplit(".", 1)[-1]
    if not any(a.startswith("hydra.job.name=") for a in sys.argv[1:]):
        sys.argv.append(f"hydra.job.name={name}")   # the run dir's log is <name>.log, not this module's

    @hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name=name)
    def entry(cfg: DictConfig) -> None:
        try:
            execute(name, OmegaConf.to_container(cfg, resolve=True), Path(HydraConfig.get().runtime.output_dir))
        except FedtinaError as exc:  # bad input: one clear line, no traceback
            log.error("%s", exc)
            raise SystemExit(2) from None

    entry()
