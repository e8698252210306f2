"""The core benchmark: how well each way of personalizing a head does on tasks Tina never saw.

    python -m fedtina.experiments.bench dataset=shapes            # embedded dataset, offline
    python -m fedtina.experiments.bench dataset=caltech101        # ../shared/data/caltech101-32.zip

Protocol (seeded; see fedtina/data/split.py): classes are split into seen and unseen; each class's images into a backbone,
a zoo and a test part. The generic model trains on backbone-part images of seen classes only; zoo heads and every
fine-tuning below use zoo-part images only; every accuracy is measured on test-part images.
Task sets: ID = new subsets of seen classes (none identical to a zoo task); OOD = subsets holding unseen classes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedtina.assets import Assets, build_assets
from fedtina.experiments.baselines import TextBaselines, novelty, wrong_names
from fedtina.experiments.shots import format_shots, plot_shots, run_shots
from fedtina.config import BenchConfig, CoreConfig, HeadTrainConfig, from_dict
from fedtina.zoo.heads import (Head, accuracy, finetune_heads, generic_rows, oracle_heads, selection_head,
                           train_scratch_heads)
from fedtina.data.split import sample_ood_tasks, sample_tasks
from fedtina.tina.generator import TinaGenerator

log = logging.getLogger("fedtina.experiments.bench")

ROWS = ("selection", "ridge", "soft_selection", "retrieval", "tina", "tina_regress", "tina_best_of_n",
        "tina_mean_of_n", "tina_wrong_names", "tina_ft", "oracle", "scratch")


@dataclass
class BenchTask:
    """One personalization task: its classes and their zoo-part (train) and test-part features; ``train_p``: the
    zoo-part images' features for image prompts (the backbone's, or CLIP's: encoder.image_prompts)."""

    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_p: np.ndarray


def task_data(assets: Assets, class_ids: tuple[int, ...]) -> BenchTask:
    labels, feats = assets.dataset.labels, assets.bank.features
    pos = {c: i for i, c in enumerate(class_ids)}

    def part(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = idx[np.isin(labels[idx], class_ids)]
        return feats[idx], np.array([pos[c] for c in labels[idx]], dtype=np.int64), idx

    names = tuple(assets.dataset.class_names[c] for c in class_ids)
    train_x, train_y, train_idx = part(assets.split.zoo_idx)
    test_x, test_y, _ = part(assets.split.test_idx)
    return BenchTask(class_ids, names, train_x, train_y, test_x, test_y, assets.prompt_features[train_idx])


def sample_task_sets(assets: Assets, cfg: BenchConfig) -> dict[str, list[tuple[int, ...]]]:
    """ID tasks exclude every zoo task; OOD tasks hold `ood_unseen` unseen classes each."""
    rng = np.random.default_rng(cfg.seed)
    name_to_id = {n: i for i, n in enumerate(assets.dataset.class_names)}
    zoo_sets = {frozenset(name_to_id[n] for n in e.class_names) for e in assets.zoo.entries()}
    id_tasks = sample_tasks(assets.split.seen, cfg.num_tasks, cfg.k, cfg.k, rng, exclude=zoo_sets)
    ood_tasks = sample_ood_tasks(assets.split.seen, assets.split.unseen, cfg.num_tasks, cfg.k, cfg.ood_unseen, rng)
    return {"id": id_tasks, "ood": ood_tasks}


def selection_heads(assets: Assets, tasks: list[BenchTask]) -> list[Head]:
    rows = generic_rows(assets.bank, assets.dataset.class_names)
    return [selection_head(t.class_names, rows, assets.encoder.embed_names) for t in tasks]


def personalize(assets: Assets, tasks: list[BenchTask], cfg: BenchConfig,
                regress: TinaGenerator) -> dict[str, tuple[list[Head], float]]:
    """Every row's heads for `tasks`, with the wall time per task of producing them: each method runs batched over
    all tasks at once, and the time is divided by the number of tasks (amortized, as a server would serve them).
    ``regress``: Tina's network trained by plain regression on the same zoo (the tina_regress row)."""
    data = [(t.train_x, t.train_y) for t in tasks]
    out: dict[str, tuple[list[Head], float]] = {}

    def timed(name: str, fn: Callable[[], list[Head]]) -> None:
        t0 = time.perf_counter()
        heads = fn()
        out[name] = (heads, (time.perf_counter() - t0) / len(tasks))
        log.info("[bench] %-9s %.4f s/task", name, out[name][1])

    timed("selection", lambda: selection_heads(assets, tasks))
    text = TextBaselines(assets)
    for row in ("ridge", "soft_selection", "retrieval"):
        timed(row, lambda: [getattr(text, row)(t.class_names) for t in tasks])
    timed("tina", lambda: assets.tina.generate([list(t.class_names) for t in tasks]))
    timed("tina_regress", lambda: regress.generate([list(t.class_names) for t in tasks]))
    timed("tina_best_of_n", lambda: samples_of_tina(assets, tasks, cfg.samples, pick="best"))
    timed("tina_mean_of_n", lambda: samples_of_tina(assets, tasks, cfg.samples, pick="mean"))
    wrong = wrong_names([t.class_names for t in tasks], assets.dataset.class_names, cfg.seed)
    timed("tina_wrong_names", lambda: [Head(t.class_names, h.weight, h.bias)   # scored as the true classes
                                       for t, h in zip(tasks, assets.tina.generate(wrong))])
    t0 = time.perf_counter()
    tuned = (oracle_heads if cfg.tina_ft.select else finetune_heads)(out["tina"][0], data, cfg.tina_ft)
    out["tina_ft"] = (tuned, out["tina"][1] + (time.perf_counter() - t0) / len(tasks))  # generation + tuning
    timed("oracle", lambda: oracle_heads(out["selection"][0], data, assets.cfg.zoo.finetune))
    timed("scratch", lambda: train_scratch_heads([t.class_names for t in tasks], data, HeadTrainConfig(
        steps=300, lr=0.05, l2_to_init=0.0, weight_decay=1e-4), assets.bank.features.shape[1]))
    return out


def samples_of_tina(assets: Assets, tasks: list[BenchTask], n: int, pick: str) -> list[Head]:
    """The one use of sampling noise: `n` heads per task (generation seeds 0..n-1); "best": the one with the best
    accuracy on the task's own zoo-part images (a client with labels would pick so), "mean": their average."""
    names = [list(t.class_names) for t in tasks]
    draws = [assets.tina.generate(names, seed=s) for s in range(n)]
    out = []
    for i, t in enumerate(tasks):
        heads = [d[i] for d in draws]
        if pick == "best":
            out.append(max(heads, key=lambda h: accuracy(h, t.train_x, t.train_y)))
        else:
            out.append(Head(t.class_names, np.mean([h.weight for h in heads], 0), np.mean([h.bias for h in heads], 0)))
    return out


def score(heads: list[Head], tasks: list[BenchTask]) -> np.ndarray:
    return np.array([accuracy(h, t.test_x, t.test_y) for h, t in zip(heads, tasks)])


def run_bench(assets: Assets, cfg: BenchConfig) -> dict:
    task_sets = sample_task_sets(assets, cfg)
    result: dict[str, dict] = {row: {} for row in ROWS}
    tasks_by_set, heads_by_set = {}, {}
    regress = assets.tina_variant(log.info, objective="regress")   # does the diffusion matter?
    for set_name, class_sets in task_sets.items():
        tasks = tasks_by_set[set_name] = [task_data(assets, ids) for ids in class_sets]
        log.info("[bench] %s: %d tasks of k=%d", set_name.upper(), len(tasks), cfg.k)
        heads_by_set[set_name] = personalize(assets, tasks, cfg, regress)
        for row, (heads, secs) in heads_by_set[set_name].items():
            acc = score(heads, tasks)
            result[row][f"{set_name}_acc"] = float(acc.mean())
            result[row][f"{set_name}_std"] = float(acc.std())
            result[row].setdefault("personalize_s", {})[set_name] = secs
    d = assets.bank.features.shape[1]
    result["k"] = cfg.k
    for row in ROWS:
        result[row]["personalize_s"] = float(np.mean(list(result[row]["personalize_s"].values())))
        result[row]["generated_params"] = cfg.k * (d + 1) if row.startswith("tina") else 0
    result["novelty"] = novelty(assets, tasks_by_set["id"], heads_by_set["id"]["tina"][0],
                                heads_by_set["id"]["selection"][0], assets.cfg.zoo.finetune, cfg.seed)
    if cfg.shots:
        result["shots"] = run_shots(assets, tasks_by_set, cfg, heads_by_set, score)
    return result


def gain_captured(result: dict, set_name: str) -> float:
    """(tina - selection) / (oracle - selection): share of the oracle's gain over selection that Tina captures."""
    sel, tina, orc = (result[r][f"{set_name}_acc"] for r in ("selection", "tina", "oracle"))
    return float((tina - sel) / (orc - sel)) if orc != sel else float("nan")


def format_table(result: dict) -> str:
    lines = [f"{'method':<17} {'ID acc':>15} {'OOD acc':>15} {'personalize s':>14} {'gen. params':>12}"]
    for row in ROWS:
        r = result[row]
        lines.append(f"{row:<17} {r['id_acc']:>8.3f} ± {r['id_std']:.3f} {r['ood_acc']:>8.3f} ± {r['ood_std']:.3f} "
                     f"{r['personalize_s']:>14.4f} {r['generated_params']:>12}")
    gap = {s: {r: result[r][f"{s}_acc"] - result["selection"][f"{s}_acc"] for r in ("tina", "oracle")}
           for s in ("id", "ood")}
    lines.append(f"ID: tina - selection {100 * gap['id']['tina']:+.1f} pts, oracle - selection "
                 f"{100 * gap['id']['oracle']:+.1f} pts: Tina captures {gain_captured(result, 'id'):.2f} of the "
                 f"oracle's gain (target >= 0.80)")
    lines.append(f"OOD: tina - selection {100 * gap['ood']['tina']:+.1f} pts (target: a clear margin)")
    if "novelty" in result:
        nv = result["novelty"]
        lines.append(f"novelty (ID): Tina's rows are {nv['to_zoo']:.3f} (median, relative) from the nearest zoo row of "
                     f"their class; two fine-tunes of one task differ by {nv['between_fine_tunes']:.3f}")
    lines.append(f"prompt check: tina given other classes' names {100 * result['tina_wrong_names']['id_acc']:.1f} "
                 f"(ID) / {100 * result['tina_wrong_names']['ood_acc']:.1f} (OOD) vs chance "
                 f"{100 / result['k']:.1f}")
    return "\n".join(lines)


def main_from_dict(cfg: dict, out_dir: Path) -> dict:
    from fedtina.validate import validate_core_config

    validate_core_config(cfg)   # before the build: a bad value fails in a second, naming its key
    core = from_dict(CoreConfig, {k: v for k, v in cfg.items() if k != "bench"})
    bench_cfg = from_dict(BenchConfig, cfg.get("bench"))
    t0 = time.perf_counter()
    assets = build_assets(core, log=log.info)
    setup_s = time.perf_counter() - t0
    result = run_bench(assets, bench_cfg)
    report = {"dataset": assets.dataset.name, "encoder": assets.encoder.id, "num_tasks": bench_cfg.num_tasks,
              "k": bench_cfg.k, "setup_s": setup_s, "timings": assets.timings,
              "id_gain_captured": gain_captured(result, "id"), **result,
              "seen_classes": [assets.dataset.class_names[c] for c in assets.split.seen],   # the backbone's classes
              "unseen_classes": [assets.dataset.class_names[c] for c in assets.split.unseen],
              "config": {"core": asdict(core), "bench": asdict(bench_cfg)}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    print(format_table(result))
    if "shots" in result:
        print(format_shots(result["shots"]))
        plot_shots(out_dir / "shots.png", result["shots"], assets.dataset.name)
    print(f"setup {setup_s:.1f} s; results in {out_dir / 'bench.json'}")
    return report


if __name__ == "__main__":
    from fedtina.experiments.harness import hydra_entry

    hydra_entry("bench", main_from_dict, log)
