"""Typed configuration shared by every stage. Hydra YAML under `configs/` mirrors these dataclasses field for field;
`from_dict` turns a (resolved) Hydra node into them and rejects unknown keys by name."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedtina.errors import FedtinaError


@dataclass
class DatasetConfig:
    name: str = "shapes"              # shapes (embedded, offline) | cifar100 | folder
    path: str | None = None           # folder: a directory or .zip of class folders; cifar100: download root
    names_file: str | None = None     # folder: optional "id<TAB>readable name" lines
    download: bool = True             # cifar100: try torchvision's download (fails fast offline)
    images_per_class: int = 240       # shapes only
    seed: int = 0                     # shapes: generation seed
    descriptions: str | None = None   # a sentence per class as an alternative text prompt: "generated" (shapes) or
                                      # a file of "name<TAB>sentence" lines (fedtina/data/descriptions.py)


@dataclass
class ProtocolConfig:
    seen_fraction: float = 0.8        # classes the generic model and the zoo may use
    backbone_fraction: float = 0.5    # per class: images for the generic model
    zoo_fraction: float = 0.25        # per class: images for zoo heads and clients; the rest is test
    seed: int = 0


@dataclass
class BackboneConfig:
    arch: str = "resnet20"
    width: int = 16                   # channels of the first stage (16 -> 64-d features for ResNet-20)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"           # auto (bf16 where the CPU/GPU runs it natively) | fp32 | bf16


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
    steps: int = 100
    lr: float = 0.05
    l2_to_init: float = 1e-3          # pull toward the initial (generic) rows
    weight_decay: float = 0.0
    select: bool = False              # client fine-tuning only: pick steps/lr/l2 on a hold-out of the client's own
                                      # training images (heads.oracle_search; keeping the received head is a candidate)


@dataclass
class ZooConfig:
    num_tasks: int = 600
    k_min: int = 10                   # classes per task, sampled uniformly in [k_min, k_max]
    k_max: int = 10
    seed: int = 0
    finetune: HeadTrainConfig = field(default_factory=HeadTrainConfig)


@dataclass
class TinaConfig:
    max_classes: int = 20             # largest label set Tina generates (tokens are masked beyond k)
    d_model: int = 128                # sized so training takes ~2-3 min on 2 CPU cores (fedtina/tina/train.py)
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    timesteps: int = 1000             # DDPM training steps
    sample_steps: int = 20            # DDIM steps at generation time
    train_steps: int = 1500
    batch_size: int = 64              # tasks per step
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    schedule: str = "cosine"          # noise schedule: cosine | linear
    prediction: str = "x0"            # network target: x0 | v | eps (x0 samples best in few DDIM steps)
    ema_decay: float = 0.999          # EMA of weights, used for sampling (warmed up: min(decay, (1+s)/(10+s)))
    warmup_steps: int = 100           # linear LR warmup, then cosine decay to 0
    weight_decay: float = 0.0         # AdamW
    grad_clip: float = 1.0            # max grad norm (0 = off)
    subset_prob: float = 0.5          # augmentation: P(train on a random sub-head of k' in [1, k] classes)
    log_every: int = 100              # steps between loss logs
    cpu_threads: int = 0              # torch intra-op threads while training on CPU (0 = torch's default); 1 is
                                      # ~3.7x faster than 2 when the 2 cores are shared with other processes
    prompt_text: float = 0.4          # training mix of class prompts (fedtina/tina/prompt.py): P(name only),
    prompt_images: float = 0.3        # P(example images only) and P(both), per class token; image prompts are the
    prompt_both: float = 0.3          # mean of n in 1..max_shots zoo-part images' features
    max_shots: int = 16
    objective: str = "diffusion"      # diffusion | regress (the same network fit by plain regression of the head
                                      # on the prompt: one forward pass, no noise; the bench's tina_regress)
    prompt_sentences: float = 0.0     # P(a text prompt in training is the class's description instead of its name;
                                      # needs dataset.descriptions)


@dataclass
class BenchConfig:
    num_tasks: int = 100              # per task set (ID and OOD)
    k: int = 10
    ood_unseen: int = 3               # unseen classes in each OOD task
    tina_ft: HeadTrainConfig = field(default_factory=lambda: HeadTrainConfig(steps=10))
    seed: int = 1
    shots: list = field(default_factory=lambda: [1, 2, 5, 10, "all"])   # labelled images per class (fedtina/tina/shots.py)
    samples: int = 8                  # tina_best_of_n / tina_mean_of_n: generation seeds per task


@dataclass
class AnalysisConfig:
    """`python -m fedtina.experiments.analyses`: which of the paper's analyses, over which values (configs/analysis/)."""
    name: str = "classes"             # classes | zoo_size | tina_size | sample_steps | descriptions
    values: list = field(default_factory=lambda: [2, 5, 10, 20])


@dataclass
class CoreConfig:
    """Everything `build_assets` needs: dataset -> split -> backbone -> features -> zoo -> Tina."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    tina: TinaConfig = field(default_factory=TinaConfig)
    cache_dir: str | None = None

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


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build dataclass `cls` from a plain dict, recursing into nested dataclasses; unknown keys are an error."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FedtinaError(f"unknown {cls.__name__} option(s) {unknown}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        kwargs[name] = from_dict(type(default), value) if dataclasses.is_dataclass(default) else value
    return cls(**kwargs)


def _register_resolvers() -> None:
    """`${fedtina_pid:}` for Hydra run dirs: two runs started in the same second get their own dir (and
    `fedtina.runtime.rundir` refuses a dir that another process is using)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("fedtina_pid"):
        OmegaConf.register_new_resolver("fedtina_pid", lambda: str(os.getpid()))


_register_resolvers()
