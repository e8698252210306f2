"""The RunSpec: everything the ServerApp needs for one simulated federation, handed over in-process.

Under `run_simulation` the ServerApp runs in a thread of the driver (`python -m fedtina.simulate`), and
`context.run_config` is empty, so the driver sets a module global here and the ServerApp reads it. Large in-process
objects (the Tina generator, the text encoder, the feature bank) travel this way; the clients never see them: they
get file paths in their messages and load what they need lazily.

Under `flwr run` the global is unset; the ServerApp may rebuild a spec from a prepared run dir whose
`run_spec.json` the driver wrote (`spec_from_run_config`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtina.config import NON_NEGATIVE, UNIT, bounded
from fedtina.config import HeadTrainConfig, from_dict
from fedtina.errors import FedtinaError
from fedtina.server.aggregation import AggregationConfig
from fedtina.adversary.attacks import Attack
from fedtina.runtime.grid import StopFlag
from fedtina.adversary.privacy import PrivacyConfig
from fedtina.zoo.heads import Head
from fedtina.io import atomic_write

_IN_PROCESS = ("assets", "outcome", "stop", "finished", "concurrency", "resume", "node_partitions")


@dataclass
class Faults:
    """Fault injection for tests and attack experiments (client ids = partition ids). Crashes hit the work handlers,
    not `describe`; poisoned clients' training replies are replaced by fedtina.adversary.mods.attack_mod."""

    crash_clients: list[int] = field(default_factory=list)          # raise in evaluate/train handlers
    poison_clients: list[int] = field(default_factory=list)         # training replies poisoned (attack_mod)
    poison_kind: str = "nan"                                        # fedtina/adversary/attacks.py HEAD_ATTACKS;
                                                                    # updates: sign_flip | scale | random
    poison_factor: float = bounded(Attack.factor, NON_NEGATIVE)     # scale / sign_flip multiplier, random's norm
    poison_target: int = Attack.target                              # targeted: position of the attacked class
    poison_collude: bool = Attack.collude                           # every attacker shares one seed (random)
    mislabel_share: float = bounded(Attack.share, UNIT)             # mislabeled: share of training labels moved
    unknown_class_clients: list[int] = field(default_factory=list)  # describe adds a class the dataset lacks
    slow_clients: list[int] = field(default_factory=list)           # sleep slow_s in work handlers (timeouts)
    slow_s: float = bounded(0.0, NON_NEGATIVE)

    @property
    def any(self) -> bool:
        """Whether any client is faulty; only then do messages carry these fields (the handlers default them)."""
        return bool(self.crash_clients or self.poison_clients or self.unknown_class_clients or self.slow_clients)


@dataclass
class RunSpec:
    """One federation run. Paths are absolute; `assets` and `outcome` are in-process only (not serialised)."""

    out_dir: str
    features_path: str
    partition_path: str
    zoo_dir: str                    # the run's own copy of the zoo (grows during the run)
    tina_path: str                  # the run's Tina checkpoint (written on every refresh)
    n_clients: int
    rounds: int
    methods: list[str]
    images_path: str | None = None  # only for the methods that train on images
    options: dict[str, dict[str, Any]] = field(default_factory=dict)   # per method: its options (configs/method)
    fraction_train: float = 1.0     # share of the old clients sampled per round by the multi-round methods
    loggers: list[str] = field(default_factory=list)   # per-round metrics: tensorboard, wandb (federation/loggers.py)
    head_ft: HeadTrainConfig = field(default_factory=lambda: HeadTrainConfig(steps=30, select=True))   # as simulate's
    checks: dict[str, Any] = field(default_factory=dict)   # HeadCheckConfig fields
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)   # FedAvg-family server rule
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)   # clipping + noise of uploads and updates
    faults: Faults = field(default_factory=Faults)
    timeout_s: float = 120.0        # every send_and_receive
    node_wait_s: float = 120.0      # how long to wait for all nodes to register
    client_device: str = "auto"     # torch device inside the ClientApps
    core: dict[str, Any] = field(default_factory=dict)     # the CoreConfig as a dict (to rebuild assets)
    # in-process only (not serialised): the driver's assets, the ServerApp's result, and the run's controls
    assets: Any = field(default=None, repr=False, compare=False)
    outcome: Any = field(default=None, repr=False, compare=False)
    stop: StopFlag = field(default_factory=StopFlag, repr=False, compare=False)
    finished: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    concurrency: int | None = field(default=None, repr=False, compare=False)   # ClientApp actors (None: unknown)
    resume: bool = field(default=False, repr=False, compare=False)   # continue from the run dir's checkpoint
    node_partitions: dict[int, int] | None = field(default=None, repr=False, compare=False)   # node id -> partition
    # id as the engine assigned them: the simulation engine's (fedtina.runtime.node_partitions), or under `flwr run`
    # the deployment's (`read_node_partitions`); None: unknown (a deployment without SuperNode authentication),
    # then a client's id is its own word

    def __post_init__(self) -> None:
        """What the engine needs of any run; the methods themselves are checked by whoever knows them (the driver's
        config check, and the ServerApp's plan: fedtina.methods.registry.run_plan)."""
        if not self.methods:
            raise FedtinaError("no method to run: method.names is empty")
        if self.n_clients < 1 or self.rounds < 1:
            raise FedtinaError(f"need clients >= 1 and rounds >= 1, got clients={self.n_clients} rounds={self.rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise FedtinaError(f"fraction_train={self.fraction_train}: must be in (0, 1]")

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) if not is_dataclass(getattr(self, f.name)) else
                asdict(getattr(self, f.name)) for f in fields(self) if f.name not in _IN_PROCESS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunSpec":
        data = dict(data)
        data["options"] = dict(data.get("options") or {})
        data["head_ft"] = from_dict(HeadTrainConfig, data.get("head_ft"))
        data["faults"] = from_dict(Faults, data.get("faults"))
        data["aggregation"] = from_dict(AggregationConfig, data.get("aggregation"))
        data["privacy"] = from_dict(PrivacyConfig, data.get("privacy"))
        return cls(**data)

    def save(self) -> Path:
        path = Path(self.out_dir) / "run_spec.json"
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.to_json(), indent=2)))
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> "RunSpec":
        path = Path(out_dir) / "run_spec.json"
        if not path.exists():
            raise FedtinaError(f"{out_dir} has no run_spec.json; prepare it with `python -m fedtina.simulate`")
        return cls.from_json(json.loads(path.read_text()))


def head_record(head: Head):
    """A head on the wire (both directions): ArrayRecord {"weight" [k, d], "bias" [k]}; class names ride in the
    message's ConfigRecord."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({"weight": Array(np.ascontiguousarray(head.weight, np.float32)),
                        "bias": Array(np.ascontiguousarray(head.bias, np.float32))})


def record_head(rec, class_names) -> Head:
    return Head(tuple(class_names), rec["weight"].numpy(), rec["bias"].numpy())


def arrays_record(arrays: dict[str, np.ndarray]):
    """{name: numpy array} (e.g. a model state dict) -> ArrayRecord, keys kept."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_arrays(rec) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


_lock = threading.Lock()
_spec: RunSpec | None = None


def set_run_spec(spec: RunSpec | None) -> None:
    """Called by the driver before launching the simulation (and with None afterwards)."""
    global _spec
    with _lock:
        _spec = spec


def get_run_spec() -> RunSpec | None:
    with _lock:
        return _spec


def write_node_partitions(path: str | Path, mapping: dict[int, int]) -> Path:
    """A deployment's node -> partition map as JSON ({"<node id>": partition id}), for its ServerApp."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps({str(n): p for n, p in mapping.items()})))


def read_node_partitions(path: str | Path) -> dict[int, int]:
    """The map `write_node_partitions` wrote: node ids (positive) -> distinct partition ids (>= 0); anything else
    is one FedtinaError naming the file."""
    try:
        doc = json.loads(Path(path).read_text())
        mapping = {int(n): p for n, p in doc.items()}
    except (OSError, ValueError, AttributeError) as e:
        raise FedtinaError(f"node-partitions={str(path)!r}: not a node -> partition map "
                           f"({type(e).__name__}: {e})".splitlines()[0]) from None
    bad = [(n, p) for n, p in mapping.items() if n <= 0 or not isinstance(p, int) or isinstance(p, bool) or p < 0]
    if bad or len(set(mapping.values())) != len(mapping):
        raise FedtinaError(f"node-partitions={str(path)!r}: node ids must be positive and map to distinct partition "
                           f"ids >= 0, got {bad[0] if bad else 'a partition twice'}")
    return mapping


def spec_from_run_config(run_config: dict[str, Any], log=print) -> RunSpec:
    """Under `flwr run`: rebuild the spec of a run dir prepared by `python -m fedtina.simulate`
    (`--run-config 'run-dir="outputs/simulate/<stamp>"'`); the assets come from the cache. With
    `node-partitions="<file>"` (fedtina.deploy with SuperNode authentication) the clients' ids are that file's
    node -> partition map."""
    run_dir = str(run_config.get("run-dir") or "")
    if not run_dir:
        raise FedtinaError("no RunSpec: the ServerApp was started without `python -m fedtina.simulate` and "
                           "run_config has no 'run-dir'. Run `python -m fedtina.simulate clients=N` instead, or pass "
                           "--run-config 'run-dir=\"<a run dir written by fedtina.simulate>\"'")
    spec = RunSpec.load(Path(run_dir).expanduser())
    nodes = str(run_config.get("node-partitions") or "")
    spec.node_partitions = read_node_partitions(Path(nodes).expanduser()) if nodes else None
    from fedtina.assets import build_assets
    from fedtina.config import CoreConfig

    spec.assets = build_assets(from_dict(CoreConfig, spec.core), log=log)
    if Path(spec.tina_path).exists():  # the run's own (refreshed) Tina
        from fedtina.tina.train import load_checkpoint

        spec.assets.tina = load_checkpoint(spec.tina_path, spec.assets.encoder)
    return spec
