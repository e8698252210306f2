"""Poisoned uploads: what a malicious client sends instead of its honest head (a zoo upload) or its honest update
(a FedAvg-family round). Each attack is a pure function of the honest arrays and a seed, so the simulation's faults
(clients/client_app.py) and the attack experiment (fedtina/attacks.py) play exactly the same bad uploads.

Head attacks keep the client's class names (the gate checks names first, so a nameless attack is a malformed upload):
`label_flip` swaps one pair of rows (the smallest permutation), `permute` cycles every row, `sign_flip` negates the
head, `scale` multiplies it by `factor`, `random` sends random rows with the honest rows' norms, `targeted` replaces
one class's row (and bias) by another class's, so the target class is predicted as that one; `mislabeled` is played
by the client (it fine-tunes on labels moved to the next class, `mislabel`). The malformed kinds (`nan`, `huge`,
`shape`) test the gate's cheap checks.

Update attacks act on the difference u - g between the client's update u and the global arrays g it received:
`sign_flip` sends g - factor * (u - g), `scale` g + factor * (u - g), `random` g plus Gaussian noise with the honest
difference's norm x factor. With `collude` every attacker derives that noise from the same seed (one shared bad
direction), the case Krum's nearest-neighbour score is weakest against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtina.errors import FedtinaError
from fedtina.zoo.heads import Head

HEAD_ATTACKS = ("nan", "huge", "shape", "label_flip", "permute", "sign_flip", "scale", "random", "targeted",
                "mislabeled")
UPDATE_ATTACKS = ("sign_flip", "scale", "random")


@dataclass(frozen=True)
class Attack:
    kind: str
    factor: float = 3.0        # scale / sign_flip: the multiplier; random (updates): noise norm vs the honest step
    share: float = 0.5         # mislabeled: share of training labels moved to the next class
    target: int = 0            # targeted: position of the class whose row is replaced (mod k)
    collude: bool = False      # every attacker uses the same seed (the same bad direction / rows)


def check_attack(attack: Attack, kinds: tuple[str, ...] = HEAD_ATTACKS) -> None:
    if attack.kind not in kinds:
        raise FedtinaError(f"unknown attack kind {attack.kind!r}; valid: {', '.join(kinds)}")
    if not 0.0 <= attack.share <= 1.0:
        raise FedtinaError(f"attack share={attack.share}: must be in [0, 1]")


def flip_pair(k: int, seed: int) -> tuple[int, int]:
    """The two rows a `label_flip` upload swaps: positions seed mod k and the next one."""
    if k < 2:
        raise FedtinaError(f"label_flip needs at least 2 classes, the head has {k}")
    return seed % k, (seed + 1) % k


def targeted_pair(k: int, target: int) -> tuple[int, int]:
    """(the attacked position, the position whose row it receives)."""
    if k < 2:
        raise FedtinaError(f"a targeted attack needs at least 2 classes, the head has {k}")
    return target % k, (target + 1) % k


def poison_head(head: Head, attack: Attack, seed: int) -> Head:
    """The bad head sent instead of `head` (same class names, float32)."""
    check_attack(attack)
    w, b = np.array(head.weight, np.float32), np.array(head.bias, np.float32)
    k, kind = len(w), attack.kind
    if kind == "nan":
        w[0, 0] = np.nan
    elif kind == "huge":
        w *= 1e4
    elif kind == "shape":
        w = np.concatenate([w, np.ones((k, 1), np.float32)], axis=1)
    elif kind == "label_flip":
        pair = list(flip_pair(k, seed))
        w[pair], b[pair] = w[pair[::-1]], b[pair[::-1]]
    elif kind == "permute":
        order = np.roll(np.arange(k), 1)
        w, b = w[order], b[order]
    elif kind == "sign_flip":
        w, b = -w, -b
    elif kind == "scale":
        w, b = w * np.float32(attack.factor), b * np.float32(attack.factor)
    elif kind == "random":
        rng = np.random.default_rng(0 if attack.collude else seed)
        r = rng.standard_normal(w.shape).astype(np.float32)
        w = r * (np.linalg.norm(w, axis=1, keepdims=True) / np.linalg.norm(r, axis=1, keepdims=True))
        b = np.zeros_like(b)
    elif kind == "targeted":
        t, src = targeted_pair(k, attack.target)
        w[t], b[t] = w[src], b[src]
    else:   # mislabeled: the client fine-tunes on moved labels (`mislabel`); the head itself is its own
        raise FedtinaError("a mislabeled head is made by fine-tuning on mislabel()'s labels, not by poison_head")
    return Head(head.class_names, w.astype(np.float32), b.astype(np.float32))


def mislabel(y: np.ndarray, k: int, share: float, seed: int) -> np.ndarray:
    """`y` (positions 0..k-1) with round(share * n) labels, drawn at random, moved to the next class (j -> j+1 mod
    k): a client fine-tuning on systematically wrong labels."""
    if not 0.0 <= share <= 1.0:
        raise FedtinaError(f"mislabel share={share}: must be in [0, 1]")
    y = np.array(y, copy=True)
    flip = np.random.default_rng(seed).choice(len(y), size=int(round(share * len(y))), replace=False)
    y[flip] = (y[flip] + 1) % k
    return y


def poison_update(received: dict[str, np.ndarray], honest: dict[str, np.ndarray], attack: Attack,
                  seed: int) -> dict[str, np.ndarray]:
    """The bad update sent instead of `honest` (same keys, shapes and dtypes), relative to the `received` global
    arrays. Integer arrays (e.g. BatchNorm's step counters) are sent as received."""
    check_attack(attack, UPDATE_ATTACKS)
    rng = np.random.default_rng(0 if attack.collude else seed)
    out = {}
    for key, u in honest.items():
        g = np.asarray(received[key])
        if not np.issubdtype(np.asarray(u).dtype, np.floating):
            out[key] = np.array(g, copy=True)
            continue
        step = np.asarray(u, np.float64) - g
        if attack.kind == "sign_flip":
            bad = g - attack.factor * step
        elif attack.kind == "scale":
            bad = g + attack.factor * step
        else:
            noise = rng.standard_normal(step.shape)
            bad = g + noise * (attack.factor * np.linalg.norm(step) / max(np.linalg.norm(noise), 1e-12))
        out[key] = bad.astype(np.asarray(u).dtype)
    return out
