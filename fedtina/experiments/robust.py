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

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np

from fedtina.errors import FedtinaError

log = logging.getLogger("fedtina.experiments.robust")


def run_cell(base: dict, out_dir: Path, assets, **changes) -> object:
    """One `fedtina.simulate` run of `base` (a resolved simulate config) with top-level sections updated by
    `changes` ({"faults": {...}, "aggregation": {...}}), in this process (the assets are loaded once)."""
    from fedtina.simulate import run

    cfg = copy.deepcopy(base)
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    outcome = run(cfg, out_dir, assets=assets)
    failed = {m: s for m, s in outcome.method_status.items() if s != "ok"}
    if failed:
        raise FedtinaError(f"{out_dir.name}: {failed}")
    return outcome


def client_accs(outcome, method: str) -> dict[str, dict[int, float]]:
    """The last round's accuracy per client: {"old": {client id: acc}, "new": {...}}."""
    last: dict[int, object] = {}
    for r in outcome.results:
        if r.method == method and r.status == "ok" and r.acc is not None:
            if r.client_id not in last or r.round >= last[r.client_id].round:
                last[r.client_id] = r
    return {"old": {c: r.acc for c, r in last.items() if not r.is_new},
            "new": {c: r.acc for c, r in last.items() if r.is_new}}


def honest_scores(outcome, method: str, bad: set[int]) -> dict[str, list[float]]:
    """The last round's accuracy of every honest old client and every new client."""
    accs = client_accs(outcome, method)
    return {"old": [a for c, a in accs["old"].items() if c not in bad], "new": list(accs["new"].values())}


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


def main_from_dict(cfg: dict, out_dir: Path) -> dict:
    from fedtina.assets import build_assets
    from fedtina.config import core_config, from_dict
    from fedtina.server.aggregation import RULES
    from fedtina.adversary.attacks import UPDATE_ATTACKS
    from fedtina.data.partition import PartitionConfig, new_clients
    from fedtina.validate import validate_simulate_config

    base = {k: v for k, v in cfg.items() if k not in ("shares", "rules", "attacks")}
    base["method"] = {**base["method"], "names": ["fedavg"]}
    validate_simulate_config(base)
    unknown = [r for r in cfg["rules"] if r not in RULES]
    if unknown:
        raise FedtinaError(f"rules={unknown}: unknown; valid: {', '.join(RULES)}")
    for a in cfg["attacks"]:
        if a.get("kind") not in UPDATE_ATTACKS:
            raise FedtinaError(f"attacks: kind {a.get('kind')!r} is not an update attack; valid: "
                               f"{', '.join(UPDATE_ATTACKS)}")
    t0 = time.perf_counter()
    assets = build_assets(core_config(base), log=log.info)
    n = int(base["clients"])
    part = from_dict(PartitionConfig, base["partition"])
    n_new = new_clients(part, n)
    is_new = _new_ids(assets, n, part)
    old = [i for i in range(n) if i not in is_new]
    m = max(1, int(round(float(base.get("fraction_train", 1.0)) * len(old))))
    cells = []
    clean = None   # FedAvg without attackers, per client: the baseline of every row, on that row's honest clients
    for rule in cfg["rules"]:
        agg, note = rule_settings(rule, 0, m)
        out = run_cell(base, out_dir / f"clean-{rule}", assets, aggregation=agg)
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
                out = run_cell(base, out_dir / f"{attack['kind']}-{share:g}-{rule}", assets, aggregation=agg,
                               faults=faults)
                cells.append({"attack": label, "share": float(share), "rule": rule, "note": note, "bad": bad,
                              **_stats(honest_scores(out, "fedavg", set(bad)))})
                log.info("[robust] %s, %.0f%% attackers, %s: %s", label, 100 * share, rule, _fmt(cells[-1]))
    result = {"clients": n, "old": len(old), "new": n_new, "updates_per_round": m, "rounds": int(base["rounds"]),
              "clean": {k: {str(c): a for c, a in v.items()} for k, v in clean.items()}, "cells": cells,
              "seconds": time.perf_counter() - t0}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "robust.json").write_text(json.dumps(result, indent=2))
    table = format_table(result, list(cfg["rules"]))
    (out_dir / "robust.md").write_text(table + "\n")
    print(table)
    print(f"{result['seconds']:.0f} s; results in {out_dir}")
    return result


def _new_ids(assets, n: int, part) -> set[int]:
    from fedtina.data.partition import make_partition

    return {c.client_id for c in make_partition(assets.dataset, assets.split, n, part).clients if c.is_new}


def _stats(scores: dict[str, list[float]]) -> dict:
    return {f"{k}_{s}": float(f(v)) if v else float("nan") for k, v in scores.items()
            for s, f in (("mean", np.mean), ("std", np.std))} | {f"{k}_n": len(v) for k, v in scores.items()}


def _fmt(cell: dict) -> str:
    return (f"honest old clients {cell['old_mean']:.3f} ± {cell['old_std']:.3f} (n={cell['old_n']}), new clients "
            f"{cell['new_mean']:.3f} ± {cell['new_std']:.3f}{' ' + cell['note'] if cell['note'] else ''}")


def format_table(result: dict, rules: list[str]) -> str:
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
    from fedtina.experiments.harness import hydra_entry

    hydra_entry("robust", main_from_dict, log)
