"""The Tina paper's analyses on this benchmark, one command each (every point is a cached zoo and Tina):

    python -m fedtina.experiments.analyses analysis=classes        # classes per task k: the zoo's tasks and the test tasks
    python -m fedtina.experiments.analyses analysis=zoo_size       # personalized heads in the zoo Tina trains on
    python -m fedtina.experiments.analyses analysis=tina_size      # the network: d_model x depth
    python -m fedtina.experiments.analyses analysis=sample_steps   # DDIM steps at generation (one Tina)
    python -m fedtina.experiments.analyses analysis=descriptions   # prompts that are sentences: Tina trained on names / a mix

Each point is scored on the benchmark's ID and OOD task sets (fedtina/zoo/tasks.py, 100 tasks each, seeded) by the rows
that could explain a result away: `selection` (generic rows), `retrieval` (the zoo's rows of the nearest-named
class), `tina` and `oracle` (fine-tuned on every zoo-part image of the task). Each axis's values are in
configs/analysis/<name>.yaml; `analysis.values=[...]` overrides them.
The descriptions analysis needs `dataset.descriptions` (the embedded data's generated sentences by default).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from fedtina.assets import Assets, build_assets
from fedtina.config import AnalysisConfig, BenchConfig, CoreConfig, core_config, from_dict
from fedtina.data.descriptions import as_text_prompt, load_descriptions
from fedtina.errors import FedtinaError
from fedtina.experiments.harness import Result
from fedtina.tina.generator import TinaGenerator
from fedtina.zoo.baselines import TextBaselines
from fedtina.zoo.heads import Head, generic_rows, oracle_heads, selection_head
from fedtina.zoo.tasks import BenchTask, sample_task_sets, score, selection_heads, task_data

ASSETS = None   # every point builds its own (a cached zoo and Tina per value)

log = logging.getLogger("fedtina.experiments.analyses")

AXES = ("classes", "zoo_size", "tina_size", "sample_steps", "descriptions")   # values: configs/analysis/<name>.yaml
MIX_SENTENCES = 0.5   # descriptions analysis, "mix": P(a training text prompt is the class's sentence)


def _scores(heads: list[Head], tasks: list[BenchTask]) -> dict[str, float]:
    acc = score(heads, tasks)
    return {"acc": float(acc.mean()), "std": float(acc.std())}


class Point:
    """One analysis point: the assets, the task sets, and the rows scored on them."""

    def __init__(self, assets: Assets, bench: BenchConfig) -> None:
        self.assets, self.bench = assets, bench
        self.tasks = {s: [task_data(assets, ids) for ids in sets] for s, sets in sample_task_sets(assets, bench).items()}
        self.rows: dict[str, dict[str, float]] = {}

    def put(self, row: str, make) -> None:
        for set_name, tasks in self.tasks.items():
            t0 = time.perf_counter()
            heads = make(tasks)
            r = self.rows.setdefault(row, {})
            s = _scores(heads, tasks)
            r[f"{set_name}_acc"], r[f"{set_name}_std"] = s["acc"], s["std"]
            r[f"{set_name}_s_per_task"] = (time.perf_counter() - t0) / len(tasks)

    def baselines(self) -> None:
        text = TextBaselines(self.assets)
        self.put("selection", lambda tasks: selection_heads(self.assets, tasks))
        self.put("retrieval", lambda tasks: [text.retrieval(t.class_names) for t in tasks])
        self.put("oracle", lambda tasks: oracle_heads(selection_heads(self.assets, tasks),
                                                       [(t.train_x, t.train_y) for t in tasks],
                                                       self.assets.cfg.zoo.finetune))

    def tina(self, row: str, tina: TinaGenerator, steps: int | None = None,
             descriptions: dict[str, str] | None = None) -> None:
        def make(tasks):
            names = [list(t.class_names) for t in tasks]
            texts = [[descriptions[n] for n in s] for s in names] if descriptions else None
            return tina.generate(names, steps=steps, texts=texts)
        self.put(row, make)


def _core_for(core: CoreConfig, bench: BenchConfig, name: str, value) -> tuple[CoreConfig, BenchConfig]:
    """The config of one point of axis `name`."""
    if name == "classes":
        k = int(value)
        zoo = dataclasses.replace(core.zoo, k_min=k, k_max=k)
        tina = dataclasses.replace(core.tina, max_classes=max(core.tina.max_classes, k))
        return (dataclasses.replace(core, zoo=zoo, tina=tina),
                dataclasses.replace(bench, k=k, ood_unseen=max(1, round(0.3 * k))))
    if name == "zoo_size":
        return dataclasses.replace(core, zoo=dataclasses.replace(core.zoo, num_tasks=int(value))), bench
    if name == "tina_size":
        try:
            d_model, depth = (int(v) for v in str(value).split("x"))
        except ValueError:
            raise FedtinaError(f"analysis=tina_size: value {value!r} is not '<d_model>x<depth>', e.g. 128x4") from None
        return dataclasses.replace(core, tina=dataclasses.replace(core.tina, d_model=d_model, depth=depth)), bench
    return core, bench


def check(cfg: dict) -> None:
    from fedtina.validate import validate_core_config

    validate_core_config(cfg)
    analysis, core = from_dict(AnalysisConfig, cfg.get("analysis")), core_config(cfg)
    if analysis.name not in AXES:
        raise FedtinaError(f"unknown analysis {analysis.name!r}; valid: {', '.join(AXES)}")
    if not list(analysis.values):
        raise FedtinaError(f"analysis={analysis.name}: analysis.values is empty")
    if analysis.name == "descriptions" and not core.dataset.descriptions:
        raise FedtinaError("analysis=descriptions needs dataset.descriptions ('generated' for shapes, or a file of "
                           "'name<TAB>sentence' lines)")


def run_analysis(core: CoreConfig, bench: BenchConfig, cfg: AnalysisConfig) -> dict:
    values = list(cfg.values)
    points, baselines = {}, {}   # baselines: per (zoo, task sets), shared by the points that only change Tina
    for value in values:
        t0 = time.perf_counter()
        point_core, point_bench = _core_for(core, bench, cfg.name, value)
        if cfg.name == "descriptions":
            point_core = _with_sentences(point_core, value)
        assets = build_assets(point_core, log=log.info, with_tina=cfg.name not in ("tina_size", "descriptions"))
        point = Point(assets, point_bench)
        key = (str(assets.zoo_dir), point_bench.k, point_bench.ood_unseen)
        if key not in baselines:
            point.baselines()
            baselines[key] = {row: dict(r) for row, r in point.rows.items()}
        point.rows.update({row: dict(r) for row, r in baselines[key].items()})
        if cfg.name == "sample_steps":
            point.tina("tina", assets.tina, steps=int(value))
        elif cfg.name == "tina_size":
            tina = assets.tina_variant(log.info, d_model=point_core.tina.d_model, depth=point_core.tina.depth)
            point.tina("tina", tina)
            point.rows["tina"]["params"] = sum(p.numel() for p in tina.model.parameters())
        elif cfg.name == "descriptions":
            tina = assets.tina_variant(log.info, prompt_sentences=point_core.tina.prompt_sentences)
            sentences = load_descriptions(core.dataset.descriptions, assets.dataset.class_names)
            point.tina("tina_names", tina)
            point.tina("tina_sentences", tina, descriptions=sentences)
            point.put("selection_sentences", lambda tasks: sentence_selection(assets, tasks, sentences))
        else:
            point.tina("tina", assets.tina)
        points[str(value)] = {"rows": point.rows, "seconds": time.perf_counter() - t0, "k": point_bench.k,
                              "ood_unseen": point_bench.ood_unseen}
        log.info("[analysis] %s=%s: %s", cfg.name, value, {r: round(v["ood_acc"], 3) for r, v in point.rows.items()})
    return {"analysis": cfg.name, "values": [str(v) for v in values], "points": points}


def _with_sentences(core: CoreConfig, value: str) -> CoreConfig:
    if value not in ("names", "mix"):
        raise FedtinaError(f"analysis=descriptions: value {value!r} must be 'names' (Tina trained on names) or "
                           f"'mix' (on names and sentences)")
    share = MIX_SENTENCES if value == "mix" else 0.0
    return dataclasses.replace(core, tina=dataclasses.replace(core.tina, prompt_sentences=share))


def sentence_selection(assets: Assets, tasks: list[BenchTask], sentences: dict[str, str]) -> list[Head]:
    """The cheap baseline for a client that only describes its classes: each class gets the generic row of the
    seen class whose description is nearest to its own (the server knows the seen classes' descriptions)."""
    rows = generic_rows(assets.bank, assets.dataset.class_names)
    by_sentence = {sentences.get(n, n): rows[n] for n in rows}
    embed = lambda texts: assets.encoder.embed_names([as_text_prompt(t) for t in texts])  # noqa: E731
    heads = []
    for t in tasks:
        said = [sentences.get(n, n) for n in t.class_names]
        h = selection_head(said, by_sentence, embed)
        heads.append(Head(t.class_names, h.weight, h.bias))
    return heads


def format_analysis(result: dict) -> str:
    rows = list(dict.fromkeys(r for p in result["points"].values() for r in p["rows"]))
    lines = []
    for set_name in ("id", "ood"):
        lines.append(f"{set_name.upper()} {result['analysis']:<16}" + "".join(f"{v:>14}" for v in result["values"]))
        for row in rows:
            cells = []
            for v in result["values"]:
                r = result["points"][v]["rows"].get(row)
                cells.append(f"{100 * r[f'{set_name}_acc']:.1f} ± {100 * r[f'{set_name}_std']:.1f}" if r else "")
            lines.append(f"{row:<20}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def plot_analysis(path: Path, result: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = result["values"]
    rows = list(dict.fromkeys(r for p in result["points"].values() for r in p["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, set_name in zip(axes, ("id", "ood")):
        for row in rows:
            ys = [100 * result["points"][v]["rows"][row][f"{set_name}_acc"] for v in values]
            ax.plot(values, ys, marker="o", label=row)
        ax.set_title(f"{result['dataset']}: {set_name.upper()} tasks")
        ax.set_xlabel(result["analysis"])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: dict, assets: None, out_dir: Path) -> Result:
    core, bench = core_config(cfg), from_dict(BenchConfig, cfg.get("bench"))
    analysis = from_dict(AnalysisConfig, cfg.get("analysis"))
    result = {"dataset": core.dataset.name, **run_analysis(core, bench, analysis)}
    return Result(result, format_analysis, {f"{analysis.name}.png": plot_analysis})


if __name__ == "__main__":
    from fedtina.experiments import harness
    harness.main(__spec__.name)
