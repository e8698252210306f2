"""The benchmark's shots axis (fedtina/experiments/bench.py, `bench.shots`): what n labelled images per class are
worth, with and without training.

For every task (the benchmark's ID and OOD sets) and n in `bench.shots`, n images per class are drawn from the
task's zoo part (seeded by task and n, the same draws for every row; "all" = every zoo-part image). Rows:

* `selection`, `tina` (name only) use no image (n = 0); `oracle` fine-tunes on every zoo-part image.
* `tina_img` (images only) and `tina_text_img` (names and images): Tina prompted with the n shots, no training.
* `gidaris`: the Gidaris & Komodakis rival (fedtina/tina/rival.py) given the shots' backbone features (n = 0: names).
* `imprint`: rows = the L2-normalised class means of the shots, scaled to the generic head's mean row norm, zero
  bias (the classic zero-training baseline).
* `mixed`: the generic rows of the classes that have one, imprinted rows for the others (unseen and novel
  classes), centred and scaled to stand beside the generic rows (`heads.mixed_head`, `heads.RowScale`).
* `local_ft`: the selection head fine-tuned on the shots; `tina_ft`: `tina_text_img`'s head fine-tuned on the same
  shots; `imprint_ft`: the `imprint` head fine-tuned on the same shots (Qi, Brown & Lowe, CVPR 2018: imprinting then
  fine-tuning, the upper baseline of zero-training rows). All three use `bench.tina_ft`: with `select`, steps / lr /
  L2 are chosen on hold-outs of the shots (`heads.oracle_heads`; keeping the head is a candidate), and a task with
  one shot per class has nothing to hold out and keeps its head (so at n=1 each *_ft row equals its start). Each
  also reports the share of tasks whose head the search changed and their mean accuracy change (`moved`).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from fedtina.config import BenchConfig
from fedtina.errors import FedtinaError
from fedtina.zoo.heads import Head, finetune_heads, generic_rows, generic_scale, imprint_rows, mixed_head, oracle_heads
from fedtina.zoo.tasks import BenchTask, class_recall, score

SHOT_ROWS = ("tina_img", "tina_text_img", "gidaris", "imprint", "mixed", "local_ft", "tina_ft", "imprint_ft")
FT_STARTS = {"local_ft": "selection", "tina_ft": "tina_text_img", "imprint_ft": "imprint"}   # fine-tune -> its start


def draw_shots(y: np.ndarray, k: int, n: int | str, rng: np.random.Generator) -> np.ndarray:
    """Indices of n images per class (positions 0..k-1 in `y`; fewer when a class has fewer; all for "all")."""
    idx = []
    for c in range(k):
        pool = np.flatnonzero(y == c)
        idx.append(pool if n == "all" else rng.permutation(pool)[: int(n)])
    return np.sort(np.concatenate(idx))


def imprint_heads(names: list[tuple[str, ...]], data: list[tuple[np.ndarray, np.ndarray]], scale: float) -> list[Head]:
    return [Head(tuple(cls), imprint_rows(x, y, len(cls), scale), np.zeros(len(cls), np.float32))
            for cls, (x, y) in zip(names, data)]


def shot_rows(assets, tasks: list[BenchTask], n: int | str, cfg: BenchConfig, selection: list[Head], task_seed: int,
              timed: Callable[[str, Callable[[], list[Head]]], list[Head]], rival) -> dict[str, list[Head]]:
    """Every shots row's heads for `tasks` at n shots per class (see the module docstring)."""
    draws = [draw_shots(t.train_y, len(t.class_names), n, np.random.default_rng([task_seed, i, _n_key(n)]))
             for i, t in enumerate(tasks)]
    data = [(t.train_x[d], t.train_y[d]) for t, d in zip(tasks, draws)]
    names = [t.class_names for t in tasks]
    per_set = [[t.train_p[d][t.train_y[d] == c] for c in range(len(t.class_names))] for t, d in zip(tasks, draws)]
    scale = generic_scale(assets.bank, assets.split.backbone_idx)
    generic = generic_rows(assets.bank, assets.dataset.class_names)
    tune = oracle_heads if cfg.tina_ft.select else finetune_heads
    out = {
        "tina_img": timed("tina_img", lambda: assets.tina.generate([list(c) for c in names], shots=per_set,
                                                                   use_names=False)),
        "tina_text_img": timed("tina_text_img", lambda: assets.tina.generate([list(c) for c in names],
                                                                             shots=per_set)),
        "gidaris": timed("gidaris", lambda: rival.generate(names, shots=[[x[y == c] for c in range(len(cls))]
                                                                         for cls, (x, y) in zip(names, data)])),
        "imprint": timed("imprint", lambda: imprint_heads(names, data, scale.norm)),
        "mixed": timed("mixed", lambda: [mixed_head(c, x, y, generic, scale) for c, (x, y) in zip(names, data)]),
        "local_ft": timed("local_ft", lambda: tune(selection, data, cfg.tina_ft)),
    }
    out["tina_ft"] = timed("tina_ft", lambda: tune(out["tina_text_img"], data, cfg.tina_ft))
    out["imprint_ft"] = timed("imprint_ft", lambda: tune(out["imprint"], data, cfg.tina_ft))
    return out


def moved(starts: list[Head], tuned: list[Head], tasks: list[BenchTask]) -> dict[str, float]:
    """What a hold-out-picked fine-tune did: `moved`, the share of tasks whose head it changed (the others kept
    their start), and `moved_gain`, the mean accuracy change on those tasks (nan when none moved)."""
    changed = np.array([not (np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias))
                        for a, b in zip(starts, tuned)])
    gain = score(tuned, tasks) - score(starts, tasks)
    return {"moved": float(changed.mean()),
            "moved_gain": float(gain[changed].mean()) if changed.any() else float("nan")}


def check_shots(shots: list) -> None:
    bad = [n for n in shots if n != "all" and (isinstance(n, bool) or not isinstance(n, int) or n < 1)]
    if bad or len(set(map(str, shots))) != len(shots):
        raise FedtinaError(f"bench.shots={shots}: need distinct positive integers or 'all'")


def _n_key(n: int | str) -> int:
    return 10**6 if n == "all" else int(n)


def run_shots(assets, task_sets: dict[str, list[BenchTask]], cfg: BenchConfig,
              base_rows: dict[str, dict[str, tuple[list[Head], float]]],
              rival) -> dict[str, dict[str, dict[str, float]]]:
    """{"<n>": {row: {id_acc, id_std, ood_acc, ood_std, ood_unseen_recall, ood_seen_recall, personalize_s}}} for
    n in "0" (selection, gidaris, tina) and cfg.shots, plus oracle under "all"; the fine-tuned rows also hold
    `{set}_moved` and `{set}_moved_gain` against their start (`moved`, FT_STARTS); `base_rows[set]` holds the
    benchmark's own heads (selection, gidaris, tina, oracle) for the same tasks; `rival`: the bench's
    GidarisGenerator. The recalls: `tasks.class_recall` on the OOD tasks."""
    check_shots(list(cfg.shots))
    out: dict[str, dict[str, dict[str, float]]] = {}

    def put(n: str, row: str, set_name: str, heads: list[Head], secs: float, tasks: list) -> None:
        acc = score(heads, tasks)
        r = out.setdefault(n, {}).setdefault(row, {})
        r[f"{set_name}_acc"], r[f"{set_name}_std"] = float(acc.mean()), float(acc.std())
        if set_name == "ood":
            r.update({f"ood_{key}": v for key, v in class_recall(heads, tasks, assets.split.unseen).items()})
        r["personalize_s"] = r.get("personalize_s", 0.0) + secs / len(task_sets)

    for set_name, tasks in task_sets.items():
        base = base_rows[set_name]
        for row in ("selection", "gidaris", "tina"):
            put("0", row, set_name, *base[row], tasks)
        for n in cfg.shots:
            secs: dict[str, float] = {}

            def timed(row: str, fn: Callable[[], list[Head]]) -> list[Head]:
                t0 = time.perf_counter()
                heads = fn()
                secs[row] = (time.perf_counter() - t0) / len(tasks)
                return heads

            rows = shot_rows(assets, tasks, n, cfg, base["selection"][0], cfg.seed, timed, rival)
            secs["tina_ft"] += secs["tina_text_img"]   # generation + tuning
            secs["imprint_ft"] += secs["imprint"]
            for row, heads in rows.items():
                put(str(n), row, set_name, heads, secs[row], tasks)
            for row, start in FT_STARTS.items():
                starts = base["selection"][0] if start == "selection" else rows[start]
                out[str(n)][row].update({f"{set_name}_{k}": v for k, v in moved(starts, rows[row], tasks).items()})
        if "all" in [str(n) for n in cfg.shots]:
            put("all", "oracle", set_name, *base["oracle"], tasks)
    return out
