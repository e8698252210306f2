"""Poisoned FedAvg and Flower's robust strategies: honest clients' accuracy per aggregation rule and attacker share.

    python -m fedtina.experiments.robust ['shares=[0.1,0.2,0.3]'] ['rules=[fedavg,median,...]'] [clients=100]

One Flower simulation (Ray) per (attack, share, rule), FedAvg of the global head only (method.names=[fedavg]),
on the same clients and seed: attackers, a share of the old clients drawn once per share, send a bad update every
round (faults.poison_*, fedtina/adversary/attacks.py: sign_flip x10, and colluding random updates of 100x the
honest step's norm); the honest old clients and the new clients score the final head. Each rule is told the number of
attackers: f for Krum, MultiKrum and Bulyan (Bulyan needs 4f + 3 updates: with fewer, the largest f it accepts, said
in the table), a trimmed share beta = f / m (at least 0.1) for the trimmed mean.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedtina.config import from_dict
from fedtina.data.partition import PartitionConfig, make_partition, new_clients
from fedtina.errors import FedtinaError
from fedtina.experiments.harness import Result
from fedtina.runtime.variants import client_accs, honest_scores, run_variant

ASSETS = "simulate"
KEYS = ("shares", "rules", "attacks")   # this experiment's own; the rest is the simulation's config
log = logging.getLogger("fedtina.experiments.robust")


def rule_settings(rule: str, f: int, m: int) -> tuple[dict, str]:
    """The aggregation section for `rule` against f attackers among m updates, and a note when f is capped."""
    if rule in ("krum", "multikrum"):
        cap = max(0, (m - 3) // 2)
    elif rule == "bulyan":
        cap = max(0, (m - 3) // 4)
    else:
        cap = f
    note = f"f={cap}: its most" if cap < f else ""
    return {"name": rule, "num_malicious": min(f, cap), "beta": max(0.1, min(0.45, f / max(m, 1))),
            "select": 0}, note


def check(cfg: dict) -> None:
    from fedtina.adversary.attacks import UPDATE_ATTACKS
    from fedtina.server.aggregation import RULES

    if cfg["method"]["names"] != ["fedavg"]:
        raise FedtinaError(f"method.names={cfg['method']['names']}: the robust experiment plays FedAvg alone "
                           f"(method.names=[fedavg])")
    unknown = [r for r in cfg["rules"] if r not in RULES]
    if unknown:
        raise FedtinaError(f"rules={unknown}: unknown; valid: {', '.join(RULES)}")
    for a in cfg["attacks"]:
        if a.get("kind") not in UPDATE_ATTACKS:
            raise FedtinaError(f"attacks: kind {a.get('kind')!r} is not an update attack; valid: "
                               f"{', '.join(UPDATE_ATTACKS)}")


def run(cfg: dict, assets, out_dir: Path) -> Result:
    base = {k: v for k, v in cfg.items() if k not in KEYS}
    n = int(base["clients"])
    part = from_dict(PartitionConfig, base["partition"])
    is_new = {c.client_id for c in make_partition(assets.dataset, assets.split, n, part).clients if c.is_new}
    old = [i for i in range(n) if i not in is_new]
    m = max(1, int(round(float(base.get("fraction_train", 1.0)) * len(old))))
    cells = []
    clean = None   # FedAvg without attackers, per client: the baseline of every row, on that row's honest clients
    for rule in cfg["rules"]:
        agg, note = rule_settings(rule, 0, m)
        out = run_variant(base, out_dir / f"clean-{rule}", assets, aggregation=agg)
        clean = clean or client_accs(out, "fedavg")
        cells.append({"attack": "none", "share": 0.0, "rule": rule, "note": note, "bad": [],
                      **_stats(honest_scores(out, "fedavg", set()))})
        log.info("[robust] no attack, %s: %s", rule, _fmt(cells[-1]))
    for attack in cfg["attacks"]:
        label = f"{'colluding ' if attack.get('collude') else ''}{attack['kind']} x{attack.get('factor', 3.0):g}"
        for share in cfg["shares"]:
            rng = np.random.default_rng([int(part.seed), 11, int(round(1000 * share))])   # per share: every
            bad = sorted(rng.choice(old, size=max(1, int(round(share * len(old)))), replace=False).tolist())  # attack
            faults = {"poison_clients": bad, "poison_kind": attack["kind"],
                      "poison_factor": float(attack.get("factor", 3.0)),
                      "poison_collude": bool(attack.get("collude", False))}
            for rule in cfg["rules"]:
                agg, note = rule_settings(rule, len(bad), m)
                out = run_variant(base, out_dir / f"{attack['kind']}-{share:g}-{rule}", assets, aggregation=agg,
                                  faults=faults)
                cells.append({"attack": label, "share": float(share), "rule": rule, "note": note, "bad": bad,
                              **_stats(honest_scores(out, "fedavg", set(bad)))})
                log.info("[robust] %s, %.0f%% attackers, %s: %s", label, 100 * share, rule, _fmt(cells[-1]))
    result = {"clients": n, "old": len(old), "new": new_clients(part, n), "updates_per_round": m,
              "rounds": int(base["rounds"]), "rules": list(cfg["rules"]),
              "clean": {k: {str(c): a for c, a in v.items()} for k, v in clean.items()}, "cells": cells}
    return Result(result, format_table)


def _stats(scores: dict[str, list[float]]) -> dict:
    return {f"{k}_{s}": float(f(v)) if v else float("nan") for k, v in scores.items()
            for s, f in (("mean", np.mean), ("std", np.std))} | {f"{k}_n": len(v) for k, v in scores.items()}


def _fmt(cell: dict) -> str:
    return (f"honest old clients {cell['old_mean']:.3f} ± {cell['old_std']:.3f} (n={cell['old_n']}), new clients "
            f"{cell['new_mean']:.3f} ± {cell['new_std']:.3f}{' ' + cell['note'] if cell['note'] else ''}")


def format_table(result: dict) -> str:
    rules = result["rules"]
    lines = [f"# poisoned FedAvg: {result['clients']} clients ({result['old']} train, {result['new']} new), "
             f"{result['rounds']} rounds of {result['updates_per_round']} updates; honest old clients' accuracy "
             f"(mean ± std over clients) / new clients' mean; `no attack`: plain FedAvg without attackers on the "
             f"same honest clients",
             "| attack | attackers | no attack | " + " | ".join(rules) + " |", "|---|---|---|" + "---|" * len(rules)]
    clean = result["clean"]
    keys = []
    for c in result["cells"]:
        if (c["attack"], c["share"]) not in keys:
            keys.append((c["attack"], c["share"]))
    for attack, share in keys:
        row = {c["rule"]: c for c in result["cells"] if c["attack"] == attack and c["share"] == share}
        bad = {str(b) for b in next(iter(row.values()))["bad"]}
        old = [a for c, a in clean["old"].items() if c not in bad]
        base = f"{np.mean(old):.3f} ± {np.std(old):.3f} / {np.mean(list(clean['new'].values())):.3f}"
        vals = [base] + [f"{row[r]['old_mean']:.3f} ± {row[r]['old_std']:.3f} / {row[r]['new_mean']:.3f}"
                + (f" ({row[r]['note']})" if row[r]["note"] else "") if r in row else "n/a" for r in rules]
        lines.append(f"| {attack} | {share:.0%} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    from fedtina.experiments import harness
    harness.main(__spec__.name)
