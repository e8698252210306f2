"""What Tina is told about a class: its name, a few example images, or both (the Tina paper's zero- and few-shot
prompts), as one conditioning vector per class token.

    prompt = [ text embedding * has_text | image embedding * has_images | has_text | has_images ]

The image embedding is the L2-normalised mean of the n shots' frozen-backbone features (the space the head's rows
live in), so its width is the head's feature dimension. The two flags tell the network which parts are present; an
absent part is zeros. One Tina trained on a mix of the three kinds (`TinaConfig.prompt_text / prompt_images /
prompt_both`, per class token at random, n drawn in 1..`max_shots`) serves every kind, and one batch may mix them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from fedtina.errors import FedtinaError

KINDS = ("text", "images", "both")


def prompt_dim(text_dim: int, feature_dim: int) -> int:
    return int(text_dim) + int(feature_dim) + 2


def image_embedding(shots: np.ndarray, feature_dim: int, where: str = "image prompt") -> np.ndarray:
    """[n, d] features of n >= 1 example images -> their L2-normalised mean [d]."""
    x = np.asarray(shots, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != feature_dim:
        raise FedtinaError(f"{where}: features of shape {x.shape}, expected [n, {feature_dim}] (the width of "
                           f"this Tina's image features: the backbone's, or the CLIP image tower's)")
    if len(x) == 0:
        raise FedtinaError(f"{where}: zero shots; give at least one image, or no image prompt for this class")
    if not np.isfinite(x).all():
        raise FedtinaError(f"{where}: features contain NaN or inf")
    m = x.mean(0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def compose(text: torch.Tensor, images: torch.Tensor, use_text: torch.Tensor,
            use_images: torch.Tensor) -> torch.Tensor:
    """[..., E] text, [..., d] image embeddings and [...] bool flags -> [..., E + d + 2] prompts."""
    ht, hi = use_text.to(text.dtype)[..., None], use_images.to(text.dtype)[..., None]
    return torch.cat([text * ht, images * hi, ht, hi], dim=-1)


class ShotBank:
    """Training-time image prompts: per class, the features of its zoo-part images, padded into one tensor so a
    batch of prompts (a random n in 1..max_shots of a class's images, averaged) is drawn in a few tensor ops.
    Classes without images (e.g. uploaded heads of classes the server has no images of) get text prompts only."""

    def __init__(self, shots: Mapping[str, np.ndarray], names: Sequence[str], feature_dim: int,
                 max_shots: int) -> None:
        arrays = [np.asarray(shots.get(n, np.zeros((0, feature_dim))), np.float32) for n in names]
        bad = [n for n, x in zip(names, arrays) if x.ndim != 2 or x.shape[1] != feature_dim]
        if bad:
            raise FedtinaError(f"image prompts: features of class(es) {bad[:5]} are not [n, {feature_dim}]")
        feats = np.zeros((len(names), max(1, max(len(x) for x in arrays)), feature_dim), dtype=np.float32)
        for i, x in enumerate(arrays):
            feats[i, : len(x)] = x
        self.feats = torch.from_numpy(feats)
        self.count = torch.tensor([len(x) for x in arrays], dtype=torch.long)
        self.max_shots = int(max_shots)

    def to(self, device: torch.device) -> "ShotBank":
        self.feats, self.count = self.feats.to(device), self.count.to(device)
        return self

    def sample(self, names: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N] name indices -> ([B, N, d] image embeddings of random shot subsets, n uniform in 1..max_shots
        capped by the class's images; [B, N] bool: the class has images at all)."""
        count = self.count[names]                                            # [B, N]
        cap = count.clamp(1, self.max_shots)
        n = (torch.rand(names.shape, generator=gen, device=names.device) * cap).long().clamp_max(cap - 1) + 1
        m = self.feats.shape[1]
        scores = torch.rand(*names.shape, m, generator=gen, device=names.device)
        scores = scores.masked_fill(torch.arange(m, device=names.device) >= count[..., None], 2.0)
        rank = scores.argsort(-1).argsort(-1)                                # a random order of the real images
        pick = (rank < n[..., None]).to(self.feats.dtype)                    # [B, N, M]
        mean = torch.einsum("bnm,bnmd->bnd", pick, self.feats[names]) / n[..., None].to(self.feats.dtype)
        return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12), count > 0


def sample_kinds(shape: torch.Size, mix: tuple[float, float, float], gen: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(use_text, use_images) bool [shape] for prompts drawn from `mix` = P(text, images, both)."""
    u = torch.rand(shape, generator=gen, device=device)
    p_text, p_images, _ = mix
    text_only, images_only = u < p_text, (u >= p_text) & (u < p_text + p_images)
    return ~images_only, ~text_only
