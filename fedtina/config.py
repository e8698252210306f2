"""Typed configuration shared by every stage: every default and every range is written once, here (and in the
options dataclasses of the methods, the datasets and the simulation). Hydra composes them from its ConfigStore
(fedtina/schema/); the YAML under `configs/` only chooses. `from_dict` turns a resolved Hydra node into a dataclass:
unknown keys, a wrong type or a value out of its field's range end in one FedtinaError line naming the key."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

from fedtina.errors import FedtinaError

MISSING = "???"  # Hydra's mandatory value, left as this string by OmegaConf.to_container


@dataclass(frozen=True)
class Range:
    """The interval a number must lie in; written as in the error lines ("> 0", "in [0, 1)")."""
    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, v: float) -> bool:
        return (self.lo < v if self.open_lo else self.lo <= v) and (v < self.hi if self.open_hi else v <= self.hi)

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.open_lo else '>='} {self.lo:g}"
        return f"in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"


POSITIVE = Range(0, open_lo=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)
BELOW_ONE = Range(0, 1, open_hi=True)
FRACTION = Range(0, 1, open_lo=True)


def bounded(default: Any, rng: Range) -> Any:
    """A dataclass field with its default and the range `from_dict` holds its value to."""
    return field(default=default, metadata={"range": rng})


DATASETS: dict[str, type] = {}   # dataset name -> its options dataclass, filled as each dataset module registers


@dataclass
class DatasetConfig:
    """The dataset section. `name` picks a registered dataset (fedtina.data.registry); each registers its options as a
    subclass of this one that sets its own defaults (and may add fields), and `from_dict` builds that subclass by name:
    the defaults of `dataset=<name>` are its dataclass's."""
    name: str = "shapes"              # a registered dataset: shapes (offline) | cifar100 | folder | caltech101
    path: str | None = None           # folder: a directory or .zip of class folders; cifar100: download root
    names_file: str | None = None     # folder: optional "id<TAB>readable name" lines
    download: bool = True             # cifar100: try torchvision's download (fails fast offline)
    images_per_class: int = bounded(240, POSITIVE)  # shapes only
    seed: int = bounded(0, NON_NEGATIVE)  # shapes: generation seed
    descriptions: str | None = None   # a sentence per class as an alternative text prompt: "generated" (shapes) or
                                      # a file of "name<TAB>sentence" lines (fedtina/data/descriptions.py)

    @classmethod
    def variant(cls, data: dict[str, Any]) -> type:
        """The registered options dataclass of the dataset `data` names (fedtina.data.registry fills DATASETS)."""
        name = data.get("name", cls.name)
        if name not in DATASETS:
            valid = sorted(DATASETS, key=lambda n: (n != cls.name, n))   # the default first
            raise FedtinaError(f"dataset.name={name!r} is invalid; valid: {valid}")
        return DATASETS[name]


@dataclass
class ProtocolConfig:
    seen_fraction: float = 0.8        # classes the generic model and the zoo may use
    backbone_fraction: float = 0.5    # per class: images for the generic model
    zoo_fraction: float = 0.25        # per class: images for zoo heads and clients; the rest is test
    seed: int = bounded(0, NON_NEGATIVE)
    novel_share: float = bounded(0.0, BELOW_ONE)  # share of the seen classes held out of the generic model's training
                                      # (split.novel): the zoo still holds heads over them, rows for classes the
                                      # features were not shaped for, as every unseen class is at test time


@dataclass
class BackboneConfig:
    arch: str = "resnet20"
    width: int = bounded(16, POSITIVE)  # channels of the first stage (16 -> 64-d features for ResNet-20)
    epochs: int = bounded(15, POSITIVE)
    batch_size: int = bounded(128, POSITIVE)
    lr: float = bounded(0.1, POSITIVE)
    weight_decay: float = bounded(5e-4, NON_NEGATIVE)
    seed: int = bounded(0, NON_NEGATIVE)
    device: str = "auto"
    precision: str = "auto"           # auto (bf16 where the CPU/GPU runs it natively) | fp32 | bf16
    classifier: str = "linear"        # the generic head: linear | cosine (L2-normalised features and rows, one
                                      # learned scale: every row of every source then lives on the generic rows' scale)


@dataclass
class EncoderConfig:
    name: str = "minilm"              # minilm (offline default) | clip
    model: str = "ViT-B-32"           # clip: open_clip architecture
    pretrained: str | None = None     # clip: a pretrained tag ("openai") or a local checkpoint path; None = random
    template: str = "a photo of a {}."
    device: str = "auto"
    image_prompts: str = "backbone"   # the features behind image prompts: backbone (the generic model's) | clip
                                      # (the open_clip image tower of encoder=clip, cached per dataset)


@dataclass
class HeadTrainConfig:
    """Fine-tuning a linear head on frozen features (zoo heads, oracle, clients)."""
    steps: int = bounded(100, POSITIVE)
    lr: float = bounded(0.05, POSITIVE)
    l2_to_init: float = bounded(1e-3, NON_NEGATIVE)  # pull toward the initial (generic) rows
    weight_decay: float = bounded(0.0, NON_NEGATIVE)
    select: bool = False              # client fine-tuning only: pick steps/lr/l2 on a hold-out of the client's own
                                      # training images (heads.oracle_search; keeping the received head is a candidate)


@dataclass
class ZooConfig:
    num_tasks: int = bounded(600, POSITIVE)
    k_min: int = bounded(10, POSITIVE)  # classes per task, sampled uniformly in [k_min, k_max]
    k_max: int = bounded(10, POSITIVE)
    seed: int = bounded(0, NON_NEGATIVE)
    # select: per-task steps/lr/l2 picked on hold-outs of the task's own zoo images (fedtina.zoo.heads.oracle_heads)
    finetune: HeadTrainConfig = field(default_factory=lambda: HeadTrainConfig(select=True))


@dataclass
class TinaConfig:
    max_classes: int = bounded(20, POSITIVE)  # largest label set Tina generates (tokens are masked beyond k)
    d_model: int = bounded(128, POSITIVE)  # sized so training takes ~2-3 min on 2 CPU cores (fedtina/tina/train.py)
    depth: int = bounded(4, POSITIVE)
    num_heads: int = bounded(4, POSITIVE)
    mlp_ratio: float = bounded(4.0, POSITIVE)
    timesteps: int = bounded(1000, POSITIVE)  # DDPM training steps
    sample_steps: int = bounded(20, POSITIVE)  # DDIM steps at generation time
    train_steps: int = bounded(1500, POSITIVE)
    batch_size: int = bounded(64, POSITIVE)  # tasks per step
    lr: float = bounded(1e-3, POSITIVE)
    seed: int = bounded(0, NON_NEGATIVE)
    device: str = "auto"
    schedule: str = "cosine"          # noise schedule: cosine | linear
    prediction: str = "x0"            # network target: x0 | v | eps (x0 samples best in few DDIM steps)
    ema_decay: float = bounded(0.999, BELOW_ONE)  # EMA of weights, used for sampling (warmed up: min(decay,
                                                  # (1+s)/(10+s)))
    warmup_steps: int = bounded(100, NON_NEGATIVE)  # linear LR warmup, then cosine decay to 0
    weight_decay: float = bounded(0.0, NON_NEGATIVE)  # AdamW
    grad_clip: float = bounded(1.0, NON_NEGATIVE)  # max grad norm (0 = off)
    subset_prob: float = bounded(0.5, UNIT)  # augmentation: P(train on a random sub-head of k' in [1, k] classes)
    log_every: int = bounded(100, POSITIVE)  # steps between loss logs
    cpu_threads: int = bounded(0, NON_NEGATIVE)  # torch intra-op threads while training on CPU (0 = torch's default); 1
                                                 # is ~3.7x faster than 2 when the 2 cores are shared with other
                                                 # processes
    # training mix of class prompts (fedtina/tina/prompt.py), per class token: P(name only), P(example images only)
    # and P(both); image prompts are the mean of n in 1..max_shots zoo-part images' features
    prompt_text: float = bounded(0.4, UNIT)
    prompt_images: float = bounded(0.3, UNIT)
    prompt_both: float = bounded(0.3, UNIT)
    max_shots: int = bounded(16, POSITIVE)
    objective: str = "diffusion"      # diffusion | regress (the same network fit by plain regression of the head
                                      # on the prompt: one forward pass, no noise; the bench's tina_regress)
    prompt_sentences: float = bounded(0.0, UNIT)  # P(a text prompt in training is the class's description instead of
                                                  # its name; needs dataset.descriptions)


@dataclass
class BenchConfig:
    num_tasks: int = bounded(100, POSITIVE)  # per task set (ID and OOD)
    k: int = bounded(10, POSITIVE)    # classes per task
    ood_unseen: int = bounded(3, NON_NEGATIVE)  # unseen classes in each OOD task
    # Tina's head + local fine-tuning on the task's zoo images; select: hyper-parameters picked on hold-outs of those
    # images, as for the oracle (keeping Tina's head is a candidate)
    tina_ft: HeadTrainConfig = field(default_factory=lambda: HeadTrainConfig(steps=10, select=True))
    seed: int = bounded(1, NON_NEGATIVE)  # task sampling (different from the zoo's seed)
    shots: list = field(default_factory=lambda: [1, 2, 5, 10, "all"])   # labelled images per class from each task's
                                      # zoo part (fedtina/tina/shots.py); [] = off
    samples: int = bounded(8, POSITIVE)  # tina_best_of_n / tina_mean_of_n: generation seeds per task
    rival_hidden_share: float = bounded(0.5, UNIT)  # the gidaris row's training (fedtina/tina/rival.py): P(a class
                                      # token of a training task is fake-novel: its known row never reaches the rival);
                                      # drawn among the novel classes (protocol.novel_share) when there are any


@dataclass
class AnalysisConfig:
    """`python -m fedtina.experiments.analyses`: which of the paper's analyses, over which values (configs/analysis/)."""
    name: str = "classes"             # classes | zoo_size | tina_size | sample_steps | descriptions
    values: list = field(default_factory=lambda: [2, 5, 10, 20])


@dataclass
class LimitsConfig:
    """Bounds on what a user, a client or a file hands fedtina, checked where the input is read: past them a hostile
    or mistaken input would cost minutes or gigabytes before failing (or never fail)."""
    max_name_chars: int = bounded(200, POSITIVE)            # one class name (folders, names files, descriptions)
    max_description_chars: int = bounded(10_000, POSITIVE)  # one free-text description (a label set, a sentence)
    max_clients: int = bounded(1_000_000, POSITIVE)         # simulate's clients (~37 KB of driver memory each)


@dataclass
class CoreConfig:
    """Everything `build_assets` needs: dataset -> split -> backbone -> features -> zoo -> Tina."""
    dataset: DatasetConfig = field(default_factory=lambda: from_dict(DatasetConfig, {}))   # the default dataset's
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    tina: TinaConfig = field(default_factory=TinaConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache_dir: str | None = None      # default: $FEDTINA_CACHE or ~/.cache/fedtina

    @property
    def cache_path(self) -> Path:
        return resolve_cache_dir(self.cache_dir)


def core_config(cfg: dict[str, Any]) -> CoreConfig:
    """The CoreConfig inside a larger resolved config (simulate's, a bench's): its sections, the rest ignored."""
    names = {f.name for f in dataclasses.fields(CoreConfig)}
    return from_dict(CoreConfig, {k: v for k, v in cfg.items() if k in names})


def resolve_cache_dir(cache_dir: str | None) -> Path:
    path = Path(cache_dir or os.environ.get("FEDTINA_CACHE") or Path.home() / ".cache" / "fedtina").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, key: str = "") -> T:
    """Build dataclass `cls` from a plain dict (the section at dotted `key`), recursing into nested dataclasses. Every
    value is checked against its field's type and range; unknown keys are an error. A class with a `variant(data)`
    classmethod is built as the subclass it names (DatasetConfig: the registered dataset's options)."""
    prefix = f"{key}." if key else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        names = sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        raise FedtinaError(f"{key or cls.__name__}={show(data)} is invalid: must be a section of options {names}")
    if hasattr(cls, "variant"):
        cls = cls.variant(data)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FedtinaError(f"unknown {key or cls.__name__} option(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        tp, where = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, where)
        else:
            kwargs[name] = check_value(where, value, tp, fields[name].metadata.get("range"))
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# One value against its type: bools are not numbers here (clients=true must not run as 1 client)

_KINDS: dict[Any, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)),
    str: ("a string", lambda v: isinstance(v, str)),
    type(None): ("null", lambda v: v is None),
}


def _alternatives(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _fits(value: Any, tp: Any) -> bool:
    if len(_alternatives(tp)) > 1:
        return any(_fits(value, a) for a in _alternatives(tp))
    if tp is list or typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_fits(v, a) for a in typing.get_args(tp)[:1] for v in value)
    return tp not in _KINDS or _KINDS[tp][1](value)   # Any and other types: not checked here


def _describe(tp: Any, rng: Range | None = None) -> str:
    """What a valid value is, in words: "an integer > 0", "a string or null", "a list of integers"."""
    if len(_alternatives(tp)) > 1:
        return " or ".join(_describe(a, rng) for a in _alternatives(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    what = _KINDS[tp][0] if tp in _KINDS else "a list" if tp is list else str(tp)
    return f"{what} {rng}" if rng and tp in (int, float) else what


def show(value: Any) -> str:
    """A value as it would be written in a Hydra override (true, null, 'abc', 2.5)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


def check_value(key: str, value: Any, tp: Any, rng: Range | None = None) -> Any:
    """`value` (at dotted `key`) if it has type `tp` and, when a number, lies in `rng`; else one FedtinaError line.
    Values are returned as given (an int stays an int in a float field: the cache keys hash them as written)."""
    if isinstance(value, str) and value == MISSING:
        raise FedtinaError(f"{key} is required (it is ??? in the config): set it, e.g. {key}=...")
    in_range = rng is None or not isinstance(value, numbers.Real) or isinstance(value, bool) or value in rng
    if not _fits(value, tp) or not in_range:
        raise FedtinaError(f"{key}={show(value)} is invalid: must be {_describe(tp, rng)}")
    return value


def _register_resolvers() -> None:
    """`${fedtina_pid:}` for Hydra run dirs: two runs started in the same second get their own dir (and
    `fedtina.runtime.rundir` refuses a dir that another process is using)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("fedtina_pid"):
        OmegaConf.register_new_resolver("fedtina_pid", lambda: str(os.getpid()))


_register_resolvers()
