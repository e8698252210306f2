"""What an upload is worth: later clients' zero-shot accuracy on a class against the uploads that contained it.

    python -m fedtina.experiments.uploads [dataset=caltech101] [clients=500] [cohorts=5]

The simulation's partition, with more clients holding classes the backbone never saw (partition.unseen_share). Its
new clients are the fixed probe set: the same clients and images at every measurement, never uploading. A share of
the unseen classes is withheld: contributors holding one never upload, so those classes reach no zoo (the "near
names" question). The other old clients contribute in `cohorts`: each gets Tina's head, fine-tunes it on its labels
(head_ft) and uploads it; an echo (the sent head unchanged) is dropped; the server's gate (checks) admits the rest to
the zoo (the Tina service, fedtina/tina/service.py); Tina is refreshed after every cohort with an accepted head
(`steps_per_head` x accepted heads, warm start: the simulation's 30 steps per 20 heads), adopted only when the
server's probe set (method.tina.probe_tasks label sets over its held-out images) does not score it lower.
The many-clients regime, where a contributor holds about one labelled image per class as at 10,000 simulated
clients: `'partition.labels_per_class=[1,2]'`. After each cohort the probes
are served zero-shot, and each (probe, unseen class) pair is scored by the class's recall inside the probe's task,
against the number of accepted uploads that contained the class so far. On the same probes and uploads:

* selection: the nearest-name generic rows (fixed; the floor);
* row bank: per class name, the mean of the uploaded rows for it (selection's row for a class never uploaded);
* tina_bank: a row bank over Tina's head, for the classes the prepared zoo lacks (method.tina.bank's rule):
  generation for what no upload holds, the uploads' own rows for what they do;
* FedAvg: the global head, one round per cohort over the same contributors (method.fedavg's local epochs; the
  clients' step and Flower's weighted mean, as in the simulation);
* Tina retrained from scratch on the grown zoo (`retrain_at`: after those cohorts; tina.train_steps steps);
* local_ft: selection's head fine-tuned on the probe's own labelled images (head_ft), fixed: what the probe's own
  labels give it, which no zero-shot row uses.

Writes uploads.json, uploads.md and uploads.png into the run dir.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from fedtina.client import ops as client_ops
from fedtina.config import HeadTrainConfig, from_dict
from fedtina.data.partition import PartitionConfig
from fedtina.errors import FedtinaError
from fedtina.experiments.harness import Result
from fedtina.methods.fedavg import FedAvgOptions
from fedtina.methods.tina import TinaOptions
from fedtina.server.gate import HeadCheckConfig
from fedtina.server.strategy import fedavg_mean
from fedtina.tina.offline import World, finetune, make_world, recalls, serve
from fedtina.tina.service import TinaService, uploaded_rows
from fedtina.zoo.heads import Head, RowBank

ASSETS = "simulate"
log = logging.getLogger("fedtina.experiments.uploads")
BINS = [(0, 0), (1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, 10**9)]   # uploads containing the class
METHODS = ("tina", "tina_bank", "row_bank", "fedavg", "selection", "local_ft")


def bin_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else (f"{lo}-{hi}" if hi < 10**9 else f">{lo - 1}")


def bin_of(count: int) -> str:
    return next(bin_label(lo, hi) for lo, hi in BINS if lo <= count <= hi)


def near_names(withheld: list[str], uploaded: list[str], min_shared: int) -> list[str]:
    """Withheld classes whose name shares at least `min_shared` words with some uploaded class's name."""
    up = [set(n.split()) for n in uploaded]
    return [n for n in withheld if any(len(set(n.split()) & u) >= min_shared for u in up)]


def fedavg_round(head: Head, data: list[client_ops.ClientData], opts: FedAvgOptions) -> Head:
    """One FedAvg round of the global head (row = dataset class id) over these clients: each one's local step, then
    Flower's example-weighted mean."""
    updates = []
    for d in data:
        w, b = client_ops.fedavg_local_train(head.weight, head.bias, d, opts.epochs, opts.lr, opts.batch_size)
        updates.append(({"weight": w, "bias": b}, len(d.train_y)))
    mean = fedavg_mean(updates)
    return Head(head.class_names, mean["weight"], mean["bias"])


def measure(world: World, heads: dict[str, dict[int, Head]], bank: RowBank, unseen: set[str], cohort: int,
            pairs: list) -> None:
    """Append one record per (probe, unseen class, method) to `pairs`."""
    for p in world.probes:
        data = world.data[p]
        for method, by_probe in heads.items():
            for name, r in recalls(by_probe[p], data).items():
                if name in unseen:
                    pairs.append({"cohort": cohort, "probe": p, "class": name, "method": method, "recall": r,
                                  "uploads": bank.count(name)})


def _heads(service: TinaService, banks: tuple[RowBank, RowBank], selection: dict[int, Head], fedavg: Head,
           local_ft: dict[int, Head], world: World) -> dict[str, dict[int, Head]]:
    """Every method's head per probe at one measurement. `banks`: the row bank of every uploaded class, and the one
    `tina_bank` lays over Tina's head, of the classes the prepared zoo lacks (method.tina.bank's rule)."""
    bank, tina_bank = banks
    generated = serve(service, world, world.probes)
    return {"tina": generated, "tina_bank": {p: tina_bank.over(h) for p, h in generated.items()},
            "row_bank": {p: bank.over(s) for p, s in selection.items()},
            "fedavg": {p: client_ops.restrict_head(fedavg.weight, fedavg.bias, world.data[p].class_ids,
                                                   world.data[p].class_names) for p in world.probes},
            "selection": selection, "local_ft": local_ft}


def check(cfg: dict) -> None:
    if int(cfg["cohorts"]) < 1 or not 0 <= float(cfg["withheld_share"]) < 1:
        raise FedtinaError(f"cohorts={cfg['cohorts']} withheld_share={cfg['withheld_share']}: need cohorts >= 1 "
                           f"and withheld_share in [0, 1)")


def run_uploads(assets, cfg: dict) -> dict:
    from fedtina.tina.train import train_tina

    part = from_dict(PartitionConfig, cfg["partition"])
    world = make_world(assets, int(cfg["clients"]), part)
    probe_tasks = from_dict(TinaOptions, cfg["method"].get("tina")).probe_tasks
    service = world.service(from_dict(HeadCheckConfig, cfg["checks"]), probe_tasks=probe_tasks)
    ft = from_dict(HeadTrainConfig, cfg["head_ft"])
    names = list(assets.dataset.class_names)
    unseen = sorted(names[c] for c in assets.split.unseen)
    rng = np.random.default_rng([int(part.seed), 21])
    withheld = set(rng.choice(unseen, size=int(round(float(cfg["withheld_share"]) * len(unseen))),
                              replace=False).tolist())
    contributors = [i for i in world.contributors if not withheld & set(world.data[i].class_names)]
    if not contributors or not world.probes:
        raise FedtinaError(f"clients={cfg['clients']}: no contributor or no probe left (contributors holding a "
                           f"withheld class never upload); use more clients")
    cohorts = np.array_split(np.asarray(contributors), int(cfg["cohorts"]))
    fedavg_opts = from_dict(FedAvgOptions, cfg["method"].get("fedavg"))
    fedavg = service.reference.global_head()
    selection = {p: service.reference.selection(world.data[p].class_names) for p in world.probes}
    local_ft = finetune(world, selection, ft)
    bank, accepted_at, pairs, costs = RowBank(), [], [], []
    banks = (bank, uploaded_rows(service.zoo))
    measure(world, _heads(service, banks, selection, fedavg, local_ft, world), bank, set(unseen), 0, pairs)
    for t, ids in enumerate(cohorts, start=1):
        t0 = time.perf_counter()
        ids = [int(i) for i in ids]
        sent = serve(service, world, ids)
        honest = finetune(world, sent, ft)
        ups = [world.upload(i, sent[i], honest[i]) for i in ids]
        echoes = sum(u.echo for u in ups)                       # the sent head unchanged: dropped, as the server does
        ups = [u for u in ups if not u.echo]
        ok = [u for u, v in zip(ups, service.gate(ups)) if v.accepted]
        service.admit([u.entry() for u in ok])
        accepted_at += [(t, u) for u in ok]
        for u in ok:
            for b in banks:
                b.add(u.head)
        fedavg = fedavg_round(fedavg, [world.data[i] for i in ids], fedavg_opts)
        steps = max(1, int(round(float(cfg["steps_per_head"]) * len(ok))))
        t1 = time.perf_counter()
        decision = service.refresh(steps) if ok else None
        refresh_s = time.perf_counter() - t1
        heads = _heads(service, banks, selection, fedavg, local_ft, world)
        cost = {"cohort": t, "contributors": len(ids), "accepted": len(ok), "echoes": echoes, "zoo": len(service.zoo),
                "images_per_class": float(np.mean([u.images for u in ok])) if ok else None,
                "refresh_steps": steps if ok else 0, "refresh_s": refresh_s,
                "refresh": "" if decision is None else ("adopted" if decision.adopted else "rolled back"),
                "probe_before": None if decision is None else decision.before,
                "probe_after": None if decision is None else decision.after}
        if t in [int(x) for x in cfg["retrain_at"]]:
            t2 = time.perf_counter()
            scratch = train_tina(service.zoo.entries(), assets.encoder, assets.tina.cfg, log=None,
                                 shots=assets.shots, descriptions=assets.descriptions)
            cost["retrain_s"] = time.perf_counter() - t2
            heads["tina_retrained"] = serve(dataclasses.replace(service, tina=scratch), world, world.probes)
        measure(world, heads, bank, set(unseen), t, pairs)
        costs.append(cost)
        log.info("[uploads] cohort %d: %d contributors, %d accepted, zoo %d; refresh %d steps in %.1f s%s; "
                 "%.1f s", t, len(ids), len(ok), cost["zoo"], steps, refresh_s,
                 f", retrain {cost['retrain_s']:.0f} s" if "retrain_s" in cost else "", time.perf_counter() - t0)
    uploaded = sorted(n for n in unseen if bank.count(n) > 0)
    near = near_names(sorted(withheld), uploaded, int(cfg["near_words"]))
    return {"dataset": assets.dataset.name, "unseen": unseen, "withheld": sorted(withheld), "near": near,
            "probes": len(world.probes), "contributors": len(contributors), "costs": costs, "pairs": pairs,
            "accepted": [{"client": u.client, "cohort": t, "names": list(u.names)} for t, u in accepted_at]}


def summarize(result: dict) -> dict:
    """Mean recall (and pair count) per method and uploads bin; and on the withheld near-name classes, per cohort."""
    pairs = result["pairs"]
    withheld, near = set(result["withheld"]), set(result["near"])
    methods = [m for m in (*METHODS, "tina_retrained") if any(p["method"] == m for p in pairs)]
    by_bin: dict[str, dict[str, tuple[float, float, int]]] = {}
    for lo, hi in BINS:
        label = bin_label(lo, hi)
        for m in methods:
            v = [p["recall"] for p in pairs if p["method"] == m and p["class"] not in withheld
                 and lo <= p["uploads"] <= hi]
            if v:
                by_bin.setdefault(label, {})[m] = (float(np.mean(v)), float(np.std(v)), len(v))
    # the same (probe, class) pairs against themselves before any upload: what the uploads added, class difficulty
    # taken out (the row bank and FedAvg start as selection, retrained Tina as Tina)
    start = {(p["probe"], p["class"], p["method"]): p["recall"] for p in pairs if p["cohort"] == 0}
    gain: dict[str, dict[str, tuple[float, float, int]]] = {}
    for lo, hi in BINS:
        label = bin_label(lo, hi)
        for m in methods:
            ref = "tina" if m == "tina_retrained" else m
            v = [p["recall"] - start[(p["probe"], p["class"], ref)] for p in pairs
                 if p["method"] == m and p["cohort"] > 0 and p["class"] not in withheld and lo <= p["uploads"] <= hi]
            if v:
                gain.setdefault(label, {})[m] = (float(np.mean(v)), float(np.std(v)), len(v))
    near_rows = {}
    for t in sorted({p["cohort"] for p in pairs}):
        for m in methods:
            v = [p["recall"] for p in pairs if p["method"] == m and p["cohort"] == t and p["class"] in near]
            if v:
                near_rows.setdefault(t, {})[m] = (float(np.mean(v)), float(np.std(v)), len(v))
    return {"methods": methods, "by_bin": by_bin, "gain": gain, "near": near_rows}


def _cell(v) -> str:
    return f"{100 * v[0]:+.1f} ± {100 * v[1]:.1f} ({v[2]})".lstrip("+") if v else "-"


def format_table(result: dict, summary: dict) -> str:
    ms = summary["methods"]
    lines = [f"# what an upload is worth, {result['dataset']}: {result['probes']} probes, {result['contributors']} "
             f"contributors in {len(result['costs'])} cohorts; recall (%) of unseen classes inside the probes' "
             f"tasks, mean ± std (pairs)",
             "| uploads containing the class | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
    for label, row in summary["by_bin"].items():
        lines.append(f"| {label} | " + " | ".join(_cell(row.get(m)) for m in ms) + " |")
    lines += ["", "the same pairs' change since cohort 0 (before any upload), by the uploads holding the class then:",
              "| uploads containing the class | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
    for label, row in summary["gain"].items():
        lines.append(f"| {label} | " + " | ".join(_cell(row.get(m)) for m in ms) + " |")
    lines += ["", f"withheld unseen classes with near names ({len(result['near'])} of {len(result['withheld'])}; "
              f"never uploaded), per cohort:", "| cohort | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
    for t, row in summary["near"].items():
        lines.append(f"| {t} | " + " | ".join(_cell(row.get(m)) for m in ms) + " |")
    lines += ["", "| cohort | contributors | accepted | images/class | echoes | zoo | refresh steps | refresh | "
                  "server probe before -> after (%) | refresh s | retrain s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["costs"]:
        img = "-" if c.get("images_per_class") is None else f"{c['images_per_class']:.1f}"
        probe = ("-" if c.get("probe_before") is None or c["probe_before"] != c["probe_before"]
                 else f"{100 * c['probe_before']:.1f} -> {100 * c['probe_after']:.1f}")
        lines.append(f"| {c['cohort']} | {c['contributors']} | {c['accepted']} | {img} | {c.get('echoes', 0)} | "
                     f"{c['zoo']} | {c['refresh_steps']} | {c.get('refresh') or '-'} | {probe} | "
                     f"{c['refresh_s']:.1f} | {c.get('retrain_s', float('nan')):.0f} |")
    return "\n".join(lines)


def plot(path: Path, result: dict, summary: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in ((axes[0], "by_bin", "probes' recall of the unseen class (%)"),
                            (axes[1], "gain", "change since before any upload (%, same pairs)")):
        labels = list(summary[key])
        for m in summary["methods"]:
            xs = [i for i, lab in enumerate(labels) if m in summary[key][lab]]
            ys = [100 * summary[key][labels[i]][m][0] for i in xs]
            ax.plot(xs, ys, marker="o", ls="" if m == "tina_retrained" else "-", label=m)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("accepted uploads that contained the class")
        ax.set_ylabel(ylabel)
    axes[0].set_title(f"what an upload is worth ({result['dataset']})", fontsize=10)
    axes[1].set_title("the same (probe, class) pairs against themselves at cohort 0", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(cfg: dict, assets, out_dir: Path) -> Result:
    result = run_uploads(assets, cfg)
    result["summary"] = summarize(result)
    return Result(result, lambda data: format_table(data, data["summary"]),
                  {"uploads.png": lambda path, data: plot(path, data, data["summary"])})


if __name__ == "__main__":
    from fedtina.experiments import harness
    harness.main(__spec__.name)
