"""The frozen feature extractor: a CIFAR-style ResNet-20 trained once on the seen classes ("the generic model"; not on
the split's novel classes), and the feature bank that caches its features for every image of the dataset, so later
stages never run a convolution again.

Its classifier (`backbone.classifier`) is `linear` or `cosine` (Gidaris & Komodakis 2018; Qi et al. 2018): with
cosine, `features` are L2-normalised and logits are `scale * cos(feature, row)` with one learned scale, so the
generic rows, as a linear head on those features, are the unit rows times that scale (zero bias): one scale that
imprinted, generated and retrieved rows can share.

Models take raw pixels (uint8 or float in 0..255, NCHW) and normalise them with per-channel statistics stored as
buffers, so a checkpoint is self-contained: inference needs only uint8 images.

Speed on a CPU: convolutions run channels-last and, where the CPU has native bfloat16 (AVX512-BF16 / AMX), under
bfloat16 autocast (`autocast_dtype`). Optional `cfg.precision` ("auto" | "fp32" | "bf16") is read if the config has it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedtina.config import BackboneConfig
from fedtina.data.base import ImageDataset
from fedtina.device import pick_device
from fedtina.errors import CorruptFileError, FedtinaError, UnknownClassError
from fedtina.io import atomic_write, cache_lock
from fedtina.progress import Meter

if TYPE_CHECKING:
    from fedtina.data.split import ProtocolSplit

Log = Callable[[str], None]
FORMAT_VERSION = 1  # bump when the checkpoint / feature-bank layout changes; it is part of the cache key
CLASSIFIERS = ("linear", "cosine")
LEGACY_CLASSIFIER = "linear"   # checkpoints and cache keys from before `backbone.classifier` existed are linear
COSINE_INIT_SCALE = 10.0       # the cosine classifier's learned scale starts here (Gidaris & Komodakis 2018)


# --------------------------------------------------------------------------------------------------------------------
# Models


class ImageBackbone(nn.Module):
    """Base class: raw pixels -> normalised input -> `embed` (subclass) -> features -> `fc` logits.

    `pixel_mean` / `pixel_std` are buffers (0..255 units), saved with the weights, so callers pass raw images."""

    feature_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.full((3,), 127.5))
        self.register_buffer("pixel_std", torch.full((3,), 64.0))

    def set_normalization(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.pixel_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.pixel_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels -> standardised float. NHWC input (last dim 3, as images are stored) is transposed to NCHW."""
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        return (x.float() - self.pixel_mean[None, :, None, None]) / self.pixel_std[None, :, None, None]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels [N, 3, H, W] or [N, H, W, 3] (uint8 or float, 0..255) -> features [N, feature_dim]
        (L2-normalised under a cosine classifier: the features every head is given)."""
        f = self.embed(self.normalize(x))
        return F.normalize(f.float(), dim=1) if self.classifier == "cosine" else f   # unit in fp32, under bf16 too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    @property
    def classifier(self) -> str:
        return "cosine" if isinstance(self.fc, CosineClassifier) else "linear"

    def head_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The classifier as a linear head on `features`: (weight [C, d], bias [C]) float32."""
        w, b = self.fc.rows() if isinstance(self.fc, CosineClassifier) else (self.fc.weight, self.fc.bias)
        return w.detach().float().cpu().numpy(), b.detach().float().cpu().numpy()


class CosineClassifier(nn.Module):
    """logits = scale * cos(x, row): unit features times unit rows, one learned scale, no bias."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1) / in_features ** 0.5)
        self.scale = nn.Parameter(torch.tensor(COSINE_INIT_SCALE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same logits as a linear layer on unit features: rows scale * unit(weight), zero bias."""
        return self.scale * F.normalize(self.weight, dim=1), self.weight.new_zeros(self.out_features)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and a residual; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ImageBackbone):
    """He et al. (2016) CIFAR ResNet-(6n+2): a 3x3 stem, 3 stages of n basic blocks at widths w, 2w, 4w (strides 1, 2,
    2), global average pooling, a linear `fc`. n=3 is ResNet-20 (0.27 M params at w=16), features are 4w-dimensional."""

    def __init__(self, num_classes: int, width: int = 16, blocks_per_stage: int = 3) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, c_in = [], width
        for i, c_out in enumerate(widths):
            for j in range(blocks_per_stage):
                layers.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.feature_dim = widths[-1]
        self.fc = nn.Linear(self.feature_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each residual branch: every block starts as identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


BACKBONES: dict[str, Callable[[int, int], ImageBackbone]] = {}


def register_backbone(name: str) -> Callable:
    """Decorator: `@register_backbone("resnet32") def f(num_classes, width) -> ImageBackbone`."""

    def wrap(fn: Callable[[int, int], ImageBackbone]) -> Callable[[int, int], ImageBackbone]:
        BACKBONES[name] = fn
        return fn

    return wrap


@register_backbone("resnet20")
def resnet20(num_classes: int, width: int = 16) -> ImageBackbone:
    return CifarResNet(num_classes, width, blocks_per_stage=3)


@register_backbone("resnet32")
def resnet32(num_classes: int, width: int = 16) -> ImageBackbone:
    return CifarResNet(num_classes, width, blocks_per_stage=5)


def build_backbone(cfg: BackboneConfig, num_classes: int) -> ImageBackbone:
    """A fresh (untrained) backbone of `cfg.arch` with a `cfg.classifier` head; unknown names list the valid ones."""
    if cfg.arch not in BACKBONES:
        raise FedtinaError(f"unknown backbone arch {cfg.arch!r}; valid: {sorted(BACKBONES)}")
    if cfg.classifier not in CLASSIFIERS:
        raise FedtinaError(f"backbone.classifier={cfg.classifier!r} is invalid; valid: {list(CLASSIFIERS)}")
    model = BACKBONES[cfg.arch](num_classes, cfg.width)
    if cfg.classifier == "cosine":
        model.fc = CosineClassifier(model.feature_dim, num_classes)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Training


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype for training and feature extraction: `auto` -> bfloat16 where the hardware runs it natively
    (CUDA with bf16, or a CPU with AVX512-BF16/AMX: ~1.8x faster ResNet-20 training, ~3.5x faster extraction on the
    dev box), else fp32 (None). `fp32` / `bf16` force it. Parameters, BN statistics and the optimizer stay fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise FedtinaError(f"unknown backbone precision {precision!r}; valid: ['auto', 'bf16', 'fp32']")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def _to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] numpy -> uint8 [N, 3, H, W] tensor (contiguous; uint8 keeps host->device copies small)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (0..255 units) of uint8 [N, H, W, 3] images, accumulated in float64 by chunks."""
    total, sq, count = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(images), 4096):
        x = images[i : i + 4096].reshape(-1, 3).astype(np.float64)
        total, sq, count = total + x.sum(0), sq + (x * x).sum(0), count + len(x)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(sq / max(count, 1) - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1.0).astype(np.float32)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding `pad`) and horizontal flip of a uint8 NCHW batch, vectorised, driven by `gen`
    (a CPU generator, so the augmentation stream is the same on CPU and CUDA)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)                       # [n, h]
    cols = ox[:, None] + torch.arange(w, device=x.device)                       # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def remap_labels(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Class ids -> positions in `classes` (row i of the generic head is class classes[i]); -1 for other classes."""
    lookup = np.full(int(max(labels.max(initial=0), classes.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    return lookup[labels]


def _backbone_training_set(ds: ImageDataset, split: "ProtocolSplit") -> tuple[np.ndarray, np.ndarray]:
    """The images the generic model may see: `split.backbone_idx` restricted to its classes (`backbone_classes`: the
    seen ones less the novel ones); labels 0..len(backbone_classes)-1."""
    idx = np.asarray(split.backbone_idx, dtype=np.int64)
    y = remap_labels(ds.labels[idx], np.asarray(split.backbone_classes, dtype=np.int64))
    keep = y >= 0
    if not keep.any():
        raise FedtinaError(f"{ds.name}: split.backbone_idx holds no image of a backbone class; nothing to train on")
    return ds.images[idx[keep]], y[keep]


def train_generic(
    ds: ImageDataset, split: "ProtocolSplit", cfg: BackboneConfig, device: torch.device | str | None = None,
    log: Log = print,
) -> ImageBackbone:
    """Train the generic model on `split.backbone_idx` images of `split.backbone_classes` (never on zoo or test
    images, never on a novel class).

    SGD (momentum 0.9, Nesterov), per-step cosine LR from `cfg.lr` to 0, weight decay on conv/linear weights only,
    random crop + flip. Deterministic given `cfg.seed` on the CPU (init, shuffling and augmentation are seeded)."""
    device = pick_device(cfg.device) if device is None else torch.device(device)
    images, labels = _backbone_training_set(ds, split)
    mean, std = channel_stats(images)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = build_backbone(cfg, num_classes=len(split.backbone_classes))
    model.set_normalization(mean, std)
    model.to(device, memory_format=torch.channels_last)  # NHWC convolutions: ~1.3x faster on CPU and on GPU
    amp = autocast_dtype(device, getattr(cfg, "precision", "auto"))

    x_all, y_all = _to_nchw(images).to(device), torch.from_numpy(labels).to(device)
    n, bs = len(y_all), min(cfg.batch_size, len(y_all))
    steps_per_epoch = max(1, n // bs)  # drop the ragged last batch: BatchNorm dislikes tiny batches
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    log(f"backbone: training {cfg.arch} (width {cfg.width}, {cfg.classifier} classifier) on {n} images of "
        f"{len(split.backbone_classes)} classes ({len(split.novel)} novel seen classes held out), "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps, device {device}, {amp or torch.float32}")
    meter = Meter(cfg.epochs, "backbone", unit="epochs", lines=False)   # the epoch lines below say it off a terminal
    for epoch in range(cfg.epochs):
        model.train()
        t0, loss_sum, correct = time.perf_counter(), torch.zeros((), device=device), torch.zeros((), device=device)
        perm = torch.randperm(n, generator=gen).to(device)
        for step in range(steps_per_epoch):
            b = perm[step * bs : (step + 1) * bs]
            xb, yb = augment(x_all[b], gen).contiguous(memory_format=torch.channels_last), y_all[b]
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(b)
            correct += (logits.argmax(1) == yb).sum()
        seen_n = steps_per_epoch * bs
        log(f"backbone epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum.item() / seen_n:.3f} "
            f"train acc {correct.item() / seen_n:.3f} ({time.perf_counter() - t0:.1f}s)")
        meter.update()
    meter.close()
    return model.to(memory_format=torch.contiguous_format).eval()


# --------------------------------------------------------------------------------------------------------------------
# Inference, checkpoints


@torch.no_grad()
def extract_features(model: ImageBackbone, images_uint8: np.ndarray, device: torch.device | str | None = None,
                     batch_size: int = 512, precision: str = "auto") -> np.ndarray:
    """Frozen features (eval mode, no grad) of uint8 [N, H, W, 3] images -> float32 [N, d].

    Runs channels-last, in bfloat16 where the hardware has it (`precision`, as in training: 3.5x faster than fp32 on
    an AVX512-BF16 CPU, relative feature error ~0.2%, the precision the model was trained in). The same call on the
    same machine gives the same features, so clients and the feature bank agree. Restores train/eval mode;
    `device=None` uses the model's device."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    amp = autocast_dtype(device, precision)
    was_training = model.training
    model.eval().to(device, memory_format=torch.channels_last)
    out = np.empty((len(images_uint8), model.feature_dim), dtype=np.float32)
    for i in range(0, len(images_uint8), batch_size):
        x = _to_nchw(images_uint8[i : i + batch_size]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            feats = model.features(x.contiguous(memory_format=torch.channels_last))
        out[i : i + len(x)] = feats.float().cpu().numpy()
    model.to(memory_format=torch.contiguous_format).train(was_training)
    return out


@dataclass
class BackboneSpec:
    """What a checkpoint needs besides its tensors; stored as JSON in the safetensors metadata."""

    arch: str
    width: int
    num_classes: int
    feature_dim: int
    pixel_mean: list[float]
    pixel_std: list[float]
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    classifier: str = LEGACY_CLASSIFIER


def save_backbone(model: ImageBackbone, path: Path, arch: str, width: int, extra: dict | None = None) -> None:
    """Weights + buffers (incl. normalisation) as safetensors; BackboneSpec JSON in the metadata. Atomic."""
    from safetensors.torch import save_file

    spec = BackboneSpec(arch, width, model.fc.out_features, model.feature_dim,
                        model.pixel_mean.tolist(), model.pixel_std.tolist(), extra=extra or {},
                        classifier=model.classifier)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"fedtina.features.backbone": json.dumps(asdict(spec))}),
                 fsync=True)


def backbone_tensors(path: Path | str) -> tuple[dict[str, np.ndarray], str]:
    """A checkpoint's tensors (numpy) and its BackboneSpec JSON, e.g. to embed the backbone in another safetensors file
    (see `backbone_from_tensors`). Missing or unreadable files -> CorruptFileError naming the path."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"backbone checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = (f.metadata() or {})["fedtina.features.backbone"]
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors header errors, a missing spec
        raise CorruptFileError(f"backbone checkpoint {path} is corrupt or not a fedtina backbone "
                               f"({type(e).__name__}: {e}); delete it to retrain") from e
    return tensors, meta


def backbone_from_tensors(tensors: dict[str, np.ndarray | torch.Tensor], meta: str,
                          device: torch.device | str = "cpu") -> ImageBackbone:
    """Rebuild a backbone (eval mode, on `device`) from its tensors and BackboneSpec JSON; mismatches ->
    CorruptFileError."""
    try:
        spec = BackboneSpec(**json.loads(meta))
        model = build_backbone(BackboneConfig(arch=spec.arch, width=spec.width, classifier=spec.classifier),
                               spec.num_classes)
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, strict=True)
    except Exception as e:  # bad JSON, unknown arch, missing keys, shape mismatches
        raise CorruptFileError(f"backbone tensors do not match their spec ({type(e).__name__}: {e})") from e
    return model.to(torch.device(device)).eval()


def load_backbone(path: Path | str, device: torch.device | str = "cpu", classifier: str | None = None) -> ImageBackbone:
    """A saved backbone in eval mode on `device`. Missing, truncated or mismatched files -> CorruptFileError; a
    checkpoint whose classifier is not `classifier` (when given) -> FedtinaError: its features and generic rows are
    on another scale than the config's, and mixing them would go unnoticed."""
    tensors, meta = backbone_tensors(path)
    try:
        model = backbone_from_tensors(tensors, meta, device)
    except CorruptFileError as e:
        raise CorruptFileError(f"backbone checkpoint {path}: {e}; delete it to retrain") from e
    if classifier is not None and model.classifier != classifier:
        raise FedtinaError(f"backbone checkpoint {path} has a {model.classifier} classifier but "
                           f"backbone.classifier={classifier}: delete it to retrain, or set "
                           f"backbone.classifier={model.classifier}")
    return model


# --------------------------------------------------------------------------------------------------------------------
# Feature bank


@dataclass
class FeatureBank:
    """Frozen backbone features of every image of a dataset, plus the generic head (one row per seen class)."""

    features: np.ndarray        # float32 [N, d], row i = image i of the dataset
    generic_weight: np.ndarray  # float32 [len(seen), d]
    generic_bias: np.ndarray    # float32 [len(seen)]
    seen: np.ndarray            # int64 class ids of the generic head (split.backbone_classes: the seen classes less
                                # the novel ones); row i of generic_* is class seen[i]
    backbone_path: Path         # safetensors of the trained backbone (load_backbone)
    meta: dict                  # cache key, dataset, config, training time, ...

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def generic_row(self, class_id: int) -> tuple[np.ndarray, float]:
        """(weight row [d], bias) of the generic head for one of its class ids; unseen and novel ids raise
        UnknownClassError."""
        hits = np.flatnonzero(self.seen == int(class_id))
        if len(hits) == 0:
            raise UnknownClassError(f"class id {class_id} is not a class of the generic model "
                                    f"({len(self.seen)} classes); it has no generic head row")
        i = int(hits[0])
        return self.generic_weight[i], float(self.generic_bias[i])


def feature_cache_key(ds: ImageDataset, split: "ProtocolSplit", cfg: BackboneConfig) -> str:
    """Readable and unique: dataset name + fingerprint, arch, width, epochs, seed, split key, and a short hash of the
    remaining training hyper-parameters (batch size, lr, weight decay, precision, the classifier unless it is the
    legacy linear one, so that keys from before the option stay valid), so changing them never reuses stale
    features. The device is not part of it."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", ds.name)
    hp = [cfg.batch_size, cfg.lr, cfg.weight_decay, getattr(cfg, "precision", "auto"), FORMAT_VERSION]
    hp = json.dumps(hp + ([cfg.classifier] if cfg.classifier != LEGACY_CLASSIFIER else []))
    hp = hashlib.sha256(hp.encode()).hexdigest()[:8]
    return f"{name}-{ds.fingerprint}-{cfg.arch}-w{cfg.width}-e{cfg.epochs}-s{cfg.seed}-{split.key}-{hp}"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load_bank(npz_path: Path, backbone_path: Path, n_images: int) -> FeatureBank:
    with np.load(npz_path, allow_pickle=False) as z:
        bank = FeatureBank(z["features"], z["generic_weight"], z["generic_bias"], z["seen"], backbone_path,
                           json.loads(str(z["meta"])))
    if bank.features.shape[0] != n_images:
        raise ValueError(f"{bank.features.shape[0]} feature rows for {n_images} images")
    return bank


def _cached_bank(npz_path: Path, backbone_path: Path, n_images: int, log: Log) -> FeatureBank | None:
    """The cached bank, checked against its backbone checkpoint; None when the .npz is missing or unreadable (it is
    then re-extracted from the checkpoint). A missing or altered checkpoint beside a readable .npz is a
    CorruptFileError: clients and generated classifiers run that checkpoint, and retraining it could change the
    features that the cached zoo and Tina were built on."""
    if not npz_path.is_file():
        return None
    t0 = time.perf_counter()
    try:
        bank = _load_bank(npz_path, backbone_path, n_images)
    except Exception as e:  # truncated, garbled, foreign: derived from the checkpoint, so re-extracted from it
        log(f"features: cached {npz_path} is unreadable ({type(e).__name__}: {e})")
        return None
    folder = npz_path.parent
    if not backbone_path.is_file():
        raise CorruptFileError(f"feature bank {npz_path} has no backbone checkpoint {backbone_path} beside it; "
                               f"delete {folder} to retrain both")
    recorded = bank.meta.get("backbone_sha256")  # absent in banks cached before it was recorded
    if recorded is not None and _file_sha256(backbone_path) != recorded:
        raise CorruptFileError(f"backbone checkpoint {backbone_path} fails its sha256 check against {npz_path}; "
                               f"delete {folder} to retrain both")
    log(f"features: loaded {folder.name} ({bank.features.shape}) in {time.perf_counter() - t0:.2f}s")
    return bank


def build_feature_bank(ds: ImageDataset, split: "ProtocolSplit", cfg: BackboneConfig, cache_dir: Path,
                       log: Log = print) -> FeatureBank:
    """Load the cached feature bank for (dataset, split, backbone config), or build it under the cache lock: train the
    generic model (unless its checkpoint is already cached), extract features of every image and cache both. The
    checkpoint is written first and the .npz last, so the .npz marks a complete entry, and a missing or damaged .npz
    beside a checkpoint (a crash in between, a truncated file) is re-extracted from it in seconds, not retrained."""
    key = feature_cache_key(ds, split, cfg)
    folder = Path(cache_dir) / "features" / key
    npz_path, backbone_path = folder / "features.npz", folder / "backbone.safetensors"
    bank = _cached_bank(npz_path, backbone_path, len(ds.images), log)
    if bank is not None:
        return bank
    with cache_lock(folder):
        if npz_path.is_file():  # another process may have built it while we waited
            bank = _cached_bank(npz_path, backbone_path, len(ds.images), lambda _m: None)
            if bank is not None:
                return bank
        return _build_bank(ds, split, cfg, key, npz_path, backbone_path, log)


def _build_bank(ds: ImageDataset, split: "ProtocolSplit", cfg: BackboneConfig, key: str, npz_path: Path,
                backbone_path: Path, log: Log) -> FeatureBank:
    """Features of every image from the cached checkpoint, or from a generic model trained (and cached) first."""
    device = pick_device(cfg.device)
    precision = getattr(cfg, "precision", "auto")
    amp = autocast_dtype(device, precision)
    t0 = time.perf_counter()
    if backbone_path.is_file():
        model = load_backbone(backbone_path, device, cfg.classifier)  # CorruptFileError naming it when damaged
        train_s = None
        log(f"features: re-extracting {npz_path} with the cached backbone {backbone_path}")
    else:
        model = train_generic(ds, split, cfg, device, log=log)
        save_backbone(model, backbone_path, cfg.arch, cfg.width,
                      extra={"seen": [int(c) for c in split.backbone_classes], "key": key})
        train_s = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    features = extract_features(model, ds.images, device, precision=precision)
    extract_s = time.perf_counter() - t1
    meta = {"key": key, "dataset": ds.name, "fingerprint": ds.fingerprint, "split": split.key,
            "backbone": asdict(cfg), "device": str(device), "precision": str(amp or torch.float32),
            "train_s": train_s, "extract_s": round(extract_s, 2), "format_version": FORMAT_VERSION,
            "backbone_sha256": _file_sha256(backbone_path)}
    bank = FeatureBank(features, *model.head_rows(), np.asarray(split.backbone_classes, dtype=np.int64),
                       backbone_path, meta)
    _save_npz(npz_path, features=bank.features, generic_weight=bank.generic_weight, generic_bias=bank.generic_bias,
              seen=bank.seen, meta=np.array(json.dumps(meta)))
    log(f"features: {features.shape} extracted in {extract_s:.1f}s, cached under {npz_path.parent}")
    return bank
