"""Variants of one simulation, in this process: a resolved simulate config with some sections changed, run with the
assets loaded once, and what each client scored at the end (the robust-aggregation and privacy experiments sweep
such variants)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fedtina.errors import FedtinaError


def run_variant(base: dict[str, Any], out_dir: Path, assets, **changes):
    """One `fedtina.simulate` run of `base` with top-level sections updated by `changes` ({"faults": {...},
    "aggregation": {...}}: merged into the section; any other value replaces the key); its Outcome. A method
    that did not finish is a FedtinaError naming the run dir."""
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
