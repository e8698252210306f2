"""Private uploads: the Gaussian mechanism on what a client sends, and its (epsilon, delta) from Flower's RDP
accountant.

Zoo uploads: the client clips the difference between its fine-tuned head and the head the server sent it (weight and
bias together) to L2 norm `upload_clip` and adds N(0, (upload_noise * upload_clip)^2) to every entry. The sent head
is a function of the client's description alone, so the upload is one release of the Gaussian mechanism over the
client's images: client-level (epsilon, delta) for those images, `upload_epsilon`. Not covered: the description
(the class names are sent in the clear), the accuracies a client reports, and which clients took part.

FedAvg-family rounds: Flower's client-side fixed clipping (`fixedclipping_mod`, clipping each update to
`fedavg_clip`) and `DifferentialPrivacyClientSideFixedClipping` (noise `fedavg_noise * fedavg_clip / m` on the mean
of m updates, uniformly weighted). `fedavg_epsilon` composes the rounds without amplification by sampling; it holds
for the model the server releases, not for the per-round metrics clients report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtina.config import NON_NEGATIVE, Range, bounded
from fedtina.zoo.heads import Head


@dataclass
class PrivacyConfig:
    upload_clip: float = bounded(0.0, NON_NEGATIVE)  # zoo uploads: L2 bound on (uploaded - received head); 0 = uploads
                                                     # are not private
    upload_noise: float = bounded(0.0, NON_NEGATIVE)  # noise multiplier: std = upload_noise * upload_clip
    fedavg_clip: float = bounded(0.0, NON_NEGATIVE)  # FedAvg-family updates: Flower's fixedclipping_mod norm; 0 = off
    fedavg_noise: float = bounded(0.0, NON_NEGATIVE)  # noise multiplier of Flower's DP strategy wrapper on the
                                                      # aggregate
    delta: float = bounded(1.0e-5, Range(0, 1, open_lo=True, open_hi=True))  # the delta every epsilon is reported at

    @property
    def uploads(self) -> bool:
        return self.upload_clip > 0

    @property
    def fedavg(self) -> bool:
        return self.fedavg_clip > 0


def clip_and_noise(received: Head, uploaded: Head, clip: float, noise: float,
                   rng: np.random.Generator) -> Head:
    """`uploaded` with its difference from `received` (rows matched by name, both in `uploaded`'s order) clipped to
    L2 norm `clip` and Gaussian noise of std `noise * clip` added to every entry."""
    order = [received.class_names.index(n) for n in uploaded.class_names]
    base_w = np.asarray(received.weight, np.float64)[order]
    base_b = np.asarray(received.bias, np.float64)[order]
    dw = np.asarray(uploaded.weight, np.float64) - base_w
    db = np.asarray(uploaded.bias, np.float64) - base_b
    norm = float(np.sqrt((dw ** 2).sum() + (db ** 2).sum()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise * clip
    w = base_w + dw * scale + rng.normal(0.0, std, dw.shape)
    b = base_b + db * scale + rng.normal(0.0, std, db.shape)
    return Head(uploaded.class_names, w.astype(np.float32), b.astype(np.float32))


def _rdp_epsilon(noise: float, releases: int, delta: float, sample: int, population: int) -> float:
    from flwr.serverapp import NeighboringRelation, PrivacyConfig as FlowerPrivacy, RdpAccountant, SamplingMethod
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    acc = RdpAccountant(FlowerPrivacy(target_delta=delta, population_size=population,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for _ in range(releases):
        acc.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=sample, population_size=population))
    return float(acc.get_privacy_spent().epsilon)


def upload_epsilon(cfg: PrivacyConfig) -> float:
    """A client's epsilon (at `cfg.delta`) for its one upload; inf without noise."""
    if not cfg.uploads or cfg.upload_noise <= 0:
        return float("inf")
    return _rdp_epsilon(cfg.upload_noise, 1, cfg.delta, 1, 1)


def fedavg_epsilon(cfg: PrivacyConfig, rounds: int, sampled: int, population: int) -> float:
    """Epsilon of the FedAvg model after `rounds` rounds of `sampled` of `population` clients; inf without noise."""
    if not cfg.fedavg or cfg.fedavg_noise <= 0:
        return float("inf")
    return _rdp_epsilon(cfg.fedavg_noise, rounds, cfg.delta, sampled, population)
