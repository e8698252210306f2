"""Config checks that run before any expensive step (dataset build, backbone training, Ray start): a bad value fails
in a second with one FedtinaError line that names the key, the value and what is valid.

    validate_core_config(cfg)               dataset, protocol, backbone, encoder, zoo, tina (every entry point)
    validate_generate_config(cfg)           + generate's seed
    validate_simulate_config(cfg)           + clients, rounds, timeouts, method, partition, head_ft, checks, faults,
                                              aggregation, privacy, resources
    validate_partition(cfg, dataset, split) the partition and zoo task sizes against the loaded dataset and split,
                                              before the backbone trains

`cfg` is the resolved plain config (`OmegaConf.to_container(cfg, resolve=True)`). Types, defaults and ranges are
the dataclasses' own (fedtina.config.from_dict checks each value against its field: fedtina.config, SimulateConfig,
PartitionConfig, each method's options, ...), so a new option is checked without an edit here; this module adds the
rules across keys. Rules that live beside the code they protect are called, not repeated: the partition's
(fedtina.data.partition.check_config / check_classes), each method's own (`Method.check`, e.g. Tina's prompt and
cohorts); the protocol's fractions are checked by `make_split`, the first step of every build.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import socket
from typing import Any

from fedtina.config import MISSING, CoreConfig, LimitsConfig, TinaConfig, ZooConfig, check_value, from_dict, show
from fedtina.errors import FedtinaError
from fedtina.server.aggregation import AggregationConfig
from fedtina.data.partition import PartitionConfig, check_classes, check_config
from fedtina.runtime.spec import Faults


def _sections(cls: type, cfg: dict[str, Any]) -> Any:
    """Dataclass `cls` from the keys of `cfg` that are its fields (a composed config holds other sections too)."""
    return from_dict(cls, {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})


# --------------------------------------------------------------------------------------------------------------------
# Whole configs


def validate_core_config(cfg: dict[str, Any]) -> None:
    """The core pipeline's sections (those present), then the rules across keys that would otherwise fail only
    after the backbone or the zoo was built."""
    from fedtina.assets import IMAGE_PROMPTS
    from fedtina.features.backbone import BACKBONES, CLASSIFIERS
    from fedtina.features.text import ENCODERS
    from fedtina.tina.diffusion import PREDICTIONS, NoiseSchedule
    from fedtina.tina.train import check_objective

    dataset = cfg.get("dataset") or {}
    if isinstance(dataset, dict) and dataset.get("name") == "folder" and dataset.get("path") in (None, "", MISSING):
        raise FedtinaError("dataset=folder needs dataset.path: a directory or .zip with one folder per class")
    core = _sections(CoreConfig, cfg)   # an unknown dataset.name: one line listing the registered ones
    zoo, tina = core.zoo, core.tina
    one_of("backbone.arch", core.backbone.arch, sorted(BACKBONES))
    one_of("backbone.classifier", core.backbone.classifier, CLASSIFIERS)
    one_of("encoder.name", core.encoder.name, sorted(ENCODERS))
    one_of("encoder.image_prompts", core.encoder.image_prompts, IMAGE_PROMPTS)
    if core.encoder.image_prompts == "clip" and core.encoder.name != "clip":
        raise FedtinaError(f"encoder.image_prompts=clip uses the open_clip image tower: it needs encoder=clip "
                           f"(got encoder.name={core.encoder.name!r})")
    if zoo.k_min > zoo.k_max:
        raise FedtinaError(f"zoo.k_min={zoo.k_min} > zoo.k_max={zoo.k_max}: need k_min <= k_max")
    if zoo.k_max > tina.max_classes:
        raise FedtinaError(f"zoo.k_max={zoo.k_max} exceeds tina.max_classes={tina.max_classes} (the largest label set "
                           "Tina generates)")
    if tina.d_model % tina.num_heads:
        raise FedtinaError(f"tina.d_model={tina.d_model} is not divisible by tina.num_heads={tina.num_heads}")
    one_of("tina.prediction", tina.prediction, PREDICTIONS)
    check_objective(tina)
    if tina.prompt_sentences > 0 and not core.dataset.descriptions:
        raise FedtinaError("tina.prompt_sentences > 0 trains on class descriptions: set dataset.descriptions "
                           "('generated' for shapes, or a file of 'name<TAB>sentence' lines)")
    try:
        NoiseSchedule(tina.timesteps, tina.schedule)
    except ValueError as e:
        raise FedtinaError(f"tina.schedule={tina.schedule!r}, tina.timesteps={tina.timesteps}: {e}") from None
    if tina.sample_steps > tina.timesteps:
        raise FedtinaError(f"tina.sample_steps={tina.sample_steps} exceeds tina.timesteps={tina.timesteps}")
    mix = (tina.prompt_text, tina.prompt_images, tina.prompt_both)
    if not math.isclose(sum(mix), 1.0, abs_tol=1e-6):
        raise FedtinaError(f"tina.prompt_text + prompt_images + prompt_both = {sum(mix):g}: the prompt mix must sum "
                           f"to 1")


def validate_generate_config(cfg: dict[str, Any]) -> None:
    """`python -m fedtina.generate`'s composed config: the core sections and the generation seed."""
    validate_core_config(cfg)
    check_value("seed", cfg.get("seed", 0), int)


def validate_simulate_config(cfg: dict[str, Any]) -> None:
    """`configs/simulate.yaml` resolved: every section, then the rules across keys (rounds vs clients, partition vs
    Tina, resources vs this machine)."""
    if not isinstance(cfg, dict):  # a DictConfig from a test or a caller
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    from fedtina.runtime.options import ResourcesConfig, SimulateConfig

    validate_core_config(cfg)
    _check_loggers(cfg.get("loggers"))
    _sections(SimulateConfig, cfg)
    clients = cfg.get("clients")
    _check_clients(clients, from_dict(LimitsConfig, cfg.get("limits"), "limits"))
    part = from_dict(PartitionConfig, cfg.get("partition"), "partition")
    check_config(part, int(clients) if clients is not None else 1)
    _check_methods(cfg)
    _check_attacks(cfg, part)
    max_classes = from_dict(TinaConfig, cfg.get("tina")).max_classes
    if part.k_max > max_classes:
        raise FedtinaError(f"partition.k_max={part.k_max} exceeds tina.max_classes={max_classes} (the largest label "
                           "set Tina generates)")
    _check_resources(from_dict(ResourcesConfig, cfg.get("resources"), "resources"))


# The driver's memory per client: README's scale section measured a 3.7 GB driver at 100,000 clients (tina +
# selection), i.e. ~37 KB each (start-up's fixed ~1 GB included, so an upper estimate of the marginal cost).
DRIVER_BYTES_PER_CLIENT = 37_000


def _check_clients(clients: int | None, limits: LimitsConfig) -> None:
    """`clients` within `limits.max_clients`, checked before anything is built: 100,000,000 clients ran 180 s
    silently, at 3.1 GB, before failing."""
    if clients is not None and clients > limits.max_clients:
        gb = clients * DRIVER_BYTES_PER_CLIENT / 1e9
        raise FedtinaError(f"clients={clients:,} exceeds limits.max_clients={limits.max_clients:,} (the driver alone "
                           f"would need ~{gb:,.0f} GB at ~{DRIVER_BYTES_PER_CLIENT // 1000} KB per client); raise "
                           "limits.max_clients to run it anyway")


def _check_attacks(cfg: dict[str, Any], part: PartitionConfig) -> None:
    """The poison kind, and the aggregation rule against the updates a round gets (sampled old clients)."""
    from fedtina.server import aggregation
    from fedtina.adversary.attacks import HEAD_ATTACKS
    from fedtina.data.partition import new_clients

    faults = from_dict(Faults, cfg.get("faults"))
    if faults.poison_clients:
        one_of("faults.poison_kind", faults.poison_kind, HEAD_ATTACKS)
    if cfg.get("clients") is not None:
        clients = int(cfg["clients"])
        old = clients - new_clients(part, clients)
        sampled = max(1, int(round(float(cfg.get("fraction_train", 1.0)) * old)))
        aggregation.check(from_dict(AggregationConfig, cfg.get("aggregation")), sampled)


def _check_loggers(loggers: Any) -> None:
    """`loggers`: a list of fedtina.report.loggers.LOGGERS; wandb only where the package is installed."""
    from fedtina.report.loggers import LOGGERS

    if loggers is None:
        return
    if not isinstance(loggers, list):
        raise FedtinaError(f"loggers={show(loggers)}: need a list, e.g. [tensorboard]")
    for name in loggers:
        one_of("loggers", name, LOGGERS)
    if "wandb" in loggers and importlib.util.find_spec("wandb") is None:
        raise FedtinaError("loggers: wandb is not installed (pip install wandb), or drop it from loggers")


def _check_methods(cfg: dict[str, Any]) -> None:
    """`method.names` and each method's options block (`method.<name>`: its dataclass, ranges and own rules)."""
    from fedtina.methods import REGISTRY

    valid = list(REGISTRY)
    section = cfg.get("method") or {}
    names = section.get("names")
    if names is None:
        raise FedtinaError(f"method.names is missing: pick method=compare, method=pfl or one of {valid}, or set "
                           "method.names='[tina,fedavg]'")
    check_value("method.names", names, list[str])
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise FedtinaError(f"method.names={names}: unknown method(s) {unknown}; valid: {valid}")
    if not names or len(set(names)) < len(names):
        raise FedtinaError(f"method.names={names}: need one or more distinct methods of {valid}")
    blocks = sorted(set(section) - {"names"} - set(REGISTRY))
    if blocks:
        raise FedtinaError(f"unknown method option block(s) {blocks}: method.<name> must name a method of {valid}")
    for name in section:
        if name == "names":
            continue
        m = REGISTRY[name]
        if m.options is None:
            raise FedtinaError(f"method.{name} has no options; remove the method.{name} block")
    for name in names:
        m = REGISTRY[name]
        opts = from_dict(m.options, section.get(name), f"method.{name}") if m.options else None
        if m.check is not None:
            m.check(opts, cfg)


def _check_ray_address(address: str, timeout_s: float = 3.0) -> None:
    """A `host:port` or `ray://host:port` cluster address must answer a TCP connect within `timeout_s`: ray.init
    would otherwise retry for a minute or more. `auto` (find the cluster started on this machine) is left to Ray,
    which fails fast when there is none."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise FedtinaError(f"resources.ray_address={address!r}: need auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise FedtinaError(f"resources.ray_address={address!r}: nobody answers at {host}:{port} ({e.strerror or e}); "
                           f"start the cluster there (ray start --head) or set resources.ray_address=null") from None


def _check_resources(res) -> None:
    """Per-actor resources a local Ray can meet (`res`: a ResourcesConfig): more than it has leaves Flower's actor
    pool empty, and the run would wait out its timeouts. A joined cluster (ray_address) is not checked: its size is
    not known here."""
    if res.ray_address:
        _check_ray_address(str(res.ray_address))
        return
    num_cpus, num_gpus = res.num_cpus, res.num_gpus
    if isinstance(num_gpus, str) and num_gpus != "auto":
        raise FedtinaError(f"resources.num_gpus={show(num_gpus)} is invalid: must be a finite number >= 0 or auto")
    have_cpus = res.init_num_cpus or local_cpus()
    if num_cpus > have_cpus:
        where = "resources.init_num_cpus" if res.init_num_cpus else "this machine"
        raise FedtinaError(f"resources.num_cpus={show(num_cpus)} per client exceeds the {have_cpus} CPU(s) a local "
                           f"Ray gets ({where}): no client could start; use resources.num_cpus <= {have_cpus}")
    if num_gpus == "auto" or num_gpus > 0:
        import torch

        have_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if num_gpus == "auto" and not have_gpus:
            raise FedtinaError("resources.num_gpus=auto shares the CUDA devices visible here among the actors, and "
                               "there are none: use resources=cpu")
        if num_gpus != "auto" and num_gpus > have_gpus:
            raise FedtinaError(f"resources.num_gpus={show(num_gpus)} per client exceeds the {have_gpus} CUDA "
                               "device(s) visible here: no client could start; use resources=cpu")


def local_cpus() -> int:
    """The CPUs a local Ray would detect (it honours container limits), else os.cpu_count()."""
    try:
        from ray._private.utils import get_num_cpus  # private, but the very number Ray uses

        return int(get_num_cpus(override_docker_cpu_warning=True))
    except Exception:  # noqa: BLE001 - any Ray version without it: fall back to the plain count
        return os.cpu_count() or 1


def one_of(key: str, value: Any, valid) -> None:
    if value not in valid:
        raise FedtinaError(f"{key}={show(value)} is invalid; valid: {list(valid)}")


def validate_partition(cfg: dict[str, Any], dataset, split) -> None:
    """The partition (`cfg["partition"]`, `cfg["clients"]`) and the zoo's task size against the loaded dataset and
    its protocol split: the partition's own rules (fedtina.data.partition.check_classes) on the real class
    counts, so a dataset too small for them fails in seconds instead of after the backbone trained."""
    n_seen, n_unseen = len(split.seen), len(split.unseen)
    where = f"dataset {dataset.name!r} has {n_seen} seen and {n_unseen} unseen classes"
    try:
        check_classes(from_dict(PartitionConfig, cfg.get("partition")), int(cfg["clients"]), n_seen, n_unseen)
    except FedtinaError as e:
        raise FedtinaError(f"{e} ({where})") from None
    zoo = from_dict(ZooConfig, cfg.get("zoo"))
    if zoo.k_max > n_seen:
        raise FedtinaError(f"zoo.k_max={zoo.k_max} exceeds the seen classes zoo tasks draw from ({where})")
