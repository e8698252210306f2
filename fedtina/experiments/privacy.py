"""Private uploads: later clients' accuracy against the noise on what clients send.

    python -m fedtina.experiments.privacy ['noise=[0,0.5,1,2,4]'] ['seeds=[0,1,2]'] [clients=200]

Zoo uploads (the upload loop of fedtina/tina/service.py, as in bench_attacks): every contributor's fine-tuned head is
clipped and noised (fedtina/adversary/privacy.py; clip = the median norm of the honest heads' change, measured on
the same contributors) before the gate; Tina is refreshed once on what the gate accepts; the probes are served
zero-shot. FedAvg (one simulation per noise level, method.names=[fedavg]): Flower's client-side fixed clipping (clip
= the median norm of the honest first-round updates) and its DP wrapper's noise; the new clients score the final
head. Epsilon at `privacy.delta` from Flower's RDP accountant: per upload (one release) and for the FedAvg model
after its rounds (no amplification by sampling). Writes privacy.json, privacy.md and privacy.png.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np

from fedtina.config import HeadTrainConfig, core_config, from_dict
from fedtina.server.gate import HeadCheckConfig
from fedtina.data.partition import PartitionConfig
from fedtina.adversary.privacy import PrivacyConfig, clip_and_noise, fedavg_epsilon, upload_epsilon
from fedtina.tina.service import Upload, finetune, gate, make_world, probe, refreshed, serve

log = logging.getLogger("fedtina.experiments.privacy")


def delta_norm(sent, head) -> float:
    return float(np.sqrt(((head.weight - sent.weight) ** 2).sum() + ((head.bias - sent.bias) ** 2).sum()))


def uploads_seed(assets, cfg: dict, seed: int, noise: list[float]) -> dict:
    part = from_dict(PartitionConfig, {**cfg["partition"], "seed": seed})
    world = make_world(assets, int(cfg["clients"]), part, from_dict(HeadCheckConfig, cfg["checks"]))
    ft, steps = from_dict(HeadTrainConfig, cfg["head_ft"]), int(cfg["refresh_steps"])
    tina = assets.tina
    sent = serve(tina, world, world.contributors, seed)
    honest = finetune(world, sent, ft)
    clip = float(np.median([delta_norm(sent[i], honest[i]) for i in world.contributors]))
    before = probe(tina, world).acc
    out = {"seed": seed, "clip": clip, "before_refresh": before, "points": []}
    for sigma in [None, *noise]:   # None: uploads sent as they are
        t0 = time.perf_counter()
        ups = []
        for i in world.contributors:
            head = honest[i]
            if sigma is not None:
                head = clip_and_noise(sent[i], head, clip, float(sigma), np.random.default_rng([seed, i, 7]))
            ups.append(Upload(i, world.data[i].class_names, world.data[i].class_ids, sent[i], head))
        verdicts = gate(world, ups)
        accepted = [u for u, v in zip(ups, verdicts) if v.accepted]
        acc = probe(refreshed(tina, world, accepted, steps), world).acc
        eps = upload_epsilon(PrivacyConfig(upload_clip=clip, upload_noise=float(sigma), delta=float(
            cfg["privacy"]["delta"]))) if sigma is not None else float("inf")
        out["points"].append({"noise": sigma, "accepted": len(accepted) / len(ups), "probe_acc": acc,
                              "epsilon": eps})
        log.info("[privacy] uploads seed %d noise %s: %.0f%% accepted, probes %.3f (before any refresh %.3f), "
                 "epsilon %.2f; %.1f s", seed, sigma, 100 * len(accepted) / len(ups), acc, before, eps,
                 time.perf_counter() - t0)
    return out


def fedavg_clip(assets, base: dict) -> float:
    """The median norm of the honest first-round FedAvg updates of the old clients (same local training)."""
    from fedtina.client import ops as client_ops
    from fedtina.data.partition import make_partition
    from fedtina.zoo.heads import generic_rows, selection_head

    opts = base["method"].get("fedavg") or {}
    part = make_partition(assets.dataset, assets.split, int(base["clients"]),
                          from_dict(PartitionConfig, base["partition"]))
    names = tuple(assets.dataset.class_names)
    init = selection_head(names, generic_rows(assets.bank, list(names)), assets.encoder.embed_names)
    feats = np.asarray(assets.bank.features, np.float32)
    norms = []
    for c in part.clients:
        if c.is_new:
            continue
        w, b = client_ops.fedavg_local_train(init.weight, init.bias, client_ops.client_data(c, feats),
                                             int(opts.get("epochs", 5)), float(opts.get("lr", 0.1)),
                                             int(opts.get("batch_size", 32)))
        norms.append(np.sqrt(((w - init.weight) ** 2).sum() + ((b - init.bias) ** 2).sum()))
    return float(np.median(norms))


def fedavg_sweep(assets, base: dict, out_dir: Path, noise: list[float]) -> dict:
    from fedtina.experiments.robust import honest_scores, run_cell

    base = copy.deepcopy(base)
    base["method"] = {**base["method"], "names": ["fedavg"]}
    clip = fedavg_clip(assets, base)
    points = []
    for sigma in [None, *noise]:
        privacy = {"fedavg_clip": clip if sigma is not None else 0.0, "fedavg_noise": float(sigma or 0.0)}
        outcome = run_cell(base, out_dir / f"fedavg-noise-{sigma}", assets, privacy=privacy)
        scores = honest_scores(outcome, "fedavg", set())
        n_old = len(scores["old"])
        cfg = PrivacyConfig(**{**base["privacy"], **privacy})
        eps = fedavg_epsilon(cfg, int(base["rounds"]), n_old, n_old) if sigma is not None else float("inf")
        points.append({"noise": sigma, "old_acc": float(np.mean(scores["old"])),
                       "new_acc": float(np.mean(scores["new"])), "epsilon": eps})
        log.info("[privacy] fedavg noise %s: old clients %.3f, new clients %.3f, epsilon %.2f", sigma,
                 points[-1]["old_acc"], points[-1]["new_acc"], eps)
    return {"clip": clip, "points": points}


def _agg(seeds: list[dict], key: str) -> list[tuple[float, float]]:
    return [(float(np.mean(v)), float(np.std(v))) for v in
            zip(*[[p[key] for p in s["points"]] for s in seeds])]


def format_table(result: dict) -> str:
    seeds, fa = result["uploads"], result["fedavg"]
    acc, share = _agg(seeds, "probe_acc"), _agg(seeds, "accepted")
    lines = [f"# private uploads, {result['dataset']}: zoo uploads over {len(seeds)} seed(s) (clip = median honest "
             f"change, {np.mean([s['clip'] for s in seeds]):.2f}); FedAvg one run per level (clip "
             f"{fa['clip']:.2f}); epsilon at delta={result['delta']:g}",
             f"probes before any refresh: {np.mean([s['before_refresh'] for s in seeds]):.3f}; selection is not "
             f"affected by uploads",
             "| noise multiplier | upload epsilon | uploads accepted | probes, Tina after refresh | FedAvg epsilon | "
             "FedAvg old clients | FedAvg new clients |", "|---|---|---|---|---|---|---|"]
    for j, p in enumerate(seeds[0]["points"]):
        f = fa["points"][j]
        label = "off" if p["noise"] is None else f"{p['noise']:g}"
        lines.append(f"| {label} | {p['epsilon']:.2f} | {share[j][0]:.2f} | {acc[j][0]:.3f} ± {acc[j][1]:.3f} | "
                     f"{f['epsilon']:.2f} | {f['old_acc']:.3f} | {f['new_acc']:.3f} |")
    return "\n".join(lines)


def plot(path: Path, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds, fa = result["uploads"], result["fedavg"]
    xs = [p["noise"] for p in seeds[0]["points"] if p["noise"] is not None]
    acc = _agg(seeds, "probe_acc")[1:]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(xs, [a for a, _ in acc], yerr=[s for _, s in acc], marker="o", capsize=3,
                label="Tina after a refresh on private uploads (probes)")
    ax.plot(xs, [p["new_acc"] for p in fa["points"][1:]], marker="s", label="DP-FedAvg (new clients)")
    ax.axhline(np.mean([s["points"][0]["probe_acc"] for s in seeds]), ls="--", c="C0", lw=1,
               label="Tina, uploads not private")
    ax.axhline(fa["points"][0]["new_acc"], ls="--", c="C1", lw=1, label="FedAvg, not private")
    ax.axhline(np.mean([s["before_refresh"] for s in seeds]), ls=":", c="k", lw=1, label="Tina before any refresh")
    admitted = _agg(seeds, "accepted")[1:]
    for j, (x, p) in enumerate(zip(xs, seeds[0]["points"][1:])):
        ax.annotate(f"eps {p['epsilon']:.1f}, {admitted[j][0]:.0%} admitted", (x, acc[j][0]), fontsize=7,
                    xytext=(3, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("noise multiplier (std / clip); error bars: std over seeds")
    ax.set_ylabel("later clients' accuracy")
    ax.set_title(f"private uploads ({result['dataset']})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main_from_dict(cfg: dict, out_dir: Path) -> dict:
    from fedtina.assets import build_assets
    from fedtina.errors import FedtinaError
    from fedtina.validate import validate_simulate_config

    base = {k: v for k, v in cfg.items() if k not in ("noise", "seeds", "refresh_steps")}
    validate_simulate_config(base)
    noise = [float(x) for x in cfg["noise"]]
    if not noise or any(x < 0 for x in noise):
        raise FedtinaError(f"noise={cfg['noise']}: need a list of noise multipliers >= 0")
    t0 = time.perf_counter()
    assets = build_assets(core_config(base), log=log.info)
    result = {"dataset": assets.dataset.name, "delta": float(cfg["privacy"]["delta"]),
              "uploads": [uploads_seed(assets, cfg, int(s), noise) for s in cfg["seeds"]],
              "fedavg": fedavg_sweep(assets, base, out_dir, noise)}
    result["seconds"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "privacy.json").write_text(json.dumps(result, indent=2))
    table = format_table(result)
    (out_dir / "privacy.md").write_text(table + "\n")
    plot(out_dir / "privacy.png", result)
    print(table)
    print(f"{result['seconds']:.0f} s; results in {out_dir}")
    return result


if __name__ == "__main__":
    from fedtina.experiments.harness import hydra_entry

    hydra_entry("privacy", main_from_dict, log)
