"""The baseline rows a `base=auto` Tina corrects (TinaConfig.base), and the known rows they are made of. Everything
comes from the zoo alone, so a checkpoint carries it.

* A class prompted with example images: its **imprinted row**, the L2-normalised mean of the images' features (the
  image prompt) scaled to the zoo rows' mean norm, bias 0 (the shots axis's `imprint` row, on the zoo's scale).
* A class named only: a **name-similarity mix of the known rows**: a softmax over the cosine similarity of its name to
  every known class's name (temperature fit leave-one-class-out, as the `soft_selection` row) of those classes' mean
  zoo rows (weight and bias). A known class is in its own mix, so its baseline lies near its own mean row.

Besides the row, a class gets the highest name similarity among the known classes it could mix (`top`): near 1 when
its own row is in the mix. In training, fake-novel episodes hide classes: `visible` drops their columns from every
mix and from `top`, so no row of a hidden class reaches Tina through its baseline (`fedtina.tina.train`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedtina.errors import FedtinaError
from fedtina.zoo.baselines import TEMPERATURE_GRID, fit_temperature, zoo_class_rows

BASES = ("none", "auto")


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class KnownRows:
    """Per known class (sorted names): its mean zoo row [weight | bias], its unit name embedding; the mix's
    temperature and the imprinted rows' norm."""

    def __init__(self, names: Sequence[str], rows: torch.Tensor, emb: torch.Tensor, temperature: float,
                 scale: float) -> None:
        self.names = tuple(names)
        self.rows, self.emb = rows.float(), unit(emb.float())
        if len(self.names) < 1 or self.rows.shape[0] != len(self.names) or self.emb.shape[0] != len(self.names):
            raise FedtinaError(f"known rows: {len(self.names)} names, rows {tuple(self.rows.shape)}, "
                               f"embeddings {tuple(self.emb.shape)}")
        self.temperature, self.scale = float(temperature), float(scale)

    @classmethod
    def fit(cls, entries: Sequence[Any], encoder: Any) -> "KnownRows":
        """From zoo entries (class_names, params) and the text encoder Tina reads names with."""
        per_class = zoo_class_rows(entries)
        if not per_class:
            raise FedtinaError("known rows: the zoo holds no rows")
        names = sorted(per_class)
        rows = np.stack([np.mean(per_class[n], axis=0) for n in names])                       # [C, d + 1]
        emb = np.asarray(encoder.embed_names(names), np.float64)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        # one known class mixes to itself at any temperature
        temperature = fit_temperature(emb, rows) if len(names) > 1 else TEMPERATURE_GRID[0]
        scale = float(np.mean([np.linalg.norm(r[:-1]) for n in names for r in per_class[n]]))
        return cls(names, torch.from_numpy(rows).float(), torch.from_numpy(emb).float(), temperature, scale)

    def to(self, device: torch.device) -> "KnownRows":
        self.rows, self.emb = self.rows.to(device), self.emb.to(device)
        return self

    @property
    def token_dim(self) -> int:
        return int(self.rows.shape[1])

    def mix(self, name_emb: torch.Tensor, visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Name embeddings [B, N, E] -> (mixed known rows [B, N, T], top similarity [B, N]); `visible` [B, C] bool
        keeps only those known classes in episode b (None: all). With none visible the row is 0 and top -1."""
        sim = unit(name_emb) @ self.emb.T                                                       # [B, N, C]
        if visible is not None:
            sim = sim.masked_fill(~visible[:, None, :], float("-inf"))
        weights = torch.softmax(sim / self.temperature, dim=-1).nan_to_num(0.0)   # all hidden: NaN -> 0
        top = sim.max(dim=-1).values.clamp_min(-1.0)
        return weights @ self.rows, top

    def imprint(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings [B, N, d] -> imprinted rows [B, N, d + 1] (norm `scale`, bias 0)."""
        if images.shape[-1] != self.token_dim - 1:
            raise FedtinaError(f"imprinted baselines need image prompts in the head's feature space "
                               f"({self.token_dim - 1}-d), got {images.shape[-1]}-d (encoder.image_prompts=clip?)")
        return torch.cat([self.scale * unit(images), images.new_zeros(*images.shape[:-1], 1)], dim=-1)

    def baseline(self, name_emb: torch.Tensor, images: torch.Tensor, use_images: torch.Tensor,
                 visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class token: the imprinted row where `use_images` [B, N], else the mix of the known rows; with the
        top name similarity (see the module docstring). Raw rows [B, N, T], top [B, N]."""
        mixed, top = self.mix(name_emb, visible)
        if not bool(use_images.any()):
            return mixed, top
        return torch.where(use_images[..., None], self.imprint(images), mixed), top

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], str]:
        """(tensors, metadata JSON) for a checkpoint."""
        meta = {"names": list(self.names), "temperature": self.temperature, "scale": self.scale}
        return {"rows": self.rows.detach().cpu().contiguous(), "emb": self.emb.detach().cpu().contiguous()}, \
            json.dumps(meta)

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], meta: str) -> "KnownRows":
        info = json.loads(meta)
        return cls(info["names"], tensors["rows"], tensors["emb"], info["temperature"], info["scale"])

    def __repr__(self) -> str:
        return f"KnownRows({len(self.names)} classes, T={self.temperature:g}, scale={self.scale:.3f})"


def conditioning(prompt: torch.Tensor, base_norm: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """A base=auto Tina's per-token condition: [prompt | normalised baseline row | top similarity]."""
    return torch.cat([prompt, base_norm, top[..., None]], dim=-1)


def conditioning_dim(token_dim: int) -> int:
    """How much wider `conditioning` makes the prompt."""
    return int(token_dim) + 1
