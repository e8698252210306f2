"""The image model of the methods that train on raw images (fedavg_full, FedProx, FedPer, FedRep, FedBABU, Ditto,
FedRoD): a ResNet-20 state dict, split into the *body* (every array but `fc.*`) and a linear *head* (`fc.weight`,
`fc.bias`). The head may be C-way (row c = dataset class c, a global head) or k-way (rows in the client's class order,
a personal head); the model is sized from the state itself.

One training loop serves every method (`train`): which parts learn, an optional proximal pull toward an anchor state
(FedProx, Ditto) and an optional logit adjustment (FedRoD's balanced softmax) are its arguments. Head-only steps run
on body features with the head math of fedtina.zoo.heads (`features` + `finetune_local`): cheaper than backpropagating
through a frozen body, and the same objective without augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedtina.config import POSITIVE, bounded
from fedtina.config import BackboneConfig
from fedtina.errors import FedtinaError, UnknownClassError
from fedtina.zoo.heads import Head

if TYPE_CHECKING:
    import torch

HEAD_KEYS = ("fc.weight", "fc.bias")
HEAD_KIND = "linear"   # the image models' heads are linear layers (HEAD_KEYS), whatever the generic model's classifier


@dataclass
class LocalTraining:
    """A round's local training on images (the options every image method starts from)."""

    epochs: int = bounded(1, POSITIVE)  # local epochs per round
    lr: float = bounded(0.05, POSITIVE)  # SGD, momentum 0.9, weight decay 5e-4
    batch_size: int = bounded(32, POSITIVE)

    def kwargs(self) -> dict:
        return {"epochs": int(self.epochs), "lr": float(self.lr), "batch_size": int(self.batch_size)}


def split(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Head]:
    """(body arrays, head) of a state; the head's class names are left empty (the caller knows them)."""
    body = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    w, b = np.asarray(state["fc.weight"], np.float32), np.asarray(state["fc.bias"], np.float32)
    return body, Head(tuple(str(i) for i in range(len(w))), w, b)


def join(body: dict[str, np.ndarray], head: Head) -> dict[str, np.ndarray]:
    return {**body, "fc.weight": np.asarray(head.weight, np.float32), "fc.bias": np.asarray(head.bias, np.float32)}


def rows(head: Head, class_ids, class_names) -> Head:
    """The k-way head made of a C-way head's rows `class_ids`, named `class_names`."""
    from fedtina.client.ops import restrict_head

    return restrict_head(head.weight, head.bias, tuple(class_ids), tuple(class_names))


def build(state: dict[str, np.ndarray], arch: str = "resnet20") -> "torch.nn.Module":
    """A backbone of `arch` sized from the state itself (classes from `fc.weight`, width from the stem)."""
    import torch

    from fedtina.features.backbone import build_backbone

    if "fc.weight" not in state:
        raise FedtinaError(f"model state has no 'fc.weight' (keys: {sorted(state)[:5]}...)")
    width = int(state["stem.0.weight"].shape[0]) if "stem.0.weight" in state else int(state["fc.weight"].shape[1]) // 4
    model = build_backbone(BackboneConfig(arch=arch, width=width, classifier=HEAD_KIND),
                           num_classes=int(state["fc.weight"].shape[0]))
    model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in state.items()}, strict=True)
    return model


def to_numpy(model: "torch.nn.Module") -> dict[str, np.ndarray]:
    """All entries as float32 (BatchNorm's int64 `num_batches_tracked` included) so FedAvg can average every array;
    load_state_dict casts them back."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def init_state(num_classes: int, cfg: BackboneConfig, seed: int = 0,
               backbone_path: str | None = None) -> dict[str, np.ndarray]:
    """A fresh `cfg.arch` with a linear `num_classes`-way fc (seeded), warm-started from the generic backbone at
    `backbone_path` (all weights but the fc, pixel normalisation included) when given."""
    import torch

    from fedtina.features.backbone import build_backbone, load_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(BackboneConfig(arch=cfg.arch, width=cfg.width, classifier=HEAD_KIND),
                               num_classes=num_classes)
    if backbone_path is not None:
        generic = load_backbone(backbone_path, "cpu").state_dict()
        model.load_state_dict({k: v for k, v in generic.items() if not k.startswith("fc.")}, strict=False)
    return to_numpy(model)


def _sgd_step(params: list, momenta: list, lr: float, weight_decay: float, momentum: float = 0.9) -> None:
    """SGD with momentum, weight decay on weights only (ndim > 1). Hand-written because building a torch.optim
    optimizer imports torch._dynamo on first use (4+ s per Ray actor process on a small CPU)."""
    import torch

    with torch.no_grad():
        for p, buf in zip(params, momenta):
            if p.grad is None:
                continue
            g = p.grad.add(p, alpha=weight_decay) if p.ndim > 1 and weight_decay else p.grad
            buf.mul_(momentum).add_(g)
            p.sub_(buf, alpha=lr)


def train(state: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float,
          batch_size: int, train_body: bool = True, train_head: bool = True, mu: float = 0.0,
          anchor: dict[str, np.ndarray] | None = None, logit_adjust: np.ndarray | None = None,
          weight_decay: float = 5e-4, seed: int = 0, device: str = "cpu") -> dict[str, np.ndarray]:
    """`epochs` of SGD (momentum 0.9, crop+flip augmentation) on uint8 [n, H, W, 3] `images`, `labels` = fc rows.

    `train_body` / `train_head` pick what learns (a frozen body keeps its BatchNorm statistics too). With `mu` > 0
    the loss adds mu/2 * ||w - anchor||^2 over the learning arrays (FedProx, Ditto; `anchor` is a state of the same
    shapes). `logit_adjust` [C] is added to the logits in the loss only (FedRoD's balanced softmax: log class
    prior, -inf for absent classes). A ragged last batch of one image is skipped (BatchNorm cannot train on it).
    Returns a new state (see `to_numpy`); the inputs are not modified."""
    import torch
    import torch.nn.functional as F

    from fedtina.features.backbone import _to_nchw, augment

    if mu > 0 and anchor is None:
        raise FedtinaError("a proximal term (mu > 0) needs an anchor state")
    dev = torch.device(device)
    model = build(state).to(dev)
    model.train(train_body)   # a frozen body runs in eval mode: its BatchNorm statistics stay as received
    for name, p in model.named_parameters():
        p.requires_grad_(train_head if name in HEAD_KEYS else train_body)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not len(labels):
        return to_numpy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = [torch.as_tensor(np.asarray(anchor[n], np.float32), device=dev) for n in names] if mu > 0 else []
    adjust = None if logit_adjust is None else torch.as_tensor(np.asarray(logit_adjust, np.float32), device=dev)
    x_all = _to_nchw(np.asarray(images)).to(dev)
    y_all = torch.as_tensor(np.array(labels, dtype=np.int64)).to(dev)
    if int(y_all.max()) >= model.fc.out_features:
        raise UnknownClassError(f"label {int(y_all.max())} has no row in the model's fc ({model.fc.out_features})")
    momenta = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    n, bs = len(y_all), max(1, int(batch_size))
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            if len(idx) < 2 and train_body:
                continue
            logits = model(augment(x_all[idx], gen))
            loss = F.cross_entropy(logits if adjust is None else logits + adjust, y_all[idx])
            if ref:
                loss = loss + 0.5 * mu * sum(((p - r) ** 2).sum() for p, r in zip(params, ref))
            model.zero_grad(set_to_none=True)
            loss.backward()
            _sgd_step(params, momenta, lr, weight_decay)
    return to_numpy(model)


def features(body: dict[str, np.ndarray], images: np.ndarray, device: str = "cpu",
             batch_size: int = 256) -> np.ndarray:
    """float32 [n, d] penultimate features of `images` under `body` (eval mode)."""
    import torch

    from fedtina.features.backbone import _to_nchw

    width = int(body["stem.0.weight"].shape[0])
    if not len(images):
        return np.zeros((0, 4 * width), np.float32)
    state = {**body, "fc.weight": np.zeros((1, 4 * width), np.float32), "fc.bias": np.zeros(1, np.float32)}
    model = build(state).to(torch.device(device)).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = _to_nchw(np.asarray(images[start : start + batch_size])).to(device)
            out.append(model.features(x).float().cpu().numpy())
    return np.concatenate(out)


def accuracy(state: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray, rows_: tuple[int, ...] | None = None,
             device: str = "cpu") -> float:
    """Top-1 accuracy of the model on `images`, over fc rows `rows_` (a C-way model scored k-way; labels are then
    positions in `rows_`), or over every row. 0.0 on an empty set."""
    if len(labels) == 0:
        return 0.0
    body, head = split(state)
    w, b = head.weight, head.bias
    if rows_ is not None:
        w, b = w[list(rows_)], b[list(rows_)]
    logits = features(body, images, device) @ w.T + b
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))
