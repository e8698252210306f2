"""The core benchmark: how well each way of personalizing a head does on tasks Tina never saw.

    python -m fedtina.experiments.bench dataset=shapes            # embedded dataset, offline
    python -m fedtina.experiments.bench dataset=caltech101        # ../shared/data/caltech101-32.zip

Protocol (seeded; see fedtina/data/split.py): classes are split into seen and unseen; each class's images into a backbone,
a zoo and a test part. The generic model trains on backbone-part images of seen classes only; zoo heads and every
fine-tuning below use zoo-part images only; every accuracy is measured on test-part images.
Task sets: ID = new subsets of seen classes (none identical to a zoo task); OOD = subsets holding unseen classes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fedtina.assets import Assets, novel_classes, zoo_shots
from fedtina.config import BenchConfig, HeadTrainConfig, core_config, from_dict
from fedtina.data import load_dataset
from fedtina.data.split import check_task_size, make_split
from fedtina.experiments.harness import Result
from fedtina.tina.generator import TinaGenerator
from fedtina.tina.rival import GidarisGenerator, train_rival
from fedtina.tina.shots import SHOT_ROWS, check_shots, run_shots
from fedtina.zoo.baselines import TextBaselines, memorization, novelty, wrong_names
from fedtina.zoo.heads import Head, accuracy, finetune_heads, oracle_heads, train_scratch_heads
from fedtina.zoo.tasks import BenchTask, class_recall, sample_task_sets, score, selection_heads, task_data

ASSETS = "core"
log = logging.getLogger("fedtina.experiments.bench")

ROWS = ("selection", "ridge", "soft_selection", "retrieval", "gidaris", "tina", "tina_regress", "tina_best_of_n",
        "tina_mean_of_n", "tina_wrong_names", "tina_ft", "oracle", "scratch")


def personalize(assets: Assets, tasks: list[BenchTask], cfg: BenchConfig, regress: TinaGenerator,
                rival: GidarisGenerator) -> dict[str, tuple[list[Head], float]]:
    """Every row's heads for `tasks`, with the wall time per task of producing them: each method runs batched over
    all tasks at once, and the time is divided by the number of tasks (amortized, as a server would serve them).
    ``regress``: Tina's network trained by plain regression on the same zoo (the tina_regress row); ``rival``: the
    Gidaris & Komodakis generator trained on Tina's episodes (fedtina/tina/rival.py; the gidaris row, names only)."""
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
    timed("gidaris", lambda: rival.generate([t.class_names for t in tasks]))
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


def run_bench(assets: Assets, cfg: BenchConfig) -> dict:
    task_sets = sample_task_sets(assets, cfg)
    result: dict[str, dict] = {row: {} for row in ROWS}
    tasks_by_set, heads_by_set = {}, {}
    regress = assets.tina_variant(log.info, objective="regress")   # does the diffusion matter?
    rival = train_rival(assets.zoo.entries(), assets.encoder, assets.cfg.tina, log=log.info,   # it imprints: backbone
                        shots=zoo_shots(assets.dataset, assets.split, assets.bank.features),  # features, always
                        novel=novel_classes(assets.dataset, assets.split) or None, hidden_share=cfg.rival_hidden_share)
    for set_name, class_sets in task_sets.items():
        tasks = tasks_by_set[set_name] = [task_data(assets, ids) for ids in class_sets]
        log.info("[bench] %s: %d tasks of k=%d", set_name.upper(), len(tasks), cfg.k)
        heads_by_set[set_name] = personalize(assets, tasks, cfg, regress, rival)
        for row, (heads, secs) in heads_by_set[set_name].items():
            acc = score(heads, tasks)
            result[row][f"{set_name}_acc"] = float(acc.mean())
            result[row][f"{set_name}_std"] = float(acc.std())
            result[row].setdefault("personalize_s", {})[set_name] = secs
            if set_name == "ood":   # unseen vs seen classes' recall, apart from the task accuracy
                recall = class_recall(heads, tasks, assets.split.unseen)
                result[row].update({f"ood_{key}": v for key, v in recall.items()})
    d = assets.bank.features.shape[1]
    result["k"] = cfg.k
    for row in ROWS:
        result[row]["personalize_s"] = float(np.mean(list(result[row]["personalize_s"].values())))
        result[row]["generated_params"] = cfg.k * (d + 1) if row.startswith("tina") or row == "gidaris" else 0
    result["novelty"] = novelty(assets, tasks_by_set["id"], heads_by_set["id"]["tina"][0],
                                heads_by_set["id"]["selection"][0], assets.cfg.zoo.finetune, cfg.seed)
    if cfg.ood_unseen and len(assets.split.unseen):
        result["memorization"] = memorization(assets, tasks_by_set["ood"], heads_by_set["ood"]["tina"][0],
                                              heads_by_set["ood"]["selection"][0], assets.cfg.zoo.finetune, cfg.seed)
    if cfg.shots:
        result["shots"] = run_shots(assets, tasks_by_set, cfg, heads_by_set, rival)
    return result


def gain_captured(result: dict, set_name: str) -> float:
    """(tina - selection) / (oracle - selection): share of the oracle's gain over selection that Tina captures."""
    sel, tina, orc = (result[r][f"{set_name}_acc"] for r in ("selection", "tina", "oracle"))
    return float((tina - sel) / (orc - sel)) if orc != sel else float("nan")


def format_table(result: dict) -> str:
    lines = [f"{'method':<17} {'ID acc':>15} {'OOD acc':>15} {'OOD recall u/s':>15} {'personalize s':>14} "
             f"{'gen. params':>12}"]
    for row in ROWS:
        r = result[row]
        lines.append(f"{row:<17} {r['id_acc']:>8.3f} ± {r['id_std']:.3f} {r['ood_acc']:>8.3f} ± {r['ood_std']:.3f} "
                     f"{_recall_cell(r):>15} {r['personalize_s']:>14.4f} {r['generated_params']:>12}")
    lines.append("OOD recall u/s: mean per-class recall of the OOD tasks' unseen / seen classes")
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
    if "memorization" in result:
        lines.extend(format_memorization(result["memorization"]))
    lines.append(f"prompt check: tina given other classes' names {100 * result['tina_wrong_names']['id_acc']:.1f} "
                 f"(ID) / {100 * result['tina_wrong_names']['ood_acc']:.1f} (OOD) vs chance "
                 f"{100 / result['k']:.1f}")
    return "\n".join(lines)


def _recall_cell(r: dict) -> str:
    return f"{100 * r['ood_unseen_recall']:.1f} / {100 * r['ood_seen_recall']:.1f}" if "ood_unseen_recall" in r else ""


def format_memorization(m: dict) -> list[str]:
    """The memorization check's lines (zoo.baselines.memorization)."""
    verdict = "nearer the zoo than" if m["to_zoo"] < m["noise_to_zoo"] else "no nearer the zoo than"
    return [f"memorization (OOD, unseen classes): Tina's rows are {m['to_zoo']:.3f} (median) from the nearest zoo "
            f"row of any class, zoo rows + noise (scale {m['noise_scale']:.3f}: the zoo's row-to-other-class gap) "
            f"{m['noise_to_zoo']:.3f}: ratio {m['ratio']:.2f}, {verdict} a row of a class the zoo lacks",
            f"memorization (OOD heads): Tina's test mistakes overlap its nearest zoo head's by {m['head_overlap']:.2f} "
            f"(IoU); two fine-tunes of the task share {m['fine_tune_overlap']:.2f}"]


def format_shots(shots: dict[str, dict[str, dict[str, float]]]) -> str:
    """The shots axis: accuracy (%) per row and n, ID and OOD side by side, then the OOD tasks' per-class recall of
    unseen / seen classes (%)."""
    ns = list(shots)
    rows = list(dict.fromkeys(r for n in ns for r in shots[n]))
    lines = []
    for set_name in ("id", "ood"):
        lines.append(f"{set_name.upper():<14}" + "".join(f"{'n=' + n:>14}" for n in ns))
        for row in rows:
            cells = [f"{100 * shots[n][row][f'{set_name}_acc']:.1f} ± {100 * shots[n][row][f'{set_name}_std']:.1f}"
                     if row in shots[n] else "" for n in ns]
            lines.append(f"{row:<14}" + "".join(f"{c:>14}" for c in cells))
    if any("ood_unseen_recall" in r for n in ns for r in shots[n].values()):
        lines.append(f"{'OOD recall u/s':<14}" + "".join(f"{'n=' + n:>14}" for n in ns))
        for row in rows:
            lines.append(f"{row:<14}" + "".join(f"{_recall_cell(shots[n].get(row, {})):>14}" for n in ns))
    if any("ood_moved" in r for n in ns for r in shots[n].values()):
        lines.append(f"{'OOD ft moved':<14}" + "".join(f"{'n=' + n:>14}" for n in ns))
        for row in [r for r in rows if any("ood_moved" in shots[n].get(r, {}) for n in ns)]:
            lines.append(f"{row:<14}" + "".join(f"{_moved_cell(shots[n].get(row, {})):>14}" for n in ns))
        lines.append("OOD ft moved: share of tasks whose head the hold-out-picked fine-tune changed (%) / their mean "
                     "accuracy change (pts)")
    return "\n".join(lines)


def _moved_cell(r: dict) -> str:
    if "ood_moved" not in r:
        return ""
    gain = r["ood_moved_gain"]
    return f"{100 * r['ood_moved']:.0f} / {'-' if gain != gain else f'{100 * gain:+.1f}'}"


def format_report(report: dict) -> str:
    return format_table(report) + (f"\n{format_shots(report['shots'])}" if "shots" in report else "")


def plot_shots(path: Path, report: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = report["shots"]
    ns = [n for n in shots if n != "0"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, set_name in zip(axes, ("id", "ood")):
        for row in SHOT_ROWS:
            ax.plot(ns, [100 * shots[n][row][f"{set_name}_acc"] for n in ns], marker="o", label=row)
        for row, style in (("selection", ":"), ("tina", "--")):
            ax.axhline(100 * shots["0"][row][f"{set_name}_acc"], ls=style, color="gray", label=f"{row} (n=0)")
        if "oracle" in shots.get("all", {}):
            ax.axhline(100 * shots["all"]["oracle"][f"{set_name}_acc"], ls="-.", color="black", label="oracle")
        ax.set_title(f"{report['dataset']}: {set_name.upper()} tasks")
        ax.set_xlabel("labelled images per class (n)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check(cfg: dict) -> None:
    """bench.shots, and bench.k against the protocol's classes (the dataset and its split are cheap, the backbone is
    not: a novel share that leaves the generic model fewer classes than a task fails here)."""
    bench = from_dict(BenchConfig, cfg.get("bench"))
    check_shots(list(bench.shots))
    core = core_config(cfg)
    split = make_split(load_dataset(core.dataset, core.cache_path), core.protocol)
    check_task_size(split, bench.k, "bench.k", core.protocol.novel_share)


def run(cfg: dict, assets: Assets, out_dir: Path) -> Result:
    bench = from_dict(BenchConfig, cfg.get("bench"))
    result = run_bench(assets, bench)
    report = {"dataset": assets.dataset.name, "encoder": assets.encoder.id, "num_tasks": bench.num_tasks,
              "timings": assets.timings, "id_gain_captured": gain_captured(result, "id"), **result,
              "seen_classes": [assets.dataset.class_names[c] for c in assets.split.seen],   # the zoo's classes
              "novel_classes": [assets.dataset.class_names[c] for c in assets.split.novel],  # seen, not the backbone's
              "unseen_classes": [assets.dataset.class_names[c] for c in assets.split.unseen]}
    return Result(report, format_report, {"shots.png": plot_shots} if "shots" in result else {})


if __name__ == "__main__":
    from fedtina.experiments import harness
    harness.main(__spec__.name)
