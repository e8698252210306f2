"""The simulation's sections in Hydra's ConfigStore (see fedtina/schema), for configs/simulate.yaml and the
experiments built on it.

    fedtina/simulate          SimulateConfig: simulate.yaml's own keys, head_ft, checks, aggregation, privacy, faults
    fedtina/partition         PartitionConfig (configs/partition/default.yaml)
    fedtina/method/<name>     each method's options (fedtina.methods.registry; configs/method/<name>.yaml)
"""

from __future__ import annotations

from dataclasses import asdict

import fedtina.methods  # noqa: F401 - registers every method (and its options node)
from fedtina.data.partition import PartitionConfig
from fedtina.schema import store
from fedtina.runtime.options import SimulateConfig

store("fedtina/simulate", asdict(SimulateConfig()))
store("fedtina/partition", asdict(PartitionConfig()))
