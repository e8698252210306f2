"""A learned non-diffusion rival to Tina in the form of Gidaris & Komodakis (CVPR 2018, few-shot learning without
forgetting): a class's row is a learned scaling of its class mean plus attention over the known classes' rows.

    with example images:  row = phi_avg * imprint(z) + phi_img * attend(z; known classes' mean features)
    named only:           row = phi_txt * attend(e; known classes' name embeddings)

z: the unit mean of the images' features (the image prompt), imprinted: scaled to the zoo rows' mean norm, bias 0 (the
shots axis's `imprint` row, on the zoo's scale); e: the class name's embedding; attend(q; keys) = sum_j softmax_j(tau
cos(W_q q, W_k key_j)) row_j over the known classes j (`KnownRows`: their mean zoo rows, weight and bias). The phi
are per-coordinate scalings of [weight | bias]; W_q, W_k start as the identity, tau at the temperature of a
name-similarity mix of the known rows (fit leave-one-class-out, as the `soft_selection` row), phi_avg at 1 on the
weights, so an untrained rival gives the imprinted row with images and the `soft_selection`-like mix without.

It trains on Tina's episodes (`ZooTensors.episode`), by regression of the zoo rows in the layout's normalised space,
with TinaConfig's steps, batch, learning rate and seed, and made **fake-novel**: in each training task, every class
token is hidden with P(`hidden_share`), drawn among the `novel` pool's classes (the protocol's novel classes) when
there is one, else among all; a hidden class's known row, name and mean features are dropped from every attention of
that task (`visible`), so the rival learns to make rows of classes it cannot look up.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedtina.config import TinaConfig
from fedtina.device import pick_device
from fedtina.errors import FedtinaError
from fedtina.tina.layout import WEIGHT_KEY, ParamLayout
from fedtina.tina.prompt import image_embedding
from fedtina.tina.train import Episode, ZooTensors
from fedtina.zoo.baselines import TEMPERATURE_GRID, fit_temperature, zoo_class_rows
from fedtina.zoo.heads import Head, unit_rows


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class KnownRows:
    """Per known class (sorted names): its mean zoo row [weight | bias] and its unit name embedding; the temperature
    of a name mix of those rows, and the zoo rows' mean norm (the imprinted rows')."""

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
        """From zoo entries (class_names, params) and the text encoder that reads the names."""
        per_class = zoo_class_rows(entries)
        if not per_class:
            raise FedtinaError("known rows: the zoo holds no rows")
        names = sorted(per_class)
        rows = np.stack([np.mean(per_class[n], axis=0) for n in names])                       # [C, d + 1]
        emb = unit_rows(np.asarray(encoder.embed_names(names), np.float64))
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

    def imprint(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings [B, N, d] -> imprinted rows [B, N, d + 1] (norm `scale`, bias 0)."""
        if images.shape[-1] != self.token_dim - 1:
            raise FedtinaError(f"imprinted rows need image prompts in the head's feature space "
                               f"({self.token_dim - 1}-d), got {images.shape[-1]}-d (encoder.image_prompts=clip?)")
        return torch.cat([self.scale * unit(images), images.new_zeros(*images.shape[:-1], 1)], dim=-1)


# ------------------------------------------------------------------ fake-novel episodes
def novel_pool(names: Sequence[str], novel: Collection[str] | None) -> torch.Tensor:
    """[C] bool over the known classes `names`: those that may be fake-novel (the `novel` pool; None: all)."""
    unknown = sorted(set(novel or ()) - set(names))
    if unknown:
        raise FedtinaError(f"novel pool: classes {unknown[:5]} have no zoo row")
    pool = set(novel or names)
    return torch.tensor([n in pool for n in names], dtype=torch.bool)


def hide(ep: Episode, pool: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """[B, K] bool: the episode's fake-novel class tokens, each with P(`share`) among the `pool` classes."""
    drawn = torch.rand(ep.names.shape, generator=gen, device=ep.names.device) < share
    return drawn & pool[ep.names] & ep.mask


def visible(names: torch.Tensor, hidden: torch.Tensor, num_known: int) -> torch.Tensor:
    """[B, C] bool: the known classes task b may read, every class but its fake-novel ones."""
    count = torch.zeros(names.shape[0], num_known, device=names.device)
    return count.scatter_add_(1, names, hidden.to(count.dtype)) == 0


class Attend(nn.Module):
    """Cosine attention of queries [B, N, D] over known keys [C, D] (identity-initialised maps) onto their rows."""

    def __init__(self, dim: int, temperature: float) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.q.weight)
        nn.init.eye_(self.k.weight)
        self.log_tau = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor,
                visible: torch.Tensor) -> torch.Tensor:
        logits = self.log_tau.exp() * (unit(self.q(query)) @ unit(self.k(keys)).T)         # [B, N, C]
        # masked after scaling: -inf times tau would give tau a NaN gradient
        logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)                            # nothing visible: 0
        return weights @ rows


class GidarisNet(nn.Module):
    """The rival's parameters: two attentions (names, mean features) and three per-coordinate scalings."""

    def __init__(self, text_dim: int, feature_dim: int, temperature: float) -> None:
        super().__init__()
        T = feature_dim + 1
        self.text, self.image = Attend(text_dim, temperature), Attend(feature_dim, temperature)
        self.phi_avg = nn.Parameter(torch.cat([torch.ones(feature_dim), torch.zeros(1)]))
        self.phi_img = nn.Parameter(torch.zeros(T))
        self.phi_txt = nn.Parameter(torch.ones(T))

    def forward(self, known: KnownRows, feats: torch.Tensor, has_feats: torch.Tensor, name_emb: torch.Tensor,
                images: torch.Tensor, use_images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Raw rows [B, N, T] for class tokens with name embeddings [B, N, E], unit image embeddings [B, N, d] used
        where `use_images`; `visible` [B, C]: the known classes episode b may read (`feats`: their unit mean
        features, `has_feats`: which have any)."""
        named = self.phi_txt * self.text(name_emb, known.emb, known.rows, visible)
        if not bool(use_images.any()):
            return named
        seen = self.phi_avg * known.imprint(images) + \
            self.phi_img * self.image(images, feats, known.rows, visible & has_feats[None])
        return torch.where(use_images[..., None], seen, named)


class GidarisGenerator:
    """A trained rival: `generate(label_sets, shots=None)` -> heads, like `TinaGenerator.generate`."""

    def __init__(self, net: GidarisNet, known: KnownRows, feats: torch.Tensor, has_feats: torch.Tensor,
                 encoder: Any, device: torch.device) -> None:
        self.net, self.known, self.encoder, self.device = net.eval(), known.to(device), encoder, device
        self.feats, self.has_feats = feats.to(device), has_feats.to(device)

    @torch.inference_mode()
    def generate(self, label_sets: Sequence[Sequence[str]], shots: Sequence[Sequence[np.ndarray | None] | None]
                 | None = None) -> list[Head]:
        """One head per label set; ``shots[b][j]``: features [n, d] of example images of class j of set b, or None
        (the class is named only)."""
        sets = [tuple(s) for s in label_sets]
        if not sets or any(not s for s in sets):
            raise FedtinaError("the Gidaris rival needs non-empty label sets")
        if shots is not None and len(shots) != len(sets):
            raise FedtinaError(f"shots: {len(shots)} entries for {len(sets)} label sets")
        B, K, d = len(sets), max(map(len, sets)), self.known.token_dim - 1
        unique = sorted({n for s in sets for n in s})
        table = dict(zip(unique, np.asarray(self.encoder.embed_names(unique), np.float32)))
        emb = np.zeros((B, K, len(next(iter(table.values())))), np.float32)
        images, use_images = np.zeros((B, K, d), np.float32), np.zeros((B, K), bool)
        for b, names in enumerate(sets):
            per = shots[b] if shots is not None and shots[b] is not None else [None] * len(names)
            if len(per) != len(names):
                raise FedtinaError(f"shots of label set {b}: {len(per)} entries for {len(names)} classes")
            for j, name in enumerate(names):
                emb[b, j] = table[name]
                if per[j] is not None:
                    images[b, j] = image_embedding(per[j], d, f"image prompt of {name!r} (label set {b})")
                    use_images[b, j] = True
        t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        every = torch.ones(B, len(self.known.names), dtype=torch.bool, device=self.device)   # no class is hidden
        rows = self.net(self.known, self.feats, self.has_feats, t(emb), t(images), t(use_images), every)
        rows = rows.float().cpu().numpy()
        return [Head(names, rows[b, :len(names), :d].copy(), rows[b, :len(names), d].copy())
                for b, names in enumerate(sets)]


def mean_features(names: Sequence[str], shots: Mapping[str, np.ndarray] | None,
                  dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per known class: the unit mean of its zoo-part features [C, d] (the image attention's keys), and whether it
    has any."""
    feats, has = np.zeros((len(names), dim), np.float32), np.zeros(len(names), bool)
    for i, n in enumerate(names):
        x = np.asarray((shots or {}).get(n, np.zeros((0, dim))), np.float32)
        if len(x):
            feats[i], has[i] = image_embedding(x, dim, f"zoo features of {n!r}"), True
    return torch.from_numpy(feats), torch.from_numpy(has)


def train_rival(entries: Sequence[Any], encoder: Any, cfg: TinaConfig, *, hidden_share: float,
                shots: Mapping[str, np.ndarray] | None = None, novel: Collection[str] | None = None,
                log: Callable[[str], Any] | None = None) -> GidarisGenerator:
    """Fit the rival on zoo entries with Tina's episodes made fake-novel (see the module docstring); `shots`: {class
    name: zoo-part backbone features} (image prompts and the image attention's keys); `novel`: the preferred
    fake-novel classes; `hidden_share`: P(a class token is fake-novel) (`BenchConfig.rival_hidden_share`)."""
    entries = list(entries)
    if not entries:
        raise FedtinaError("cannot train the Gidaris rival on an empty zoo")
    device = pick_device(cfg.device)
    d = np.asarray(entries[0].params[WEIGHT_KEY]).shape[-1]
    layout = ParamLayout(d).fit(e.params for e in entries)
    known = KnownRows.fit(entries, encoder).to(device)
    data = ZooTensors(entries, encoder, layout, shots, cfg.max_shots, image_dim=d).to(device)
    pool = novel_pool(known.names, novel).to(device)
    feats, has_feats = mean_features(known.names, shots, d)
    feats, has_feats = feats.to(device), has_feats.to(device)
    torch.manual_seed(cfg.seed)
    net = GidarisNet(int(encoder.dim), d, known.temperature).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.train_steps))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    mix = (cfg.prompt_text, cfg.prompt_images, cfg.prompt_both)
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        for step in range(cfg.train_steps):
            ep = data.episode(cfg.batch_size, cfg.max_classes, cfg.subset_prob, gen, mix)
            readable = visible(ep.names, hide(ep, pool, hidden_share, gen), len(known.names))
            rows = net(known, feats, has_feats, data.text[ep.names], ep.images, ep.use_images, readable)
            err = ((rows - data.class_mean) / data.class_std - ep.tokens) ** 2 * ep.mask[..., None]
            loss = err.sum() / (ep.mask.sum() * err.shape[-1]).clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if log is not None and (step + 1) % cfg.log_every == 0:
                log(f"gidaris step {step + 1}/{cfg.train_steps} loss {loss.item():.4f}")
    finally:
        torch.set_num_threads(threads_before)
    return GidarisGenerator(net, known, feats, has_feats, encoder, device)
