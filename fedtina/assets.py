"""Build (or reuse from the cache) everything downstream code needs, in the order data flows:
dataset -> protocol split -> generic backbone + feature bank -> text encoder -> zoo -> Tina.

Each cached product is keyed by every setting that changes it, built under the cache lock (`fedtina.io.cache_lock`:
two processes with one config build it once and share it), written whole or not at all, and never modified
afterwards; damage found when a product is opened is a CorruptFileError naming the file or directory to delete."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedtina.features.backbone import FeatureBank, build_feature_bank, feature_cache_key
from fedtina.config import CoreConfig, TinaConfig
from fedtina.data import ImageDataset, load_dataset
from fedtina.data.descriptions import load_descriptions
from fedtina.errors import CorruptFileError
from fedtina.io import atomic_write, cache_lock
from fedtina.data.split import ProtocolSplit, check_task_size, make_split
from fedtina.features.text import CachedTextEncoder, make_encoder
from fedtina.tina.generator import TinaGenerator
from fedtina.zoo.store import ZooStore, build_zoo


@dataclass
class Assets:
    cfg: CoreConfig
    dataset: ImageDataset
    split: ProtocolSplit
    bank: FeatureBank
    encoder: CachedTextEncoder
    zoo: ZooStore
    zoo_dir: Path
    tina: TinaGenerator
    tina_path: Path
    timings: dict[str, float]
    prompt_features: np.ndarray   # [N, D] features of every image behind image prompts (encoder.image_prompts)

    @property
    def shots(self) -> dict[str, np.ndarray]:
        return zoo_shots(self.dataset, self.split, self.prompt_features)

    @property
    def descriptions(self) -> dict[str, str]:
        """{class name: sentence} of dataset.descriptions ({} without)."""
        return load_descriptions(self.cfg.dataset.descriptions, self.dataset.class_names)

    def tina_variant(self, log: Callable[[str], None] = print, **changes) -> TinaGenerator:
        """Another Tina on the same zoo, with `changes` to the TinaConfig (cached by its own key): the bench's
        tina_regress and the analyses' Tina sizes."""
        tina_cfg = dataclasses.replace(self.cfg.tina, **changes)
        return load_or_train_tina(self.cfg, tina_cfg, self.encoder, self.zoo, self.zoo_dir, self.dataset,
                                  self.split, self.prompt_features, log)[0]


def zoo_shots(ds: ImageDataset, split: ProtocolSplit, features: np.ndarray) -> dict[str, np.ndarray]:
    """{seen class name: prompt features of its zoo-part images}: the example images behind Tina's image prompts
    in training (the zoo heads' own images; unseen classes never)."""
    labels, zoo_idx = np.asarray(ds.labels), np.asarray(split.zoo_idx)
    return {ds.class_names[int(c)]: np.asarray(features[zoo_idx[labels[zoo_idx] == c]]) for c in split.seen}


IMAGE_PROMPTS = ("backbone", "clip")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:   # a file object: np.save would append ".npy" to a temporary file's name
        np.save(f, array)


def prompt_features(cfg: CoreConfig, ds: ImageDataset, bank: FeatureBank, encoder: CachedTextEncoder,
                    bank_key: str, log: Callable[[str], None]) -> np.ndarray:
    """Features of every image for image prompts: the backbone's (the space the head's rows live in), or the open_clip
    image tower's (encoder=clip; one pass over the dataset, cached beside the feature bank)."""
    if cfg.encoder.image_prompts == "backbone":
        return np.asarray(bank.features)
    path = cfg.cache_path / "features" / bank_key / f"image-prompts-{encoder.encoder.id}.npy"
    with cache_lock(path):
        if not path.exists():
            t0 = time.perf_counter()
            feats = np.asarray(encoder.encoder.encode_images(ds.images), np.float32)
            atomic_write(path, lambda tmp: _save_npy(tmp, feats))
            log(f"[features] {encoder.encoder.id} image tower: {feats.shape} in {time.perf_counter() - t0:.1f}s")
    feats = np.load(path)
    if feats.shape[0] != len(ds.images):
        raise CorruptFileError(f"{path} holds {feats.shape[0]} image features for {len(ds.images)} images; delete it")
    return feats


def zoo_key(cfg: CoreConfig, ds: ImageDataset, split: ProtocolSplit) -> str:
    """The feature bank's key (dataset, split, every backbone hyper-parameter), then the zoo's size, k range and seed
    (readable), then a hash of every ZooConfig field (the fine-tuning recipe too): each zoo.num_tasks has its own
    zoo."""
    z = cfg.zoo
    digest = hashlib.sha256(json.dumps(asdict(z), sort_keys=True).encode()).hexdigest()[:8]
    return f"{feature_cache_key(ds, split, cfg.backbone)}-n{z.num_tasks}-k{z.k_min}_{z.k_max}s{z.seed}-{digest}"


def novel_classes(ds: ImageDataset, split: ProtocolSplit) -> list[str]:
    """The split's novel classes (`protocol.novel_share`): zoo classes the generic model never trained on, the
    preferred fake-novel classes of the Gidaris rival (fedtina/tina/rival.py)."""
    return [ds.class_names[int(c)] for c in split.novel]


def tina_key(tina_cfg: TinaConfig, encoder: CachedTextEncoder, num_entries: int,
             descriptions: dict[str, str] | None = None, image_prompts: str = "backbone") -> str:
    """Every TinaConfig field that changes the trained weights, hashed (device, logging and threads do not), the
    checkpoint format (a cached Tina of an older format is not found, so it is retrained, not misread), the class
    descriptions when Tina trains on them, and the image prompts' features when they are not the backbone's."""
    from fedtina.tina.train import CHECKPOINT_FORMAT

    skip = ("device", "log_every", "cpu_threads")
    fields = {k: v for k, v in asdict(tina_cfg).items() if k not in skip} | {"format": CHECKPOINT_FORMAT}
    if tina_cfg.prompt_sentences > 0:
        fields["descriptions"] = sorted((descriptions or {}).items())
    if image_prompts != "backbone":
        fields["image_prompts"] = image_prompts
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return f"{encoder.id}-n{num_entries}-{digest}"


def load_or_train_tina(cfg: CoreConfig, tina_cfg: TinaConfig, encoder: CachedTextEncoder, zoo: ZooStore,
                       zoo_dir: Path, ds: ImageDataset, split: ProtocolSplit, features: np.ndarray,
                       log: Callable[[str], None]) -> tuple[TinaGenerator, Path]:
    """The Tina of `tina_cfg` on this zoo: loaded from the cache, or trained and saved (under the cache lock)."""
    from fedtina.tina.train import load_checkpoint, save_checkpoint, train_tina

    tina = None
    descriptions = load_descriptions(cfg.dataset.descriptions, ds.class_names) if tina_cfg.prompt_sentences else {}
    key = tina_key(tina_cfg, encoder, len(zoo), descriptions, cfg.encoder.image_prompts)
    path = cfg.cache_path / "tina" / zoo_dir.name / f"{key}.safetensors"
    if not path.exists():
        with cache_lock(path):
            if not path.exists():  # another process may have trained it while we waited
                tina = train_tina(zoo.entries(), encoder, tina_cfg, log=log, shots=zoo_shots(ds, split, features),
                                  descriptions=descriptions)
                save_checkpoint(path, tina)
                log(f"[tina] trained and saved {path}")
    if tina is None:
        tina = load_checkpoint(path, encoder)  # CorruptFileError naming it when damaged
        log(f"[tina] loaded {path}")
    return tina, path


def build_assets(cfg: CoreConfig, log: Callable[[str], None] = print, with_tina: bool = True) -> Assets:
    """Everything is cached under cfg.cache_path; a second call with the same config loads in seconds."""
    cache = cfg.cache_path
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = load_dataset(cfg.dataset, cache)
    split = make_split(ds, cfg.protocol)
    check_task_size(split, cfg.zoo.k_max, "zoo.k_max", cfg.protocol.novel_share)   # before the backbone trains
    timings["dataset_s"] = time.perf_counter() - t0
    log(f"[data] {ds.name}: {len(ds.images)} images, {ds.num_classes} classes "
        f"({len(split.seen)} seen, of which {len(split.novel)} novel, {len(split.unseen)} unseen)")

    t0 = time.perf_counter()
    bank = build_feature_bank(ds, split, cfg.backbone, cache, log=log)
    timings["backbone_features_s"] = time.perf_counter() - t0

    encoder = make_encoder(cfg.encoder, cache, cfg.limits.max_description_chars)
    zoo_dir = cache / "zoo" / zoo_key(cfg, ds, split)
    t0 = time.perf_counter()
    zoo = build_zoo(zoo_dir, bank, split, ds.class_names, ds.labels, cfg.zoo, log=log)  # checked (sha256) every time
    timings["zoo_s"] = time.perf_counter() - t0
    log(f"[zoo] {len(zoo)} heads in {zoo_dir}")

    features = prompt_features(cfg, ds, bank, encoder, feature_cache_key(ds, split, cfg.backbone), log)
    tina, tina_path = None, None
    if with_tina:
        t0 = time.perf_counter()
        tina, tina_path = load_or_train_tina(cfg, cfg.tina, encoder, zoo, zoo_dir, ds, split, features, log)
        timings["tina_s"] = time.perf_counter() - t0
    return Assets(cfg, ds, split, bank, encoder, zoo, zoo_dir, tina, tina_path, timings, features)
