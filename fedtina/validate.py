"""Config checks that run before any expensive step (dataset build, backbone training, Ray start): a bad value fails
in a second with one FedtinaError line that names the key, the value and what is valid.

    validate_core_config(cfg)               dataset, protocol, backbone, encoder, zoo, tina (every entry point)
    validate_generate_config(cfg)           + generate's seed
    validate_simulate_config(cfg)           + clients, rounds, timeouts, method, partition, head_ft, checks, faults,
                                              aggregation, privacy, resources
    validate_partition(cfg, dataset, split) the partition and zoo task sizes against the loaded dataset and split,
                                              before the backbone trains

`cfg` is the resolved plain config (`OmegaConf.to_container(cfg, resolve=True)`). Types come from the dataclasses
each section is built into (fedtina.config, PartitionConfig, each method's options, ...), so a new option is
type-checked without an edit here; the ranges below and a few cross-key rules are all this module adds. Rules that
live beside the code they protect are called, not repeated: the partition's (fedtina.data.partition.check_config
/ check_classes), each method's own (`Method.check`, e.g. Tina's prompt and cohorts); the protocol's fractions are
checked by `make_split`, the first step of every build.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import socket
import types
import typing
from typing import Any, Callable, Union

from fedtina.config import BackboneConfig, CoreConfig, DatasetConfig, HeadTrainConfig, TinaConfig, ZooConfig, from_dict
from fedtina.errors import FedtinaError
from fedtina.server.aggregation import AggregationConfig
from fedtina.server.gate import HeadCheckConfig
from fedtina.adversary.privacy import PrivacyConfig
from fedtina.data.partition import PartitionConfig, check_classes, check_config
from fedtina.runtime.spec import Faults

MISSING = "???"  # Hydra's mandatory value, left as this string by OmegaConf.to_container

Range = tuple[Callable[[float], bool], str]
POSITIVE: Range = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Range = (lambda v: v >= 0, ">= 0")
UNIT: Range = (lambda v: 0 <= v <= 1, "in [0, 1]")
BELOW_ONE: Range = (lambda v: 0 <= v < 1, "in [0, 1)")

# Per dataclass and field: the range a value must lie in (types come from the dataclass itself).
RANGES: dict[type, dict[str, Range]] = {
    DatasetConfig: {"images_per_class": POSITIVE},
    BackboneConfig: {"width": POSITIVE, "epochs": POSITIVE, "batch_size": POSITIVE, "lr": POSITIVE,
                     "weight_decay": NON_NEGATIVE},
    HeadTrainConfig: {"steps": POSITIVE, "lr": POSITIVE, "l2_to_init": NON_NEGATIVE, "weight_decay": NON_NEGATIVE},
    ZooConfig: {"num_tasks": POSITIVE, "k_min": POSITIVE, "k_max": POSITIVE},
    TinaConfig: {"max_classes": POSITIVE, "d_model": POSITIVE, "depth": POSITIVE, "num_heads": POSITIVE,
                 "mlp_ratio": POSITIVE, "timesteps": POSITIVE, "sample_steps": POSITIVE, "train_steps": POSITIVE,
                 "batch_size": POSITIVE, "lr": POSITIVE, "ema_decay": BELOW_ONE, "warmup_steps": NON_NEGATIVE,
                 "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE, "subset_prob": UNIT,
                 "log_every": POSITIVE, "cpu_threads": NON_NEGATIVE,
                 "prompt_text": UNIT, "prompt_images": UNIT, "prompt_both": UNIT, "max_shots": POSITIVE,
                 "prompt_sentences": UNIT},
    PartitionConfig: {"k_min": POSITIVE, "k_max": POSITIVE, "alpha": POSITIVE, "unseen_share": UNIT,
                      "unseen_per_client": NON_NEGATIVE, "test_fraction_server": BELOW_ONE, "new_share": BELOW_ONE},
    HeadCheckConfig: {"max_row_norm_ratio": POSITIVE, "max_acc_drop": NON_NEGATIVE, "max_bytes": POSITIVE},
    Faults: {"slow_s": NON_NEGATIVE, "poison_factor": NON_NEGATIVE, "mislabel_share": UNIT},
    PrivacyConfig: {"upload_clip": NON_NEGATIVE, "upload_noise": NON_NEGATIVE, "fedavg_clip": NON_NEGATIVE,
                    "fedavg_noise": NON_NEGATIVE, "delta": (lambda v: 0 < v < 1, "in (0, 1)")},
    AggregationConfig: {"num_malicious": NON_NEGATIVE, "beta": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
                        "select": NON_NEGATIVE},
}
FRACTION: Range = (lambda v: 0 < v <= 1, "in (0, 1]")
NAMED_RANGES = {"positive": POSITIVE, "non_negative": NON_NEGATIVE, "unit": UNIT, "fraction": FRACTION}
# simulate's sections built into a dataclass (the method section: fedtina.methods' own options, `_check_methods`)
SECTIONS: dict[str, type] = {"partition": PartitionConfig, "head_ft": HeadTrainConfig,
                             "checks": HeadCheckConfig, "faults": Faults, "aggregation": AggregationConfig,
                             "privacy": PrivacyConfig}
# simulate.yaml's own keys and the resources group (no dataclass): type and range
TOP_LEVEL: dict[str, tuple[Any, Range | None]] = {
    "clients": (int, POSITIVE), "rounds": (int, POSITIVE), "timeout_s": (float, POSITIVE),
    "node_wait_s": (float, POSITIVE), "prepare_only": (bool, None), "verbose": (bool, None),
    "resume": (bool | str | None, None), "fraction_train": (float, FRACTION),
}
RESOURCES: dict[str, tuple[Any, Range | None]] = {
    "num_cpus": (float, POSITIVE), "num_gpus": (float | str, NON_NEGATIVE), "device": (str, None),
    "ray_address": (str | None, None), "init_num_cpus": (int | None, POSITIVE),
    "object_store_mb": (int | None, POSITIVE),
}


# --------------------------------------------------------------------------------------------------------------------
# One value


def _show(value: Any) -> str:
    """A value as it would be written in a Hydra override (true, null, 'abc', 2.5)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


def _describe(tp: Any, rng: Range | None = None) -> str:
    """What a valid value is, in words: "an integer > 0", "a string or null", "a list of integers"."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a, rng) for a in args) + " or null"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    what = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, str(tp))
    return f"{what} {rng[1]}" if rng and tp in (int, float) else what


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether `value` has type `tp`; bools are not numbers here (clients=true must not run as 1 client)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, typing.get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True  # Any and types this module does not know


def check_value(key: str, value: Any, tp: Any, rng: Range | None = None) -> None:
    """`value` (at dotted `key`) has type `tp` and, when it is a number, lies in `rng`; else one FedtinaError line."""
    if value == MISSING:
        raise FedtinaError(f"{key} is required (it is ??? in the config): set it, e.g. {key}=...")
    if not _type_ok(value, tp) or (rng and isinstance(value, (int, float)) and not rng[0](value)):
        raise FedtinaError(f"{key}={_show(value)} is invalid: must be {_describe(tp, rng)}")


def check_section(key: str, cls: type, data: Any, extra: tuple[str, ...] = ()) -> None:
    """Every field of dataclass `cls` present in `data` (the section at `key`): unknown keys, types and ranges, then
    nested dataclass sections. `extra` are keys of the section that are not fields (method.names)."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise FedtinaError(f"{key}={_show(data)} is invalid: must be a section of options {sorted(_fields(cls))}")
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields) - set(extra))
    if unknown:
        raise FedtinaError(f"unknown {key} option(s) {unknown}; valid: {sorted([*fields, *extra])}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name in extra:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            check_section(f"{key}.{name}", tp, value)
        else:
            check_value(f"{key}.{name}", value, tp, RANGES.get(cls, {}).get(name))


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------------------------------
# Whole configs


def validate_core_config(cfg: dict[str, Any]) -> None:
    """The core pipeline's sections (those present), then the rules across keys that would otherwise fail only
    after the backbone or the zoo was built."""
    from fedtina.assets import IMAGE_PROMPTS
    from fedtina.features.backbone import BACKBONES
    from fedtina.data import DATASETS
    from fedtina.features.text import ENCODERS
    from fedtina.tina.diffusion import PREDICTIONS, NoiseSchedule
    from fedtina.tina.train import check_objective

    dataset = cfg.get("dataset") or {}
    if isinstance(dataset, dict) and dataset.get("name") == "folder" and dataset.get("path") in (None, "", MISSING):
        raise FedtinaError("dataset=folder needs dataset.path: a directory or .zip with one folder per class")
    hints = typing.get_type_hints(CoreConfig)
    present = {name: cfg[name] for name in hints if name in cfg}
    for name, value in present.items():
        if dataclasses.is_dataclass(hints[name]):
            check_section(name, hints[name], value)
        else:
            check_value(name, value, hints[name])
    core = from_dict(CoreConfig, present)
    ds, zoo, tina = core.dataset, core.zoo, core.tina
    one_of("dataset.name", ds.name, DATASETS)
    one_of("backbone.arch", core.backbone.arch, sorted(BACKBONES))
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
    validate_core_config(cfg)
    for key, (tp, rng) in TOP_LEVEL.items():
        if key in cfg:
            check_value(key, cfg[key], tp, rng)
    for key, cls in SECTIONS.items():
        check_section(key, cls, cfg.get(key))
    clients = cfg.get("clients")
    part = from_dict(PartitionConfig, cfg.get("partition"))
    check_config(part, int(clients) if clients is not None else 1)
    _check_methods(cfg)
    _check_attacks(cfg, part)
    _check_loggers(cfg.get("loggers"))
    max_classes = from_dict(TinaConfig, cfg.get("tina")).max_classes
    if part.k_max > max_classes:
        raise FedtinaError(f"partition.k_max={part.k_max} exceeds tina.max_classes={max_classes} (the largest label "
                           "set Tina generates)")
    _check_resources(cfg.get("resources") or {})


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
        raise FedtinaError(f"loggers={_show(loggers)}: need a list, e.g. [tensorboard]")
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
        RANGES.setdefault(m.options, {k: NAMED_RANGES[v] for k, v in m.ranges.items()})
        check_section(f"method.{name}", m.options, section[name])
    for name in names:
        m = REGISTRY[name]
        if m.check is not None:
            m.check(from_dict(m.options, section.get(name)) if m.options else None, cfg)


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


def _check_resources(res: dict[str, Any]) -> None:
    """Per-actor resources a local Ray can meet: more than it has leaves Flower's actor pool empty, and the run
    would wait out its timeouts. A joined cluster (ray_address) is not checked: its size is not known here."""
    for key, (tp, rng) in RESOURCES.items():
        if key in res:
            check_value(f"resources.{key}", res[key], tp, rng)
    num_cpus, num_gpus = res.get("num_cpus", 1), res.get("num_gpus") or 0
    if isinstance(num_gpus, str) and num_gpus != "auto":
        raise FedtinaError(f"resources.num_gpus={_show(num_gpus)} is invalid: must be a finite number >= 0 or auto")
    if res.get("ray_address"):
        _check_ray_address(str(res["ray_address"]))
        return
    have_cpus = res.get("init_num_cpus") or local_cpus()
    if num_cpus > have_cpus:
        where = "resources.init_num_cpus" if res.get("init_num_cpus") else "this machine"
        raise FedtinaError(f"resources.num_cpus={_show(num_cpus)} per client exceeds the {have_cpus} CPU(s) a local "
                           f"Ray gets ({where}): no client could start; use resources.num_cpus <= {have_cpus}")
    if num_gpus == "auto" or num_gpus > 0:
        import torch

        have_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if num_gpus == "auto" and not have_gpus:
            raise FedtinaError("resources.num_gpus=auto shares the CUDA devices visible here among the actors, and "
                               "there are none: use resources=cpu")
        if num_gpus != "auto" and num_gpus > have_gpus:
            raise FedtinaError(f"resources.num_gpus={_show(num_gpus)} per client exceeds the {have_gpus} CUDA "
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
        raise FedtinaError(f"{key}={_show(value)} is invalid; valid: {list(valid)}")


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
