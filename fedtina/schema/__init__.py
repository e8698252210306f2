"""Hydra's view of the dataclasses: importing this package stores every core section's defaults in Hydra's ConfigStore,
where the `configs/*.yaml` defaults lists pick them up; the YAML files only choose.

    fedtina/core              CoreConfig but its dataset (configs/core.yaml)
    fedtina/bench             BenchConfig (configs/bench.yaml)
    fedtina/analysis          AnalysisConfig (configs/analysis/classes.yaml)
    fedtina/dataset/<name>    each registered dataset's options (fedtina.data.registry; configs/dataset/<name>.yaml)

Every command imports it before Hydra composes (fedtina.simulate, fedtina.generate, the experiments' hydra_entry,
tests/conftest.py); fedtina/schema/simulate adds the simulation's sections. The nodes are
plain dicts, not typed structured configs, so that a bad value reaches fedtina.validate and ends in its one line.
"""

from __future__ import annotations

from dataclasses import asdict

from hydra.core.config_store import ConfigStore

import fedtina.data  # noqa: F401 - registers every dataset (and its node)
from fedtina.config import AnalysisConfig, BenchConfig, CoreConfig


def store(name: str, node: dict) -> None:
    group, _, leaf = name.rpartition("/")
    ConfigStore.instance().store(group=group or None, name=leaf, node=node)


store("fedtina/core", {k: v for k, v in asdict(CoreConfig()).items() if k != "dataset"})   # dataset: its group
store("fedtina/bench", asdict(BenchConfig()))
store("fedtina/analysis", asdict(AnalysisConfig()))
