"""The embedded dataset: 32x32 images of one coloured, textured shape each, named "colour texture shape".

Nothing is downloaded or committed: `make_shapes` renders the images with numpy from a seed, in a few seconds, and
`load_shapes` caches them as an .npz. The class list is a fixed rule over three small vocabularies (colours, textures,
shapes), chosen so that every word appears in many classes: a class held out as "unseen" is then a new combination of
known words, which is what lets a text encoder say something about it.

Rendering works on whole batches of images at once: each shape is a signed distance function evaluated on a 32x32
coordinate grid (the distance in pixels gives anti-aliased edges for free), each texture a periodic mask in the
object's own coordinates. Nuisance variation keeps the task from being trivially separable: position, scale,
rotation, per-image hue/saturation/brightness jitter, gradient backgrounds, small distractor shapes and lines in other
colours, and pixel noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedtina.config import DatasetConfig
from fedtina.data.base import ImageDataset
from fedtina.data.folder import cached_dataset
from fedtina.data.registry import Dataset, register
from fedtina.errors import FedtinaError

log = logging.getLogger(__name__)

SHAPES_VERSION = 2        # bump whenever rendering or the class list changes: it is part of the cache key
SIZE = 32
_CHUNK = 1024             # images rendered per batch; fixed, because the noise stream is drawn per chunk

# name -> (hue in [0,1), saturation, value). Hues far apart; pink is a light, desaturated red; white has no hue.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.000, 0.90, 0.95),
    "orange": (0.075, 0.95, 1.00),
    "yellow": (0.155, 0.90, 1.00),
    "green": (0.330, 0.85, 0.80),
    "cyan": (0.500, 0.85, 0.95),
    "blue": (0.620, 0.85, 1.00),
    "purple": (0.770, 0.70, 0.85),
    "pink": (0.920, 0.42, 1.00),
    "white": (0.000, 0.00, 0.97),
}
TEXTURES = ("solid", "striped", "dotted", "checkered")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent", "arrow")


def class_list() -> list[tuple[int, int, int]]:
    """The fixed (seed-independent) classes as (colour, texture, shape) indices: one combination in four.

    Rule: keep (c, t, s) when (c + 2t + s) % 4 == 0. Every colour-texture pair then gets 2-3 shapes, every colour
    8-10 classes, every texture about 20 and every shape about 9, so any word of a held-out class is seen elsewhere.
    """
    return [
        (c, t, s)
        for c in range(len(COLOURS))
        for t in range(len(TEXTURES))
        for s in range(len(SHAPES))
        if (c + 2 * t + s) % 4 == 0
    ]


def class_names() -> list[str]:
    """Readable names of the classes, in label order, e.g. "red striped circle"."""
    colours = list(COLOURS)
    return [f"{colours[c]} {TEXTURES[t]} {SHAPES[s]}" for c, t, s in class_list()]


# ----------------------------------------------------------------------------------------------------------------
# Signed distance functions, in units of the object's radius (negative inside). x, y: float arrays [B, H, W].


def _length(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y)


def _box(x: np.ndarray, y: np.ndarray, hx: float, hy: float) -> np.ndarray:
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    return _length(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _convex(x: np.ndarray, y: np.ndarray, edges: list[tuple[float, float, float]]) -> np.ndarray:
    """Convex polygon as the max over its edges (nx, ny, offset) of the signed distance to each edge's line."""
    return np.max(np.stack([x * nx + y * ny - off for nx, ny, off in edges]), axis=0)


def _sdf_circle(x, y):
    return _length(x, y) - 0.85


def _sdf_ring(x, y):
    return np.abs(_length(x, y) - 0.72) - 0.22


def _sdf_square(x, y):
    return _box(x, y, 0.72, 0.72)


def _sdf_triangle(x, y):
    angles = np.deg2rad([90.0, 210.0, 330.0])  # outward normals of an equilateral triangle, circumradius 1
    return _convex(x, y, [(float(np.cos(a)), float(np.sin(a)), 0.5) for a in angles])


def _sdf_star(x, y, points: int = 5, inner: float = 0.42):
    """Five-pointed star: fold the angle into one half-sector, then distance to the outer-inner vertex edge."""
    sector = 2 * math.pi / points
    a = np.abs(np.mod(np.arctan2(y, x) + sector / 2, sector) - sector / 2)  # 0 at an outer vertex, sector/2 inner
    rho = _length(x, y)
    qx, qy = rho * np.cos(a), rho * np.sin(a)
    ox, oy = 1.0, 0.0                                           # outer vertex
    ix, iy = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    ex, ey = ix - ox, iy - oy
    nx, ny = -ey, ex                                            # normal of the edge, pointing away from the centre
    norm = math.hypot(nx, ny)
    if nx * (0 - ox) + ny * (0 - oy) > 0:
        nx, ny = -nx, -ny
    return ((qx - ox) * nx + (qy - oy) * ny) / norm


def _sdf_cross(x, y):
    return np.minimum(_box(x, y, 0.95, 0.28), _box(x, y, 0.28, 0.95))


def _sdf_heart(x, y):
    """Two round lobes on top of a square turned 45 degrees."""
    lobes = np.minimum(_length(x - 0.38, y - 0.28), _length(x + 0.38, y - 0.28)) - 0.45
    c = s = math.sqrt(0.5)
    yy = y + 0.22
    point = _box(c * x + s * yy, -s * x + c * yy, 0.52, 0.52)
    return np.minimum(lobes, point)


def _sdf_crescent(x, y):
    return np.maximum(_length(x, y) - 0.9, -(_length(x - 0.42, y - 0.12) - 0.72))


def _sdf_arrow(x, y):
    shaft = _box(x + 0.35, y, 0.55, 0.17)
    tip, base, half = 1.0, 0.05, 0.62                          # head: triangle with its tip on the +x axis
    ex, ey = tip - base, half
    norm = math.hypot(ex, ey)
    head = _convex(x, y, [(-1.0, 0.0, -base), (ey / norm, ex / norm, tip * ey / norm),
                          (ey / norm, -ex / norm, tip * ey / norm)])
    return np.minimum(shaft, head)


_SDF: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _sdf_circle, "square": _sdf_square, "triangle": _sdf_triangle, "star": _sdf_star,
    "cross": _sdf_cross, "ring": _sdf_ring, "heart": _sdf_heart, "crescent": _sdf_crescent, "arrow": _sdf_arrow,
}
assert set(_SDF) == set(SHAPES)


# ----------------------------------------------------------------------------------------------------------------
# Per-image random parameters, drawn once for the whole dataset so that rendering in chunks changes nothing.


@dataclass
class _Params:
    """Everything random about each image, one row per image."""

    colour: np.ndarray       # [N, 3] rgb of the object
    shade: np.ndarray        # [N] darkness factor of the texture's second tone
    texture: np.ndarray      # [N] texture index
    shape: np.ndarray        # [N] shape index
    centre: np.ndarray       # [N, 2] x, y in pixels
    radius: np.ndarray       # [N] pixels
    angle: np.ndarray        # [N] radians
    tex_angle: np.ndarray    # [N] radians
    tex_period: np.ndarray   # [N] scale factor of the texture period
    tex_phase: np.ndarray    # [N, 2] in [0, 1)
    bg: np.ndarray           # [N, 2, 3] the two rgb ends of the background gradient
    bg_dir: np.ndarray       # [N, 2] unit direction of the gradient
    blobs: np.ndarray        # [N, 4, 6] small distractors: active, is_square, x, y, radius, colour index;
                             # the last one is drawn over the object (partial occlusion)
    blob_rgb: np.ndarray     # [N, 4, 3]
    line: np.ndarray         # [N, 4] active, angle, offset, width
    line_rgb: np.ndarray     # [N, 3]
    noise: np.ndarray        # [N] pixel noise standard deviation


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; h, s, v in [0, 1], any equal shapes; returns [..., 3]."""
    h6 = np.mod(h, 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.choose(i[..., None], table)


def _jittered_palette(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Palette colours with per-image hue (+-7 degrees), saturation and brightness jitter -> rgb [..., 3]."""
    hsv = np.array(list(COLOURS.values()))[idx]
    h = hsv[..., 0] + rng.uniform(-0.045, 0.045, idx.shape)
    s = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.1, idx.shape), 0, 1)
    v = np.clip(hsv[..., 2] * rng.uniform(0.5, 1.0, idx.shape), 0, 1)
    return _hsv_to_rgb(h, s, v)


def _draw_params(labels: np.ndarray, rng: np.random.Generator) -> _Params:
    """Per-image nuisance parameters for images of classes `labels`, in a fixed draw order (determinism)."""
    n = len(labels)
    combos = np.array(class_list())[labels]
    colour_idx, texture, shape = combos[:, 0], combos[:, 1], combos[:, 2]
    radius = rng.uniform(5.0, 11.0, n)
    slack = np.maximum(SIZE / 2 - 0.85 * radius - 1.0, 0.0)
    centre = (SIZE - 1) / 2 + rng.uniform(-1, 1, (n, 2)) * slack[:, None]
    bg = _hsv_to_rgb(rng.uniform(0, 1, (n, 2)), rng.uniform(0, 0.45, (n, 2)), rng.uniform(0.1, 0.75, (n, 2)))
    bg_angle = rng.uniform(0, 2 * np.pi, n)
    n_colours = len(COLOURS)
    blob_colour = (colour_idx[:, None] + rng.integers(1, n_colours, (n, 4))) % n_colours  # never the class colour
    blobs = np.stack([
        rng.uniform(0, 1, (n, 4)) < 0.7,
        rng.uniform(0, 1, (n, 4)) < 0.5,
        rng.uniform(0, SIZE - 1, (n, 4)),
        rng.uniform(0, SIZE - 1, (n, 4)),
        rng.uniform(1.5, 4.0, (n, 4)),
        blob_colour,
    ], axis=-1).astype(np.float64)
    line = np.stack([
        rng.uniform(0, 1, n) < 0.5,
        rng.uniform(0, np.pi, n),
        rng.uniform(-10, 10, n),
        rng.uniform(0.7, 1.3, n),
    ], axis=-1).astype(np.float64)
    return _Params(
        colour=_jittered_palette(colour_idx, rng),
        shade=rng.uniform(0.2, 0.4, n),
        texture=texture,
        shape=shape,
        centre=centre,
        radius=radius,
        angle=rng.uniform(0, 2 * np.pi, n),
        tex_angle=rng.uniform(0, np.pi, n),
        tex_period=rng.uniform(0.8, 1.3, n),
        tex_phase=rng.uniform(0, 1, (n, 2)),
        bg=bg,
        bg_dir=np.stack([np.cos(bg_angle), np.sin(bg_angle)], -1),
        blobs=blobs,
        blob_rgb=_jittered_palette(blob_colour, rng),
        line=line,
        line_rgb=_jittered_palette(rng.integers(0, n_colours, n), rng),
        noise=rng.uniform(0.03, 0.1, n),
    )


# ----------------------------------------------------------------------------------------------------------------
# Rendering a chunk of images.

_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)   # float32 throughout: half the memory traffic


def _col(a: np.ndarray) -> np.ndarray:
    """[B] -> [B, 1, 1] so per-image values broadcast over the pixel grid."""
    return a[:, None, None]


def _paint(img: np.ndarray, alpha: np.ndarray, rgb: np.ndarray) -> None:
    """Alpha-blend a layer into img in place: img [B,H,W,3], alpha [B,H,W] in [0,1], rgb [B,3] or [B,H,W,3]."""
    rgb = rgb[:, None, None, :] if rgb.ndim == 2 else rgb
    img += alpha[..., None] * (rgb - img)


def _background(p: _Params) -> np.ndarray:
    t = (_GRID_X - SIZE / 2) * _col(p.bg_dir[:, 0]) + (_GRID_Y - SIZE / 2) * _col(p.bg_dir[:, 1])
    t = np.clip(0.5 + t / SIZE, 0, 1)[..., None]
    return p.bg[:, None, None, 0] * (1 - t) + p.bg[:, None, None, 1] * t


def _blob(img: np.ndarray, p: _Params, j: int) -> None:
    """Distractor j: a small disc or square in another colour than the class's."""
    active, square, bx, by, br, _ = (p.blobs[:, j, i] for i in range(6))
    dx, dy = _GRID_X - _col(bx), _GRID_Y - _col(by)
    dist = np.where(_col(square) > 0, np.maximum(np.abs(dx), np.abs(dy)), _length(dx, dy))
    alpha = np.clip(_col(br) - dist + 0.5, 0, 1) * _col(active)
    _paint(img, alpha, p.blob_rgb[:, j])


def _distractors(img: np.ndarray, p: _Params) -> np.ndarray:
    """All distractors but the last, and maybe one thin line, under the main object."""
    for j in range(p.blobs.shape[1] - 1):
        _blob(img, p, j)
    active, angle, offset, width = (p.line[:, i] for i in range(4))
    dist = np.abs((_GRID_X - SIZE / 2) * _col(np.cos(angle)) + (_GRID_Y - SIZE / 2) * _col(np.sin(angle))
                  - _col(offset))
    alpha = np.clip(_col(width) / 2 - dist + 0.5, 0, 1) * _col(active)
    _paint(img, alpha, p.line_rgb)
    return img


def _stripes(u, v, pu, pv):
    return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * (u / 4.6 + pu)), 0, 1)


def _dots(u, v, pu, pv, period: float = 5.0):
    a, b = np.mod(u / period + pu, 1.0) - 0.5, np.mod(v / period + pv, 1.0) - 0.5
    return 1 - np.clip(0.3 * period - _length(a, b) * period + 0.5, 0, 1)   # dark dots on the colour


def _checks(u, v, pu, pv, cell: float = 3.6):
    return np.clip(0.5 + 2.0 * np.sin(np.pi * (u / cell + 2 * pu)) * np.sin(np.pi * (v / cell + 2 * pv)), 0, 1)


_TEXTURE = {"striped": _stripes, "dotted": _dots, "checkered": _checks}


def _texture_mask(p: _Params) -> np.ndarray:
    """1 where the object shows its colour, 0 where it shows the darker second tone; soft edges.

    Textures live in the object's frame (they move with it) at their own random angle, scale and phase.
    """
    dx, dy = _GRID_X - _col(p.centre[:, 0]), _GRID_Y - _col(p.centre[:, 1])
    c, s = _col(np.cos(p.tex_angle)), _col(np.sin(p.tex_angle))
    scale = _col(p.tex_period)
    u, v = (c * dx + s * dy) / scale, (c * dy - s * dx) / scale
    mask = np.ones_like(u)
    for k, name in enumerate(TEXTURES):
        sel = p.texture == k
        if name in _TEXTURE and sel.any():
            mask[sel] = _TEXTURE[name](u[sel], v[sel], _col(p.tex_phase[sel, 0]), _col(p.tex_phase[sel, 1]))
    return mask


def _object_alpha(p: _Params) -> np.ndarray:
    """Coverage of the main shape, from its signed distance in pixels (anti-aliased over one pixel)."""
    dx, dy = _GRID_X - _col(p.centre[:, 0]), _GRID_Y - _col(p.centre[:, 1])
    c, s = _col(np.cos(p.angle)), _col(np.sin(p.angle))
    r = _col(p.radius)
    x, y = (c * dx + s * dy) / r, (s * dx - c * dy) / r      # y up in the shape's own frame
    dist = np.empty_like(x)
    for k, name in enumerate(SHAPES):
        sel = p.shape == k
        if sel.any():
            dist[sel] = _SDF[name](x[sel], y[sel])
    return np.clip(0.5 - dist * r, 0, 1)


def _render_chunk(p: _Params, rng: np.random.Generator) -> np.ndarray:
    img = _distractors(_background(p), p)
    mask = _texture_mask(p)[..., None]
    fill = p.colour[:, None, None] * (mask + (1 - mask) * _col(p.shade)[..., None])
    _paint(img, _object_alpha(p), fill)
    _blob(img, p, p.blobs.shape[1] - 1)   # an occluder: it may hide part of the object
    img += rng.standard_normal(img.shape, dtype=np.float32) * _col(p.noise)[..., None]
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _take(p: _Params, sl: slice) -> _Params:
    """Rows `sl` of every parameter, floats as float32 (rendering precision)."""
    return _Params(**{k: v[sl].astype(np.float32) if v.dtype == np.float64 else v[sl] for k, v in vars(p).items()})


def make_shapes(images_per_class: int, seed: int) -> ImageDataset:
    """Render the whole dataset: `images_per_class` images of each class, deterministic in `seed`."""
    if images_per_class < 1:
        raise FedtinaError(f"shapes: images_per_class must be >= 1, got {images_per_class}")
    names = class_names()
    labels = np.repeat(np.arange(len(names), dtype=np.int64), images_per_class)
    rng = np.random.default_rng([seed, SHAPES_VERSION])
    params = _draw_params(labels, rng)
    chunks = [_render_chunk(_take(params, slice(i, i + _CHUNK)), rng) for i in range(0, len(labels), _CHUNK)]
    return ImageDataset(name="shapes", images=np.concatenate(chunks), labels=labels, class_names=names)


def shapes_cache_path(images_per_class: int, seed: int, cache_dir: Path) -> Path:
    return Path(cache_dir) / "datasets" / f"shapes-v{SHAPES_VERSION}-n{images_per_class}-seed{seed}.npz"


def load_shapes(cfg: DatasetConfig, cache_dir: Path) -> ImageDataset:
    """The shapes dataset for `cfg.images_per_class` and `cfg.seed`: read from the cache, or built and cached."""
    path = shapes_cache_path(cfg.images_per_class, cfg.seed, cache_dir)

    def build() -> ImageDataset:
        log.info("building shapes dataset (%d images per class, seed %d) -> %s", cfg.images_per_class, cfg.seed, path)
        return make_shapes(cfg.images_per_class, cfg.seed)

    return cached_dataset(path, "shapes", build)


@dataclass
class ShapesConfig(DatasetConfig):
    name: str = "shapes"
    descriptions: str | None = "generated"   # a sentence per class ("a shape with three corners, coloured red, ..."),
                                             # for sentence prompts


register(Dataset("shapes", ShapesConfig, load_shapes))
