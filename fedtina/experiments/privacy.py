"""Private uploads: later clients' accuracy against the noise on what clients send.

    python -m fedtina.experiments.privacy ['noise=[0,0.5,1,2,4]'] ['seeds=[0,1,2]'] [clients=200]

Zoo uploads (the Tina service's upload loop, fedtina/tina/service.py, as in the attacks experiment): every contributor's fine-tuned head is
clipped and noised (fedtina/adversary/privacy.py; clip = the median norm of the honest heads' change, measured on
the same contributors) before the gate; Tina is refreshed once on what the gate accepts; the probes are served
zero-shot. FedAvg (one simulation per noise level, method.names=[fedavg]): Flower's client-side fixed clipping (clip
= the median norm of the honest first-round updates) and its DP wrapper's noise; the new clients score the final
head. Epsilon at `privacy.delta` from Flower's RDP accountant: per upload (one release) and for the FedAvg model
after its rounds (no amplification by sampling). Writes privacy.json, privacy.md and privacy.png.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from fedtina.adversary.privacy import PrivacyConfig, clip_and_noise, fedavg_epsilon, upload_epsilon
from fedtina.client import ops as client_ops
from fedtina.config import HeadTrainConfig, from_dict
from fedtina.data.partition import PartitionConfig
from fedtina.errors import FedtinaError
from fedtina.experiments.harness import Result
from fedtina.methods.fedavg import FedAvgOptions
from fedtina.runtime.variants import honest_scores, run_variant
from fedtina.server.gate import HeadCheckConfig
from fedtina.server.reference import ServerReference
from fedtina.tina.offline import finetune, make_world, probe, serve

ASSETS = "simulate"
KEYS = ("noise", "seeds", "refresh_steps")   # this experiment's own; the rest is the simulation's config
log = logging.getLogger("fedtina.experiments.privacy")


def delta_norm(sent, head) -> float:
    return float(np.sqrt(((head.weight - sent.weight) ** 2).sum() + ((head.bias - sent.bias) ** 2).sum()))


def uploads_seed(assets, cfg: dict, seed: int, noise: list[float]) -> dict:
    part = from_dict(PartitionConfig, {**cfg["partition"], "seed": seed})
    world = make_world(assets, int(cfg["clients"]), part)
    service = world.service(from_dict(HeadCheckConfig, cfg["checks"]))
    ft, steps = from_dict(HeadTrainConfig, cfg["head_ft"]), int(cfg["refresh_steps"])
    sent = serve(service, world, world.contributors, seed)
    honest = finetune(world, sent, ft)
    clip = float(np.median([delta_norm(sent[i], honest[i]) for i in world.contributors]))
    before = probe(service, world).acc
    out = {"seed": seed, "clip": clip, "before_refresh": before, "points": []}
    for sigma in [None, *noise]:   # None: uploads sent as they are
        t0 = time.perf_counter()
        ups = []
        for i in world.contributors:
            head = honest[i]
            if sigma is not None:
                head = clip_and_noise(sent[i], head, clip, float(sigma), np.random.default_rng([seed, i, 7]))
            ups.append(world.upload(i, sent[i], head))
        verdicts = service.gate(ups)
        accepted = [u for u, v in zip(ups, verdicts) if v.accepted]
        acc = probe(service.refreshed(steps, accepted), world).acc
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
    opts = from_dict(FedAvgOptions, base["method"].get("fedavg"))
    world = make_world(assets, int(base["clients"]), from_dict(PartitionConfig, base["partition"]))
    init = ServerReference(assets, world.partition.server_val_idx).global_head()
    norms = []
    for i in world.contributors:
        w, b = client_ops.fedavg_local_train(init.weight, init.bias, world.data[i], opts.epochs, opts.lr,
                                             opts.batch_size)
        norms.append(np.sqrt(((w - init.weight) ** 2).sum() + ((b - init.bias) ** 2).sum()))
    return float(np.median(norms))


def fedavg_sweep(assets, base: dict, out_dir: Path, noise: list[float]) -> dict:
    clip = fedavg_clip(assets, base)
    points = []
    for sigma in [None, *noise]:
        privacy = {"fedavg_clip": clip if sigma is not None else 0.0, "fedavg_noise": float(sigma or 0.0)}
        outcome = run_variant(base, out_dir / f"fedavg-noise-{sigma}", assets, privacy=privacy)
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
    """Later clients' accuracy against the noise multiplier: Tina after a refresh on private uploads, DP-FedAvg."""
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


def check(cfg: dict) -> None:
    if cfg["method"]["names"] != ["fedavg"]:
        raise FedtinaError(f"method.names={cfg['method']['names']}: the privacy experiment's federation plays FedAvg "
                           f"alone (method.names=[fedavg])")
    noise = cfg["noise"]
    if not isinstance(noise, list) or not noise or any(not isinstance(x, (int, float)) or x < 0 for x in noise):
        raise FedtinaError(f"noise={noise}: need a list of noise multipliers >= 0")


def run(cfg: dict, assets, out_dir: Path) -> Result:
    noise = [float(x) for x in cfg["noise"]]
    result = {"dataset": assets.dataset.name, "delta": float(cfg["privacy"]["delta"]),
              "uploads": [uploads_seed(assets, cfg, int(s), noise) for s in cfg["seeds"]],
              "fedavg": fedavg_sweep(assets, {k: v for k, v in cfg.items() if k not in KEYS}, out_dir, noise)}
    return Result(result, format_table, {"privacy.png": plot})


if __name__ == "__main__":
    from fedtina.experiments import harness
    harness.main(__spec__.name)
