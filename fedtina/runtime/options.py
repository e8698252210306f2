"""The simulate command's own options (configs/simulate.yaml's keys and the `resources` group), written once here;
Hydra sees these defaults through fedtina/schema/simulate, and fedtina.validate checks a composed config against them."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtina.adversary.privacy import PrivacyConfig
from fedtina.config import FRACTION, NON_NEGATIVE, POSITIVE, HeadTrainConfig, bounded
from fedtina.runtime.spec import Faults
from fedtina.server.aggregation import AggregationConfig
from fedtina.server.gate import HeadCheckConfig


@dataclass
class SimulateConfig:
    """configs/simulate.yaml's own keys (the core sections, `partition`, `method` and `resources` are composed beside
    them); Hydra sees these defaults through fedtina/schema/simulate."""
    clients: int = bounded(10, POSITIVE)          # simulated clients (Flower SuperNodes)
    rounds: int = bounded(3, POSITIVE)            # tina: client cohorts; the others: federated rounds
    fraction_train: float = bounded(1.0, FRACTION)  # share of the old clients each multi-round method samples per round
    loggers: list = field(default_factory=list)   # per-round metrics as the run goes: [tensorboard] (<run dir>/
                                                  # tensorboard), wandb (offline)
    timeout_s: float = bounded(120.0, POSITIVE)  # every send_and_receive: a client that has not answered by then failed
    node_wait_s: float = bounded(120.0, POSITIVE)                           # how long the ServerApp waits for all
                                                                            # clients to register
    prepare_only: bool = False    # only write the run's inputs + run_spec.json (for `flwr run . --run-config ...`)
    verbose: bool = False         # Flower's INFO and DEBUG lines on the console (INFO always goes to simulate.log)
    resume: bool | str | None = None   # true: continue the newest killed/interrupted run under
                                       # outputs/simulate/<dataset>/; or a run dir
    # client-side fine-tuning (tina_ft, local_ft, fedavg_ft): steps of full-batch Adam on the client's frozen features;
    # select: each client picks steps/lr/l2 on hold-outs of its own training images (keeping the received head is one)
    head_ft: HeadTrainConfig = field(default_factory=lambda: HeadTrainConfig(steps=30, select=True))
    checks: HeadCheckConfig = field(default_factory=HeadCheckConfig)        # the server's gate for uploaded heads
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)   # the FedAvg family's server rule
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)           # private uploads and updates (0 = off)
    faults: Faults = field(default_factory=Faults)                          # fault injection (tests, attacks)


@dataclass
class ResourcesConfig:
    """The `resources` group (configs/resources/): Ray resources per ClientApp actor and how Ray starts."""
    num_cpus: float = bounded(1.0, POSITIVE)                                # concurrency = floor(CPUs / num_cpus)
    num_gpus: float | str = bounded(0.0, NON_NEGATIVE)   # GPU share per actor, or auto (an even share of the GPUs)
    device: str = "auto"                          # torch device inside the ClientApps (auto: CUDA if the actor has one)
    ray_address: str | None = None                # null: start a local Ray; "auto" or "ray://host:10001": join one
    init_num_cpus: int | None = bounded(None, POSITIVE)  # local Ray only: CPUs Ray may use (null: all)
    object_store_mb: int | None = bounded(None, POSITIVE)  # local Ray only: cap the object store
