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
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedtina.zoo.heads import Head, finetune_heads, generic_rows

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
TEMPERATURE_GRID = (0.02, 0.05, 0.1, 0.2, 0.5)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
    """Fit once on the seen classes of `assets`; `heads(rows, task names)` for any task."""

    def __init__(self, assets) -> None:
        names = list(assets.dataset.class_names)
        rows = generic_rows(assets.bank, names)
        self.seen = [n for n in names if n in rows]
        self.encoder = assets.encoder
        self.targets = np.stack([np.append(*rows[n]) for n in self.seen]).astype(np.float64)    # [S, d + 1]
        self.emb = _unit(np.asarray(self.encoder.embed_names(self.seen), np.float64))
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
        X = np.hstack([_unit(np.asarray(self.encoder.embed_names(list(names)), np.float64)), np.ones((len(names), 1))])
        return self._head(names, X @ self.ridge_map)

    def soft_selection(self, names: Sequence[str]) -> Head:
        sim = _unit(np.asarray(self.encoder.embed_names(list(names)), np.float64)) @ self.emb.T
        return self._head(names, softmix(sim, self.temperature) @ self.targets)

    def retrieval(self, names: Sequence[str]) -> Head:
        known = list(self.bank)
        emb = _unit(np.asarray(self.encoder.embed_names(known), np.float64))
        out = []
        for n in names:
            if n in self.bank:
                out.append(self.bank[n])
            else:
                q = _unit(np.asarray(self.encoder.embed_names([n]), np.float64))
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


def novelty(assets, tasks, heads, inits, cfg, seed: int) -> dict[str, float]:
    """Medians over the tasks' class rows (weight and bias, relative to the row's norm) of: the distance from each
    generated row (`heads`) to the nearest zoo row of its class (`to_zoo`), and the distance between two fine-tunes
    of the task from `inits` (the zoo's own recipe `cfg`: from the generic rows) on two seeded 80% subsamples of its
    zoo-part images (`between_fine_tunes`)."""
    zoo = zoo_class_rows(assets.zoo.entries())
    rows = lambda h: np.hstack([h.weight, h.bias[:, None]])  # noqa: E731
    to_zoo = [float(np.min(np.linalg.norm(np.stack(zoo[n]) - r, axis=1)) / np.linalg.norm(r))
              for t, h in zip(tasks, heads) for n, r in zip(t.class_names, rows(h)) if n in zoo]
    rng = np.random.default_rng([seed, 0x6e])
    fits = []
    for _ in range(2):
        subsets = [np.sort(rng.permutation(len(t.train_y))[: max(len(t.class_names), int(0.8 * len(t.train_y)))])
                   for t in tasks]
        fits.append(finetune_heads(inits, [(t.train_x[i], t.train_y[i]) for t, i in zip(tasks, subsets)], cfg))
    between = [float(np.linalg.norm(a - b) / np.linalg.norm(a)) for h0, h1 in zip(*fits)
               for a, b in zip(rows(h0), rows(h1))]
    return {"to_zoo": float(np.median(to_zoo)), "between_fine_tunes": float(np.median(between))}
