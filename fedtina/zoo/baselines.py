"""Cheap text-only baselines that could explain Tina's zero-shot rows away, and the prompt check: rows of the
benchmark (fedtina/experiments/bench.py) and of its analyses.

* `ridge`: a linear map from a class's name embedding to its generic row and bias, fit on the seen classes (ridge,
  its strength chosen by leave-one-class-out error in closed form).
* `soft_selection`: a similarity-weighted mix of the seen classes' generic rows (softmax over name cosine, its
  temperature chosen by leave-one-class-out error on the seen classes).
* `retrieval`: the mean of the zoo heads' rows for the class (for an unseen class: for the seen class with the
  nearest name): what the zoo knows, without a generator.
* `tina_wrong_names` (the prompt check): Tina given other classes' names, scored on the true classes; it must fall
  to chance, or the "generated" heads do not come from the prompt.
* `novelty`: how far Tina's rows are from the zoo's rows of the same class (the nearest one), against how far two
  fine-tunes of one task on two seeded 80% subsamples of its images are from each other: a generator that only
  copied its training heads would sit much nearer the zoo than that.
* `memorization` (Zeng et al., CVPR 2026, "generative modelling of weights: generalization or memorization?"), on
  OOD tasks, where a copy cannot be the right answer: (rows) how far Tina's rows of unseen classes are from the
  nearest zoo row of any class, against the same for zoo rows plus Gaussian noise; (heads) how much Tina's test
  mistakes overlap those of the nearest zoo head, against two fine-tunes of the task (see `memorization`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedtina.errors import FedtinaError
from fedtina.zoo.heads import Head, finetune_heads, generic_rows, unit_rows

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
TEMPERATURE_GRID = (0.02, 0.05, 0.1, 0.2, 0.5)


def zoo_class_rows(entries) -> dict[str, list[np.ndarray]]:
    """{class name: every zoo head's row for it, as [weight | bias] vectors}."""
    rows: dict[str, list[np.ndarray]] = {}
    for e in entries:
        w, b = np.asarray(e.params["head.weight"]), np.asarray(e.params["head.bias"])
        for j, n in enumerate(e.class_names):
            rows.setdefault(n, []).append(np.append(w[j], b[j]))
    return rows


def softmix(sim: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of cosine similarities [n, S] at `temperature`: the weights of a similarity-weighted mix."""
    z = sim / temperature
    w = np.exp(z - z.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True)


def fit_temperature(emb: np.ndarray, targets: np.ndarray) -> float:
    """The temperature of `TEMPERATURE_GRID` whose mix of the other classes' `targets` [S, D] best predicts each
    class's own (leave-one-class-out squared error); `emb` [S, E] are the classes' unit name embeddings."""
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)                      # leave the class itself out
    errs = [float((((softmix(sim, t) @ targets) - targets) ** 2).mean()) for t in TEMPERATURE_GRID]
    return TEMPERATURE_GRID[int(np.argmin(errs))]


class TextBaselines:
    """Fit once on the classes with a generic row (the seen ones less the novel ones: `seen`); `heads(rows, task
    names)` for any task."""

    def __init__(self, assets) -> None:
        names = list(assets.dataset.class_names)
        rows = generic_rows(assets.bank, names)
        self.seen = [n for n in names if n in rows]
        self.encoder = assets.encoder
        self.targets = np.stack([np.append(*rows[n]) for n in self.seen]).astype(np.float64)    # [S, d + 1]
        self.emb = unit_rows(np.asarray(self.encoder.embed_names(self.seen), np.float64))
        self.ridge_map, self.ridge_lambda = self._fit_ridge()
        self.temperature = fit_temperature(self.emb, self.targets)
        self.bank = {n: np.mean(v, axis=0) for n, v in zoo_class_rows(assets.zoo.entries()).items()}

    def _fit_ridge(self) -> tuple[np.ndarray, float]:
        X = np.hstack([self.emb, np.ones((len(self.emb), 1))])
        best = None
        for lam in RIDGE_GRID:
            A = X.T @ X + lam * np.eye(X.shape[1])
            H = X @ np.linalg.solve(A, X.T)
            loo = (self.targets - H @ self.targets) / (1 - np.diag(H))[:, None]   # leave-one-out residuals
            err = float((loo ** 2).mean())
            if best is None or err < best[0]:
                best = (err, lam, np.linalg.solve(A, X.T @ self.targets))
        return best[2], best[1]

    def _head(self, names: Sequence[str], rows: np.ndarray) -> Head:
        rows = np.asarray(rows, np.float32)
        return Head(tuple(names), rows[:, :-1].copy(), rows[:, -1].copy())

    def ridge(self, names: Sequence[str]) -> Head:
        emb = unit_rows(np.asarray(self.encoder.embed_names(list(names)), np.float64))
        X = np.hstack([emb, np.ones((len(names), 1))])
        return self._head(names, X @ self.ridge_map)

    def soft_selection(self, names: Sequence[str]) -> Head:
        sim = unit_rows(np.asarray(self.encoder.embed_names(list(names)), np.float64)) @ self.emb.T
        return self._head(names, softmix(sim, self.temperature) @ self.targets)

    def retrieval(self, names: Sequence[str]) -> Head:
        known = list(self.bank)
        emb = unit_rows(np.asarray(self.encoder.embed_names(known), np.float64))
        out = []
        for n in names:
            if n in self.bank:
                out.append(self.bank[n])
            else:
                q = unit_rows(np.asarray(self.encoder.embed_names([n]), np.float64))
                out.append(self.bank[known[int(np.argmax(emb @ q[0]))]])
        return self._head(names, np.stack(out))


def wrong_names(task_names: Sequence[Sequence[str]], all_names: Sequence[str], seed: int) -> list[list[str]]:
    """For every task, as many other classes' names (none of the task's), seeded: the prompt check's prompts. The
    stream is not the task sampler's (same seed, same draws: the wrong names would sit next to the true ones in the
    dataset's name order, and on the embedded data share their colour)."""
    rng = np.random.default_rng([seed, 0x70])
    out = []
    for names in task_names:
        pool = [n for n in all_names if n not in set(names)]
        out.append([pool[i] for i in rng.choice(len(pool), size=len(names), replace=False)])
    return out


def _rows(head: Head) -> np.ndarray:
    """A head's rows as [weight | bias] vectors, [k, d + 1]."""
    return np.hstack([head.weight, head.bias[:, None]])


def _two_fine_tunes(tasks, inits, cfg, rng: np.random.Generator) -> list[list[Head]]:
    """Two fine-tunes of every task from `inits` (recipe `cfg`) on two seeded 80% subsamples of its zoo-part images:
    how much two honest fits of one task differ."""
    fits = []
    for _ in range(2):
        subsets = [np.sort(rng.permutation(len(t.train_y))[: max(len(t.class_names), int(0.8 * len(t.train_y)))])
                   for t in tasks]
        fits.append(finetune_heads(inits, [(t.train_x[i], t.train_y[i]) for t, i in zip(tasks, subsets)], cfg))
    return fits


def novelty(assets, tasks, heads, inits, cfg, seed: int) -> dict[str, float]:
    """Medians over the tasks' class rows (weight and bias, relative to the row's norm) of: the distance from each
    generated row (`heads`) to the nearest zoo row of its class (`to_zoo`), and the distance between two fine-tunes
    of the task from `inits` (the zoo's own recipe `cfg`: from the generic rows) on two seeded 80% subsamples of its
    zoo-part images (`between_fine_tunes`)."""
    zoo = zoo_class_rows(assets.zoo.entries())
    to_zoo = [float(np.min(np.linalg.norm(np.stack(zoo[n]) - r, axis=1)) / np.linalg.norm(r))
              for t, h in zip(tasks, heads) for n, r in zip(t.class_names, _rows(h)) if n in zoo]
    fits = _two_fine_tunes(tasks, inits, cfg, np.random.default_rng([seed, 0x6e]))
    between = [float(np.linalg.norm(a - b) / np.linalg.norm(a)) for h0, h1 in zip(*fits)
               for a, b in zip(_rows(h0), _rows(h1))]
    return {"to_zoo": float(np.median(to_zoo)), "between_fine_tunes": float(np.median(between))}


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(a), len(b)], through the dot product (no [len(a), len(b), d] intermediate)."""
    sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _nearest(rows: np.ndarray, bank: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of the nearest `bank` row to every row of `rows`, in chunks (the zoo holds thousands)."""
    dist, idx = [], []
    for i in range(0, len(rows), chunk):
        d = _distances(rows[i:i + chunk], bank)
        idx.append(d.argmin(1))
        dist.append(d[np.arange(len(d)), idx[-1]])
    return np.concatenate(dist), np.concatenate(idx)


def zoo_class_gap(bank: np.ndarray, names: np.ndarray, chunk: int = 1024) -> float:
    """Median over zoo rows of the distance to the nearest zoo row of *another* class: how far from the zoo a row
    sits when its own class is not in it (the situation of every unseen class), measured on the zoo itself."""
    gaps = []
    for i in range(0, len(bank), chunk):
        d = _distances(bank[i:i + chunk], bank)
        d[names[i:i + chunk, None] == names[None]] = np.inf
        gaps.append(d.min(1))
    gaps = np.concatenate(gaps)
    return float(np.median(gaps[np.isfinite(gaps)]))


def nearest_zoo_head(rows: np.ndarray, zoo: list[np.ndarray]) -> tuple[int, np.ndarray]:
    """The zoo head nearest to a head with rows `rows` [k, d + 1], and the row of it that stands for each of the k.
    A head's rows stand in no fixed order and its classes need not be the task's (an unseen class has no zoo row), so
    rows are matched greedily: the globally nearest (row, zoo row) pair first, each used once (exact for a copy of a
    zoo head, whatever its row order); the head's distance is the sum of its matched distances. A zoo head with
    fewer than k rows cannot stand in."""
    k, width = len(rows), max(len(z) for z in zoo)
    padded = np.full((len(zoo), width, rows.shape[1]), np.nan)
    for i, z in enumerate(zoo):
        padded[i, : len(z)] = z
    d = np.nan_to_num(np.sqrt(((rows[None, :, None] - padded[:, None]) ** 2).sum(-1)), nan=np.inf)  # [Z, k, width]
    cost, match = np.zeros(len(zoo)), np.zeros((len(zoo), k), np.int64)
    heads = np.arange(len(zoo))
    for _ in range(k):
        flat = d.reshape(len(zoo), -1).argmin(1)
        r, c = np.divmod(flat, width)
        cost += d[heads, r, c]
        match[heads, r] = c
        d[heads, r, :] = np.inf
        d[heads, :, c] = np.inf
    best = int(np.argmin(cost))
    if not np.isfinite(cost[best]):
        raise FedtinaError(f"no zoo head has the {k} rows a task's head needs")
    return best, match[best]


def mistake_overlap(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> float:
    """Intersection over union of the test images two heads' predictions `a`, `b` get wrong (nan: neither errs)."""
    wa, wb = a != y, b != y
    union = int((wa | wb).sum())
    return float((wa & wb).sum() / union) if union else float("nan")


def memorization(assets, tasks, heads, inits, cfg, seed: int) -> dict[str, float]:
    """Zeng et al.'s two tests of a weight generator, on OOD tasks (`tasks`, Tina's `heads`):

    * rows: `to_zoo`, the median distance ([weight | bias], the zoo's units) from Tina's row of each unseen class to
      the nearest zoo row of any class; `noise_to_zoo`, the same for a baseline of zoo rows plus isotropic Gaussian
      noise (one noisy copy of the zoo row nearest each of Tina's rows, so the baseline sits in the same region).
      Scale rule, no tuned constant: the noise's expected squared norm is `noise_scale`², the zoo's own median
      distance from a row to the nearest row of another class (`zoo_class_gap`), i.e. the distance at which a row
      sits from the zoo when its class is not in it. A generator that builds rows for a new class lands about that
      far (ratio `to_zoo / noise_to_zoo` near 1); one that replays a zoo row lands nearer (0 for a copy).
    * heads: `head_overlap`, the mean intersection over union of the test images Tina's head and its nearest zoo
      head (`nearest_zoo_head`, its matched rows standing for the task's classes) get wrong; `fine_tune_overlap`,
      the same between two fine-tunes of the task from `inits` (recipe `cfg`) on two seeded 80% subsamples of its
      zoo-part images: the overlap two honest fits of the task share. Tina's mistakes overlapping its nearest zoo
      head's as much as that reference means it behaves like a copy of that head."""
    entries = assets.zoo.entries()
    zoo = [np.hstack([np.asarray(e.params["head.weight"]), np.asarray(e.params["head.bias"])[:, None]])
           .astype(np.float64) for e in entries]
    bank, names = np.vstack(zoo), np.array([n for e in entries for n in e.class_names])
    unseen = set(np.asarray(assets.split.unseen).tolist())
    generated = np.array([r for t, h in zip(tasks, heads) for c, r in zip(t.class_ids, _rows(h)) if c in unseen],
                         np.float64)
    if not len(generated):
        raise FedtinaError("the memorization check needs OOD tasks holding unseen classes (bench.ood_unseen >= 1)")
    to_zoo, source = _nearest(generated, bank)
    scale = zoo_class_gap(bank, names)
    rng = np.random.default_rng([seed, 0x6d])
    noisy = bank[source] + rng.standard_normal(generated.shape) * scale / np.sqrt(generated.shape[1])
    noise_to_zoo, _ = _nearest(noisy, bank)
    fits = _two_fine_tunes(tasks, inits, cfg, rng)
    head_overlap, fine_tune_overlap = [], []
    for t, h, f0, f1 in zip(tasks, heads, *fits):
        z, match = nearest_zoo_head(_rows(h).astype(np.float64), zoo)
        copy = Head(t.class_names, zoo[z][match, :-1].astype(np.float32), zoo[z][match, -1].astype(np.float32))
        head_overlap.append(mistake_overlap(h.predict(t.test_x), copy.predict(t.test_x), t.test_y))
        fine_tune_overlap.append(mistake_overlap(f0.predict(t.test_x), f1.predict(t.test_x), t.test_y))
    to, noise = float(np.median(to_zoo)), float(np.median(noise_to_zoo))
    return {"to_zoo": to, "noise_to_zoo": noise, "noise_scale": scale, "ratio": to / noise if noise else float("nan"),
            "head_overlap": float(np.nanmean(head_overlap)), "fine_tune_overlap": float(np.nanmean(fine_tune_overlap))}
