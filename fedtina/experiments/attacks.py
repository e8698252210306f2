"""Attacks on the zoo: what the server's gate catches, and what the rest does to later clients.

    python -m fedtina.experiments.attacks [dataset=caltech101] ['seeds=[0,1,2]'] [share=0.2] [clients=100]

Per seed, the simulation's partition (`clients`, partition.*): its old clients contribute, its new clients are the
probes (they never upload). Every contributor gets Tina's head and fine-tunes it (head_ft); attackers, a `share` of
the contributors drawn per attack, upload a bad head instead (fedtina/adversary/attacks.py); colluders (a share of
the cohort) all describe one label set and upload the same targeted head. The gate (checks.*) judges every upload;
Tina is refreshed once on the zoo plus the accepted uploads (`refresh_steps`: the simulation's 30 steps per 20
accepted heads, for 80 contributors). Reported per attack: detection (bad uploads refused), false refusals (honest
uploads refused), and the change in the probes' zero-shot accuracy (overall, and recall on the attacked classes)
against the same refresh with every contributor honest; with the gate, and without it (every upload admitted).
Before a refresh nothing changes for the probes: generation reads Tina's weights, not the zoo.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from fedtina.adversary.attacks import Attack, check_attack, flip_pair, mislabel, poison_head, targeted_pair
from fedtina.client import ops as client_ops
from fedtina.config import HeadTrainConfig, from_dict
from fedtina.data.partition import PartitionConfig
from fedtina.experiments.harness import Result
from fedtina.server.gate import HeadCheckConfig
from fedtina.tina.offline import World, finetune, make_world, probe, serve
from fedtina.tina.service import Upload
from fedtina.zoo.heads import accuracy

ASSETS = "simulate"
log = logging.getLogger("fedtina.experiments.attacks")
MALFORMED = ("nan", "huge", "shape")   # only the gate's verdict: a NaN or misshapen head cannot enter a zoo at all


@dataclasses.dataclass
class AttackRow:
    """One row of the table: an attack and the share of contributors playing it."""

    kind: str
    share: float | None = None     # None: the bench's `share`
    factor: float = Attack.factor
    mislabel: float = Attack.share
    collude: bool = False          # colluders upload one targeted head for one label set

    @property
    def label(self) -> str:
        extra = {"scale": f" x{self.factor:g}", "mislabeled": f" {self.mislabel:.0%}"}.get(self.kind, "")
        share = f" ({self.share:.0%} of the cohort)" if self.share is not None else ""
        return f"{'collude: ' if self.collude else ''}{self.kind}{extra}{share}"


def _attacked(kind: str, names: tuple[str, ...], cid: int) -> set[str]:
    """The classes whose rows an attack corrupts."""
    if kind == "label_flip":
        return {names[i] for i in flip_pair(len(names), cid)}
    if kind == "targeted":
        return {names[targeted_pair(len(names), 0)[0]]}
    return set(names)


def _collusion(world: World, colluders: list[int], sent, honest) -> tuple[list[Upload], set[str]]:
    """Every colluder describes the first one's label set and uploads the same head: its honest head with the
    class most probes hold replaced by the next class's row (targeted)."""
    lead = colluders[0]
    data = world.data[lead]
    held = [sum(n in world.data[p].class_names for p in world.probes) for n in data.class_names]
    target = int(np.argmax(held))
    bad = poison_head(honest[lead], Attack("targeted", target=target), lead)
    ups = [Upload(c, data.class_names, data.class_ids, sent[lead], bad, bad=True) for c in colluders]
    return ups, {data.class_names[target]}


def play(world: World, row: AttackRow, share: float, sent, honest, ft: HeadTrainConfig,
         rng: np.random.Generator) -> tuple[list[Upload], set[str]]:
    """Every contributor's upload under `row`, and the attacked classes."""
    contributors = world.contributors
    n_bad = max(1, int(round((row.share if row.share is not None else share) * len(contributors))))
    bad_ids = sorted(rng.choice(contributors, size=n_bad, replace=False).tolist())
    bad_set = set(bad_ids)
    ups = [world.upload(i, sent[i], honest[i]) for i in contributors if i not in bad_set]
    if row.collude:
        more, attacked = _collusion(world, bad_ids, sent, honest)
        return ups + more, attacked
    attacked: set[str] = set()
    attack = Attack(row.kind, factor=row.factor, share=row.mislabel)
    for i in bad_ids:
        data = world.data[i]
        if row.kind == "mislabeled":
            wrong = dataclasses.replace(data, train_y=mislabel(data.train_y, data.k, row.mislabel, i))
            head = client_ops.finetune_local(sent[i], wrong, ft, device="cpu")
        else:
            head = poison_head(honest[i], attack, i)
        ups.append(world.upload(i, sent[i], head, bad=True))
        attacked |= _attacked(row.kind, data.class_names, i)
    return ups, attacked


def run_seed(assets, cfg: dict, seed: int) -> dict:
    part = from_dict(PartitionConfig, {**cfg["partition"], "seed": seed})
    world = make_world(assets, int(cfg["clients"]), part)
    service = world.service(from_dict(HeadCheckConfig, cfg["checks"]))
    ft = from_dict(HeadTrainConfig, cfg["head_ft"])
    steps = int(cfg["refresh_steps"])
    t0 = time.perf_counter()
    sent = serve(service, world, world.contributors, seed)
    honest = finetune(world, sent, ft)
    base = [world.upload(i, sent[i], honest[i]) for i in world.contributors]
    verdicts = service.gate(base)
    accepted = [u for u, v in zip(base, verdicts) if v.accepted]
    clean = probe(service.refreshed(steps, accepted), world)
    # the noise floor: the same honest refresh with other batches
    reseeded = probe(service.refreshed(steps, accepted, seed=service.tina.cfg.seed + 1), world)
    before = probe(service, world)
    selection = float(np.mean([accuracy(service.reference.selection(world.data[p].class_names),
                                        world.data[p].test_x, world.data[p].test_y) for p in world.probes]))
    out = {"seed": seed, "probes": len(world.probes), "contributors": len(world.contributors),
           "honest_refused": float(np.mean([not v.accepted for v in verdicts])),
           "before_refresh": before.acc, "after_clean_refresh": clean.acc, "selection": selection,
           "reseeded_delta": reseeded.acc - clean.acc, "rows": {}}
    log.info("[attacks] seed %d: %d contributors, %d probes; probes' zero-shot accuracy %.3f before the refresh, "
             "%.3f after the honest refresh (selection %.3f); %.1f s", seed, len(world.contributors),
             len(world.probes), before.acc, clean.acc, selection, time.perf_counter() - t0)
    for i, row in enumerate(from_dict(AttackRow, r) for r in cfg["attacks"]):
        t1 = time.perf_counter()
        rng = np.random.default_rng([seed, i])
        ups, attacked = play(world, row, float(cfg["share"]), sent, honest, ft, rng)
        verdicts = service.gate(ups)
        bad = [v for u, v in zip(ups, verdicts) if u.bad]
        good = [v for u, v in zip(ups, verdicts) if not u.bad]
        rec = {"attackers": len(bad), "detected": float(np.mean([not v.accepted for v in bad])),
               "false_refusals": float(np.mean([not v.accepted for v in good])) if good else float("nan"),
               "attacked_classes": sorted(attacked)}
        ref = clean.class_recall(attacked)
        admitted = {"gated": [u for u, v in zip(ups, verdicts) if v.accepted]}
        if row.kind not in MALFORMED:
            admitted["no_gate"] = ups
        for name, accepted in admitted.items():
            scores = probe(service.refreshed(steps, accepted), world)
            rec[f"{name}_acc_delta"] = scores.acc - clean.acc
            rec[f"{name}_class_delta"] = scores.class_recall(attacked) - ref
        out["rows"][row.label] = rec
        log.info("[attacks] seed %d %-20s %2d attackers: detected %.2f, honest refused %.2f, probe delta gated "
                 "%+.3f (attacked classes %+.3f), no gate %+.3f (%+.3f); %.1f s", seed, row.label, len(bad),
                 rec["detected"], rec["false_refusals"], rec["gated_acc_delta"], rec["gated_class_delta"],
                 rec.get("no_gate_acc_delta", float("nan")), rec.get("no_gate_class_delta", float("nan")),
                 time.perf_counter() - t1)
    return out


def _ms(values) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return "n/a"
    return f"{v.mean():+.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():+.3f}"


def _share(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.2f}" + (f" ± {v.std():.2f}" if len(v) > 1 else "")


def format_table(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"# attacks on the zoo, {result['dataset']}: {len(seeds)} seed(s), {seeds[0]['contributors']} "
             f"contributors, {seeds[0]['probes']} probes; one Tina refresh of {result['refresh_steps']} steps",
             f"probes' zero-shot accuracy: before any refresh {_share([s['before_refresh'] for s in seeds])}, "
             f"after the honest refresh {_share([s['after_clean_refresh'] for s in seeds])}, selection "
             f"{_share([s['selection'] for s in seeds])}; honest uploads refused with no attack "
             f"{_share([s['honest_refused'] for s in seeds])}; the honest refresh with other batches moves the probes "
             f"by {_ms([s['reseeded_delta'] for s in seeds])} (the noise floor)",
             "| attack | attackers | detected | honest refused | probe acc, gated | attacked classes, gated | "
             "probe acc, no gate | attacked classes, no gate |",
             "|---|---|---|---|---|---|---|---|"]
    for label in seeds[0]["rows"]:
        recs = [s["rows"][label] for s in seeds]
        lines.append(f"| {label} | {np.mean([r['attackers'] for r in recs]):.0f} | "
                     f"{_share([r['detected'] for r in recs])} | {_share([r['false_refusals'] for r in recs])} | "
                     + " | ".join(_ms([r.get(k) for r in recs]) for k in
                                  ("gated_acc_delta", "gated_class_delta", "no_gate_acc_delta",
                                   "no_gate_class_delta")) + " |")
    return "\n".join(lines)


def check(cfg: dict) -> None:
    for r in cfg["attacks"]:
        row = from_dict(AttackRow, r)
        check_attack(Attack(row.kind, share=row.mislabel))


def run(cfg: dict, assets, out_dir: Path) -> Result:
    result = {"dataset": assets.dataset.name, "refresh_steps": int(cfg["refresh_steps"]),
              "seeds": [run_seed(assets, cfg, int(s)) for s in cfg["seeds"]]}
    return Result(result, format_table)


if __name__ == "__main__":
    from fedtina.experiments import harness
    harness.main(__spec__.name)
