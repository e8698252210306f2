"""Training Tina on a zoo of personalized heads, and its checkpoints (one safetensors file).

`train_tina(entries, encoder, cfg)` builds normalised token tensors from the zoo entries, embeds every unique class
name once, and trains the denoiser with AdamW (linear warmup, cosine decay), gradient clipping and an EMA of the
weights (the EMA is what generates). Augmentation: with probability ``cfg.subset_prob`` a task is replaced by a random
sub-head of k' in [1, k] of its classes (rows of a fine-tuned head are a fine target for the smaller task), so every
k up to ``max_classes`` is seen; batches are padded to the largest k in the batch and masked.

Default size (TinaConfig): d_model 128, depth 4, 4 heads, batch 64 tasks, 1500 steps, lr 1e-3 (1.4M parameters with a
384-d text encoder). Measured on the shared 2-core CPU for 600 tasks of k = 10, d = 64: d_model 256 / depth 6 /
batch 128 (7.6M params) ran at 0.2 steps/s, far too slow; the default runs at ~7 steps/s with 1 thread, so 1500 steps
take ~3.5 min with other jobs on the cores (fewer on idle cores). Intra-op threading hurts on shared cores (2 threads
ran 3.7x slower than 1 under load): set ``cpu_threads=1`` there. On the fake zoos of the tests, x0-prediction reaches
a loss of ~0.02 in a few hundred steps, and a model of this size is not the bottleneck (the text -> row mapping is).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedtina.config import TinaConfig
from fedtina.data.descriptions import as_text_prompt
from fedtina.device import pick_device
from fedtina.errors import CorruptFileError, FedtinaError
from fedtina.io import atomic_write
from fedtina.progress import Meter
from fedtina.tina.diffusion import PREDICTIONS, NoiseSchedule, training_loss
from fedtina.tina.generator import TinaGenerator
from fedtina.tina.layout import BIAS_KEY, WEIGHT_KEY, GlobalSegment, ParamLayout
from fedtina.tina.model import TinaNet
from fedtina.tina.prompt import ShotBank, compose, prompt_dim, sample_kinds
from fedtina.zoo.heads import RowScale

CHECKPOINT_FORMAT = "fedtina.tina/3"   # 2: class prompts (text | images | both); 3: the zoo's classes and row scale


def build_model(cfg: TinaConfig, layout: ParamLayout, text_dim: int, image_dim: int) -> TinaNet:
    return TinaNet(layout.token_dim, prompt_dim(text_dim, image_dim), d_model=cfg.d_model, depth=cfg.depth,
                   num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_global_tokens=layout.num_global_tokens)


class Batch(NamedTuple):
    """A training batch: normalised tokens ``x0`` [B,N,T], a prompt [B,N,P] per token (`fedtina.tina.prompt`),
    the real-token mask."""

    x0: torch.Tensor
    prompt: torch.Tensor
    mask: torch.Tensor


class Episode(NamedTuple):
    """A batch of training tasks (Tina's input once `ZooTensors.batch` composes it; the Gidaris rival's as it is),
    [B, K] per class token: zoo entry ``idx`` [B], class
    name indices, real-token mask, normalised target tokens [B, K, T], text embeddings (the name's, or its
    description's), unit image embeddings [B, K, d] and which prompt parts are used."""

    idx: torch.Tensor
    names: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor
    text: torch.Tensor
    images: torch.Tensor
    use_text: torch.Tensor
    use_images: torch.Tensor


class ZooTensors:
    """The zoo as padded tensors: normalised class tokens, name indices, k per task, global tokens, text table,
    the zoo-part image features behind image prompts (`ShotBank`; without them every prompt is text only)."""

    def __init__(self, entries: Sequence[Any], encoder: Any, layout: ParamLayout,
                 shots: Mapping[str, np.ndarray] | None = None,
                 max_shots: int = 16, descriptions: Mapping[str, str] | None = None,
                 sentence_prob: float = 0.0, image_dim: int | None = None) -> None:
        if not entries:
            raise FedtinaError("cannot train Tina on an empty zoo")
        ks = [len(e.class_names) for e in entries]
        if min(ks) < 1:
            raise FedtinaError(f"zoo entry {ks.index(min(ks))} has no classes")
        names = sorted({n for e in entries for n in e.class_names})
        index = {n: i for i, n in enumerate(names)}
        table = np.asarray(encoder.embed_names(names), dtype=np.float32)
        if table.shape != (len(names), encoder.dim):
            raise FedtinaError(f"encoder {encoder.id} returned {table.shape} for {len(names)} names, dim {encoder.dim}")
        M, Kz, T, G = len(entries), max(ks), layout.token_dim, layout.num_global_tokens
        tokens = np.zeros((M, Kz, T), dtype=np.float32)
        name_idx = np.zeros((M, Kz), dtype=np.int64)
        glob = np.zeros((M, G, T), dtype=np.float32)
        for i, e in enumerate(entries):
            if len(set(e.class_names)) != len(e.class_names):
                raise FedtinaError(f"zoo entry {i} ({getattr(e, 'source', '?')}) has duplicated class names")
            try:
                c, g = layout.encode(e.params)
            except (KeyError, FedtinaError) as err:
                raise FedtinaError(f"zoo entry {i} ({getattr(e, 'source', '?')}): {err}") from err
            if len(c) != len(e.class_names):
                raise FedtinaError(f"zoo entry {i} has {len(e.class_names)} class names but {len(c)} head rows")
            tokens[i, : len(c)] = c
            name_idx[i, : len(c)] = [index[n] for n in e.class_names]
            glob[i] = g
        self.tokens, self.name_idx, self.glob = map(torch.from_numpy, (tokens, name_idx, glob))
        self.k = torch.tensor(ks, dtype=torch.long)
        self.text = torch.from_numpy(table)
        described = [n for n in names if n in (descriptions or {})] if sentence_prob > 0 else []
        self.sentences = torch.from_numpy(table.copy())   # a class's description's embedding (else its name's)
        if described:
            idx = [index[n] for n in described]
            self.sentences[idx] = torch.from_numpy(np.asarray(encoder.embed_names(
                [as_text_prompt(descriptions[n]) for n in described]), dtype=np.float32))
        self.has_sentence = torch.zeros(len(names), dtype=torch.bool)
        self.has_sentence[[index[n] for n in described]] = True
        self.any_sentence = bool(described)   # known here: asking the tensor would wait for the device every step
        self.sentence_prob = float(sentence_prob)
        self.names = names
        self.image_dim = int(image_dim or layout.feature_dim)   # width of the image prompts' features
        self.shots = ShotBank(shots, names, self.image_dim, max_shots) if shots is not None else None
        self.class_mean = torch.from_numpy(np.asarray(layout.class_mean, np.float32))
        self.class_std = torch.from_numpy(np.asarray(layout.class_std, np.float32))

    def to(self, device: torch.device) -> "ZooTensors":
        for attr in ("tokens", "name_idx", "glob", "k", "text", "sentences", "has_sentence", "class_mean",
                     "class_std"):
            setattr(self, attr, getattr(self, attr).to(device))
        if self.shots is not None:
            self.shots.to(device)
        return self

    def sample(self, batch_size: int, max_classes: int, subset_prob: float, gen: torch.Generator,
               mix: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> Batch:
        """A batch (x0 [B,N,T], prompt [B,N,P], mask [B,N]) with N = G + largest k' in the batch;
        each class token's prompt is text, images or both with probabilities `mix` (text only without shots)."""
        return self.batch(self.episode(batch_size, max_classes, subset_prob, gen, mix))

    def episode(self, batch_size: int, max_classes: int, subset_prob: float, gen: torch.Generator,
                mix: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> Episode:
        """`batch_size` random zoo tasks (a random sub-task with P(subset_prob)), classes in random order, prompts
        drawn from `mix`."""
        dev = self.tokens.device
        M, Kz = self.name_idx.shape
        idx = torch.randint(0, M, (batch_size,), generator=gen, device=dev)
        k = self.k[idx]
        sub = torch.rand(batch_size, generator=gen, device=dev) < subset_prob
        k_sub = (torch.rand(batch_size, generator=gen, device=dev) * k).long().clamp_max(k - 1) + 1  # U[1, k]
        k = torch.where(sub, k_sub, k).clamp_max(max_classes)
        # random order of each task's real classes first, padding last; keep the first k
        scores = torch.rand(batch_size, Kz, generator=gen, device=dev)
        scores = scores.masked_fill(torch.arange(Kz, device=dev)[None] >= self.k[idx][:, None], 2.0)
        K = int(k.max())
        perm = scores.argsort(dim=1)[:, :K]
        tokens = torch.gather(self.tokens[idx], 1, perm[..., None].expand(-1, -1, self.tokens.shape[-1]))
        names = torch.gather(self.name_idx[idx], 1, perm)
        mask = torch.arange(K, device=dev)[None] < k[:, None]
        text, images, use_text, use_images = self._prompts(names, mix, gen)
        return Episode(idx, names, mask, tokens * mask[..., None], text, images, use_text, use_images)

    def batch(self, ep: Episode) -> Batch:
        """Tina's input for an episode: prompts composed, global tokens first."""
        prompt = compose(ep.text, ep.images, ep.use_text, ep.use_images) * ep.mask[..., None]
        x0 = ep.tokens
        G = self.glob.shape[1]
        if G:
            B = len(ep.idx)
            x0 = torch.cat([self.glob[ep.idx], x0], dim=1)
            prompt = torch.cat([prompt.new_zeros(B, G, prompt.shape[-1]), prompt], dim=1)
            mask = torch.cat([ep.mask.new_ones(B, G), ep.mask], dim=1)
            return Batch(x0, prompt, mask)
        return Batch(x0, prompt, ep.mask)

    def _prompts(self, names: torch.Tensor, mix: tuple[float, float, float],
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text [B,K,E], images [B,K,d], use_text, use_images) of every class token."""
        text = self.text[names]
        if self.any_sentence:   # a text prompt is the class's description with probability sentence_prob
            said = (torch.rand(names.shape, generator=gen, device=names.device) < self.sentence_prob)
            text = torch.where((said & self.has_sentence[names])[..., None], self.sentences[names], text)
        if self.shots is None:
            return (text, torch.zeros(*names.shape, self.image_dim, device=names.device),
                    torch.ones_like(names, dtype=torch.bool), torch.zeros_like(names, dtype=torch.bool))
        use_text, use_images = sample_kinds(names.shape, mix, gen, names.device)
        images, available = self.shots.sample(names, gen)
        use_images = use_images & available
        return text, images, use_text | ~use_images, use_images


OBJECTIVES = ("diffusion", "regress")


def image_width(shots: Mapping[str, np.ndarray] | None, default: int) -> int:
    """The feature width of the image prompts in `shots` (the backbone's, or e.g. CLIP's image tower's)."""
    widths = {np.asarray(x).shape[-1] for x in (shots or {}).values() if np.asarray(x).ndim == 2 and len(x)}
    if len(widths) > 1:
        raise FedtinaError(f"image prompts: the classes' features have different widths {sorted(widths)}")
    return widths.pop() if widths else int(default)


def check_objective(cfg: TinaConfig) -> None:
    if cfg.prediction not in PREDICTIONS:
        raise FedtinaError(f"TinaConfig.prediction must be one of {PREDICTIONS}, got {cfg.prediction!r}")
    if cfg.objective not in OBJECTIVES:
        raise FedtinaError(f"TinaConfig.objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    if cfg.objective == "regress" and cfg.prediction != "x0":
        raise FedtinaError("TinaConfig.objective=regress predicts the head itself: it needs prediction=x0")


class TinaTrainer:
    """Holds the network, its EMA, the optimiser and the zoo tensors; `fit()` trains and returns a TinaGenerator."""

    def __init__(self, entries: Sequence[Any], encoder: Any, cfg: TinaConfig,
                 global_segments: Sequence[GlobalSegment] = (), log: Callable[[str], Any] | None = print,
                 init: TinaGenerator | None = None, shots: Mapping[str, np.ndarray] | None = None,
                 descriptions: Mapping[str, str] | None = None) -> None:
        """``init``: warm start from a trained generator's weights, keeping its layout and normalisation statistics
        (refitting them would change what the weights mean) and its known classes and row scale;
        ``global_segments`` is then taken from it.
        ``shots``: {class name: zoo-part image features [n, d]} for image prompts (None: text prompts only).
        ``descriptions``: {class name: sentence}, the text prompt of a class token with P(cfg.prompt_sentences)."""
        check_objective(cfg)
        entries = list(entries)
        if not entries:
            raise FedtinaError("cannot train Tina on an empty zoo")
        self.cfg, self.encoder, self.log = cfg, encoder, log or (lambda _msg: None)
        self.device = pick_device(cfg.device)
        d = np.asarray(entries[0].params[WEIGHT_KEY]).shape[-1]
        if init is not None:
            if init.layout.feature_dim != d:
                raise FedtinaError(f"warm start: the generator makes heads of dim {init.layout.feature_dim}, "
                                   f"the zoo has dim {d}")
            self.layout = init.layout
        else:
            self.layout = ParamLayout(d, global_segments).fit(e.params for e in entries)
        self.image_dim = image_width(shots, init.image_dim if init is not None else self.layout.feature_dim)
        if init is not None and init.image_dim != self.image_dim:
            raise FedtinaError(f"warm start: the generator's image prompts are {init.image_dim}-d, these shots "
                               f"{self.image_dim}-d")
        if cfg.prompt_sentences > 0 and not descriptions:
            raise FedtinaError("TinaConfig.prompt_sentences > 0 needs class descriptions (dataset.descriptions)")
        self.data = ZooTensors(entries, encoder, self.layout, shots, cfg.max_shots, descriptions,
                               cfg.prompt_sentences, self.image_dim).to(self.device)
        self.mix = (cfg.prompt_text, cfg.prompt_images, cfg.prompt_both)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.layout, int(encoder.dim), self.image_dim).to(self.device)
        if init is not None:
            try:
                self.model.load_state_dict(init.model.state_dict())
            except RuntimeError as err:
                raise FedtinaError(f"warm start: the generator's network does not match this TinaConfig "
                                   f"(d_model/depth/heads/encoder dim): {err}") from err
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params, self.ema_params = list(self.model.parameters()), list(self.ema.parameters())
        self.schedule = NoiseSchedule(cfg.timesteps, cfg.schedule)
        # a warm start (a federation's refresh) keeps which classes get imprinted rows: a class the uploads brought
        # has a few rows at most, and generated rows did not carry to classes the prepared zoo lacked
        self.known, self.row_scale = (init.known, init.row_scale) if init is not None else \
            zoo_row_scale(entries, shots, self.layout.feature_dim, self.image_dim)
        # fused on CUDA (one kernel for every tensor); on the CPU the default loop: fused there measured 3x faster
        # but not bit-identical, and CPU training must stay reproducible bit for bit (the cached Tina, the runs)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=self.device.type == "cuda")
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step = 0
        self.history: list[tuple[int, float]] = []   # (step, mean loss since the previous log)

    def _last_t(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), self.cfg.timesteps - 1, dtype=torch.long, device=self.device)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def train_step(self) -> torch.Tensor:
        """One optimiser step and EMA update; returns the batch's loss as a 0-d tensor on the device, unread: the
        step queues its work without waiting for the device (only the padded length of the batch, a shape, is read
        back, in `ZooTensors.sample`)."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        batch = self.data.sample(cfg.batch_size, cfg.max_classes, cfg.subset_prob, self.gen, self.mix)
        model = self.model
        if cfg.objective == "regress":   # the same network without diffusion: zero input at the last step
            x0_hat = model(torch.zeros_like(batch.x0), self._last_t(len(batch.x0)), batch.prompt, batch.mask)
            m = batch.mask[..., None].to(x0_hat.dtype)
            loss = ((x0_hat - batch.x0) ** 2 * m).sum() / (m.sum() * batch.x0.shape[-1]).clamp_min(1.0)
        else:
            loss = training_loss(model, batch.x0, batch.prompt, batch.mask, self.schedule, cfg.prediction,
                                 generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)

    def fit(self, steps: int | None = None) -> TinaGenerator:
        cfg = self.cfg
        steps = cfg.train_steps if steps is None else steps
        n_params = sum(p.numel() for p in self.params)
        self.log(f"tina: {len(self.data.k)} tasks, {len(self.data.names)} classes, {self.layout!r}, "
                 f"{n_params / 1e6:.2f}M params, {steps} steps x {cfg.batch_size} tasks on {self.device}")
        self.model.train()
        threads_before = torch.get_num_threads()
        if self.device.type == "cpu" and cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        try:
            t0, t_last, n = time.perf_counter(), time.perf_counter(), 0
            # the losses add up on the device, in float64 (the sum Python floats gave), read once per log line
            acc = torch.zeros((), dtype=torch.float64, device=self.device)
            every = max(1, cfg.log_every)
            end = self.step + steps
            meter = Meter(steps, "tina", unit="steps", lines=False)   # its log lines below say it off a terminal
            while self.step < end:
                acc += self.train_step()
                n += 1
                meter.update()
                if self.step % every == 0 or self.step == end:
                    mean = acc.item() / n
                    now = time.perf_counter()
                    self.history.append((self.step, mean))
                    self.log(f"tina step {self.step}/{end} loss {mean:.4f} lr {self.lr_at(self.step - 1):.2e} "
                             f"{n / (now - t_last):.1f} steps/s")
                    t_last, n = now, 0
                    acc.zero_()
            meter.close()
            self.log(f"tina: trained {steps} steps in {time.perf_counter() - t0:.1f}s")
        finally:
            torch.set_num_threads(threads_before)
        return self.generator()

    def generator(self) -> TinaGenerator:
        """A TinaGenerator over (a copy of) the current EMA weights."""
        return TinaGenerator(copy.deepcopy(self.ema).eval(), self.layout, self.encoder, self.cfg, device=self.device,
                             image_dim=self.image_dim, known=self.known, row_scale=self.row_scale)


def zoo_row_scale(entries: Sequence[Any], shots: Mapping[str, np.ndarray] | None, feature_dim: int,
                  image_dim: int) -> tuple[tuple[str, ...], RowScale | None]:
    """The zoo's classes, and the RowScale of its rows over its images (`fedtina.tina.generator`: where a class no
    zoo head holds gets its imprinted row); no scale without image prompts in the heads' feature space."""
    known = tuple(sorted({n for e in entries for n in e.class_names}))
    feats = [np.asarray(x, np.float32) for x in (shots or {}).values() if len(x)]
    if not feats or image_dim != feature_dim:
        return known, None
    weight = np.concatenate([np.asarray(e.params[WEIGHT_KEY], np.float32) for e in entries])
    bias = np.concatenate([np.asarray(e.params[BIAS_KEY], np.float32) for e in entries])
    return known, RowScale.of(weight, bias, np.concatenate(feats))


def train_tina(entries: Sequence[Any], encoder: Any, cfg: TinaConfig, log: Callable[[str], Any] | None = print,
               global_segments: Sequence[GlobalSegment] = (), init: TinaGenerator | None = None,
               shots: Mapping[str, np.ndarray] | None = None,
               descriptions: Mapping[str, str] | None = None) -> TinaGenerator:
    """Train Tina on zoo entries (`ZooEntry`: class_names, params with head.weight/head.bias) -> TinaGenerator.
    ``init``: continue from a trained generator (same architecture; its layout statistics are kept).
    ``shots``: {class name: zoo-part image features} behind image prompts (None: text prompts only).
    ``descriptions``: {class name: sentence} for training on descriptions (cfg.prompt_sentences)."""
    return TinaTrainer(entries, encoder, cfg, global_segments=global_segments, log=log, init=init,
                       shots=shots, descriptions=descriptions).fit()


def refresh(tina: TinaGenerator, entries: Sequence[Any], steps: int, shots: Mapping[str, np.ndarray] | None = None,
            descriptions: Mapping[str, str] | None = None, seed: int | None = None) -> TinaGenerator:
    """A federation's Tina refresh: `steps` more training steps on the grown zoo, warm-started from `tina` (its
    weights and normalisation), warm-up shortened to the refresh. One thread: the cores are shared with the clients,
    and one-thread CPU training is bit-reproducible (a resumed run refreshes exactly as an uninterrupted one).
    `seed` (default: Tina's own) draws the refresh's batches and noise."""
    cfg = dataclasses.replace(tina.cfg, train_steps=int(steps), cpu_threads=1,
                              warmup_steps=min(int(tina.cfg.warmup_steps), max(1, int(steps) // 5)),
                              seed=tina.cfg.seed if seed is None else int(seed))
    return train_tina(entries, tina.encoder, cfg, log=None, init=tina, shots=shots, descriptions=descriptions)


# -------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, generator: TinaGenerator) -> Path:
    """One safetensors file: ``model.*`` (EMA weights) + ``layout.*`` (statistics); config JSON in the metadata.
    Written atomically (temporary file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().float().cpu().contiguous() for k, v in generator.model.state_dict().items()}
    tensors.update({f"layout.{k}": torch.from_numpy(np.ascontiguousarray(v))
                    for k, v in generator.layout.state_tensors().items()})
    scale = generator.row_scale
    if scale is not None:
        tensors["row_scale.center"] = torch.from_numpy(np.ascontiguousarray(scale.center, np.float32))
    enc = generator.encoder
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(dataclasses.asdict(generator.cfg)),
        "layout": json.dumps(generator.layout.spec()),
        "encoder_id": str(enc.id),
        "encoder_dim": str(int(enc.dim)),
        "image_dim": str(int(generator.image_dim)),
        "text_template": json.dumps(getattr(enc, "template", None)),
        "known": json.dumps(sorted(generator.known)),
        "row_scale": json.dumps(None if scale is None else {"norm": scale.norm, "offset": scale.offset}),
        "sha256": _tensor_digest(tensors),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), fsync=True)


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (catches garbled data that still parses)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a checkpoint (cheap: reads only the header); CorruptFileError if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Tina checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(f"Tina checkpoint {path} is unreadable ({err}); delete it and retrain") from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(f"{path} is not a Tina checkpoint (format {meta.get('format')!r}, "
                               f"expected {CHECKPOINT_FORMAT!r}); delete it and retrain")
    return meta


def load_checkpoint(path: str | Path, encoder: Any, device: str | None = None) -> TinaGenerator:
    """Checkpoint -> TinaGenerator using ``encoder`` (must be the encoder it was trained with). Config keys and
    layout tensors this version does not know (e.g. of the removed residual mode) are ignored.

    Raises FileNotFoundError if missing, CorruptFileError (naming the path) if truncated, garbled or missing tensors,
    and FedtinaError if ``encoder``'s id, dim or template differ from the training encoder's."""
    path = Path(path)
    meta = read_checkpoint_metadata(path)
    try:
        tensors = load_file(str(path))
        digest = _tensor_digest(tensors)
        if digest != meta.get("sha256"):
            raise ValueError(f"tensor checksum {digest[:12]} does not match the recorded {meta.get('sha256', '')[:12]}")
        cfg_dict = json.loads(meta["config"])
        known = {f.name for f in dataclasses.fields(TinaConfig)}
        cfg = TinaConfig(**{k: v for k, v in cfg_dict.items() if k in known})
        spec = json.loads(meta["layout"])
        enc_id, enc_dim = meta["encoder_id"], int(meta["encoder_dim"])
        image_dim = int(meta.get("image_dim", spec["feature_dim"]))
        template = json.loads(meta.get("text_template", "null"))
        layout_t = {k[len("layout."):]: v.numpy() for k, v in tensors.items() if k.startswith("layout.")}
        missing = {"class_mean", "class_std", "global_mean", "global_std"} - set(layout_t)
        if missing:
            raise KeyError(f"layout tensors {sorted(missing)}")
        layout = ParamLayout.from_spec(spec, layout_t)
        known, scale = json.loads(meta["known"]), json.loads(meta["row_scale"])
        if scale is not None:
            scale = RowScale(tensors["row_scale.center"].numpy(), float(scale["norm"]), float(scale["offset"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, FedtinaError) as err:
        raise CorruptFileError(f"Tina checkpoint {path} is corrupt ({type(err).__name__}: {err}); "
                               f"delete it and retrain") from err

    if str(encoder.id) != enc_id or int(encoder.dim) != enc_dim:
        raise FedtinaError(f"Tina checkpoint {path} was trained with text encoder {enc_id!r} (dim {enc_dim}), "
                           f"but got {encoder.id!r} (dim {encoder.dim}); use that encoder or retrain Tina")
    enc_template = getattr(encoder, "template", None)
    if template is not None and enc_template is not None and enc_template != template:
        raise FedtinaError(f"Tina checkpoint {path} was trained with text template {template!r}, "
                           f"but the encoder uses {enc_template!r}; use that template or retrain Tina")

    model = build_model(cfg, layout, enc_dim, image_dim)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CorruptFileError(f"Tina checkpoint {path} does not match its config ({err}); delete it and retrain") from err
    return TinaGenerator(model, layout, encoder, cfg, device=device, image_dim=image_dim, known=known,
                         row_scale=scale)
