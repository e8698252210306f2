"""The comparison report: per-method accuracy over clients (mean, spread, worst decile, seen-only vs with-unseen),
client cost (compute seconds, bytes moved) and per-phase times; written as JSON, CSVs, PNG plots and a text table.

Which result counts for a client: the one of its *latest* round for that method (FedAvg's final global model, the
round a Tina client arrived in). A client whose latest result is not "ok" counts as not ok and is left out of the
accuracy statistics.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fedtina.report.profiling import PHASES, PhaseRecord
from fedtina.io import write_json_lists


# slots: ~800,000 records at 100,000 clients, each without a per-instance __dict__
@dataclass(slots=True)
class ClientResult:
    method: str
    client_id: int
    round: int
    acc: float | None
    num_examples: int
    has_unseen: bool
    status: str                        # ok | error | failed | refused | unserved (the method cannot serve it)
    detail: str = ""
    upload: str = ""                   # tina_ft: accepted | refused by the server's gate ("": nothing was checked)
    upload_detail: str = ""            # tina_ft: the gate's reason (which check, class and margin)
    label_budget: int = -1             # labelled training images per class the client has (-1: all it holds)
    is_new: bool = False               # arrived after the last round (never trained)


# --------------------------------------------------------------------------------------------------------------------
# Statistics


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def worst_decile_mean(accs: list[float]) -> float | None:
    """Mean of the lowest ceil(10%) of the values (at least one): how the worst-served clients fare."""
    if not accs:
        return None
    m = max(1, math.ceil(0.1 * len(accs)))
    return float(np.mean(np.sort(np.asarray(accs, dtype=np.float64))[:m]))


def final_results(results: list[ClientResult]) -> dict[str, dict[int, ClientResult]]:
    """Per method, per client: the result of the client's latest round (later entries win ties)."""
    out: dict[str, dict[int, ClientResult]] = {}
    for r in results:
        per = out.setdefault(r.method, {})
        if r.client_id not in per or r.round >= per[r.client_id].round:
            per[r.client_id] = r
    return out


def _method_order(results: list[ClientResult], records: list[PhaseRecord], rounds: dict[str, int]) -> list[str]:
    order: list[str] = []
    for m in [*rounds, *(r.method for r in results), *(r.method for r in records)]:
        if m not in order:
            order.append(m)
    return order


def _cost(records: list[PhaseRecord]) -> dict[str, Any]:
    """Client cost of one method: per client, sums over its phases and rounds; then means over those clients. The
    per-phase means use the same denominator, so they add up to `client_wall_s`."""
    clients = sorted({r.client_id for r in records})
    n = len(clients)
    if n == 0:
        return {"profiled_clients": 0, "client_wall_s": None, "client_cpu_s": None, "bytes_per_client": None,
                "mb_per_client": None, "peak_mem_mb": None, "phase_wall_s": {}, "phase_cpu_s": {}}
    wall = sum(r.wall_s for r in records) / n
    cpu = sum(r.cpu_s for r in records) / n
    moved = sum(r.bytes_sent + r.bytes_recv for r in records) / n
    phases = [p for p in PHASES if any(r.phase == p for r in records)]
    phases += sorted({r.phase for r in records} - set(phases))
    return {
        "profiled_clients": n, "client_wall_s": wall, "client_cpu_s": cpu,
        "bytes_per_client": moved, "mb_per_client": moved / 1e6,
        "peak_mem_mb": max(r.peak_mem_mb for r in records),
        "phase_wall_s": {p: sum(r.wall_s for r in records if r.phase == p) / n for p in phases},
        "phase_cpu_s": {p: sum(r.cpu_s for r in records if r.phase == p) / n for p in phases},
    }


def client_block(per: list[ClientResult]) -> dict[str, Any]:
    """Accuracy over a group of clients' final results: mean, std, worst 10%, min over the ok ones; counts; means
    per label budget."""
    ok = [r for r in per if r.status == "ok" and r.acc is not None]
    accs = [float(r.acc) for r in ok]
    return {"acc_mean": _mean(accs), "acc_std": float(np.std(accs)) if accs else None,
            "acc_worst10": worst_decile_mean(accs), "acc_min": float(min(accs)) if accs else None,
            "n_clients": len(per), "n_ok": len(ok), "n_unserved": sum(r.status == "unserved" for r in per),
            "acc_by_labels": {str(b): _mean([float(r.acc) for r in ok if r.label_budget == b])
                              for b in sorted({r.label_budget for r in per})},
            "unserved_by_labels": {str(b): sum(r.status == "unserved" for r in per if r.label_budget == b)
                                   for b in sorted({r.label_budget for r in per})}}


def curve(results: list[ClientResult], method: str) -> list[dict[str, Any]]:
    """Mean accuracy of the old clients scored in each round (the method's accuracy after every round)."""
    by_round: dict[int, list[float]] = {}
    for r in results:
        if r.method == method and not r.is_new and r.status == "ok" and r.acc is not None:
            by_round.setdefault(r.round, []).append(float(r.acc))
    return [{"round": k, "acc_mean": float(np.mean(v)), "n": len(v)} for k, v in sorted(by_round.items())]


def rounds_to(points: list[dict[str, Any]], share: float = 0.95) -> int | None:
    """The first round whose mean reaches `share` of the last round's (None without rounds)."""
    if not points:
        return None
    target = share * points[-1]["acc_mean"]
    return next(p["round"] for p in points if p["acc_mean"] >= target)


def summarize(results: list[ClientResult], records: list[PhaseRecord], rounds: dict[str, int]) -> dict:
    """{"methods": {method: stats}} in a stable method order (`rounds` first). Per method:
    acc_mean / acc_std (population std) / acc_worst10 over ok clients' final results; `old_clients` and
    `new_clients` (client_block: mean, std, worst 10%, min, counts, per label budget), `curve` (old clients' mean
    per round) and `rounds_to_95`; acc_seen_only and
    acc_with_unseen (means over ok clients without / with unseen classes); n_clients, n_ok, n_failed (any status but
    ok) and status_counts; rounds; client_wall_s, client_cpu_s (mean per profiled client of the sum over its phases),
    bytes_per_client / mb_per_client (mean sent+received), peak_mem_mb (max), phase_wall_s / phase_cpu_s (mean per
    client per phase). Missing statistics are None (JSON null), never NaN."""
    final = final_results(results)
    methods: dict[str, dict] = {}
    for m in _method_order(results, records, rounds):
        per = list(final.get(m, {}).values())
        ok = [r for r in per if r.status == "ok" and r.acc is not None]
        accs = [float(r.acc) for r in ok]
        counts: dict[str, int] = {}
        for r in per:
            counts[r.status] = counts.get(r.status, 0) + 1
        methods[m] = {
            "acc_mean": _mean(accs),
            "acc_std": float(np.std(accs)) if accs else None,
            "acc_worst10": worst_decile_mean(accs),
            "acc_seen_only": _mean([float(r.acc) for r in ok if not r.has_unseen]),
            "acc_with_unseen": _mean([float(r.acc) for r in ok if r.has_unseen]),
            "acc_by_labels": {str(b): _mean([float(r.acc) for r in ok if r.label_budget == b])
                              for b in sorted({r.label_budget for r in ok})},
            "n_clients": len(per), "n_ok": len(ok), "n_failed": len(per) - len(ok), "status_counts": counts,
            "rounds": int(rounds.get(m, max((r.round for r in per), default=0))),
            "old_clients": client_block([r for r in per if not r.is_new]),
            "new_clients": client_block([r for r in per if r.is_new]),
            "curve": (c := curve(results, m)), "rounds_to_95": rounds_to(c),
            **_cost([r for r in records if r.method == m]),
        }
    return {"methods": methods}


# --------------------------------------------------------------------------------------------------------------------
# Text table


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_by_labels(summary: dict, group: str = "new_clients") -> str:
    """Mean accuracy (%) per method and label budget (labelled images per class; "all": every image it holds) over
    the `group` clients; "unserved" where the method cannot serve them; empty when they all have one budget."""
    budgets = sorted({b for s in summary["methods"].values() for b in s[group]["acc_by_labels"]}, key=int)
    if len(budgets) < 2:
        return ""
    show = lambda b: "all" if b == "-1" else b  # noqa: E731

    def cell(blk: dict, b: str) -> str:
        if blk["acc_by_labels"].get(b) is not None:
            return f"{100 * blk['acc_by_labels'][b]:.1f}"
        return "unserved" if blk["unserved_by_labels"].get(b) else "-"

    lines = [f"{group.replace('_', ' ')} | " + " | ".join(f"labels {show(b):>3}".ljust(10) for b in budgets)]
    width = len(group)
    for name, s in summary["methods"].items():
        lines.append(f"{name:<{width}} | " + " | ".join(cell(s[group], b).ljust(10) for b in budgets))
    return "\n".join(line.rstrip() for line in lines)


def format_table(summary: dict) -> str:
    """Fixed-width comparison table, one line per method (accuracies in %): old clients (they trained), new clients
    (they arrived after the last round), then cost."""
    cols = [("method", 12), ("old acc ± std", 14), ("old worst10", 11), ("new acc ± std", 14), ("new worst10", 11),
            ("new min", 8), ("unserved", 9), ("ok/failed", 10), ("rounds", 7), ("to 95%", 7), ("client s", 9),
            ("MB/client", 10)]
    lines = [" | ".join(name.ljust(w) for name, w in cols)]
    lines.append("-+-".join("-" * w for _, w in cols))
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    both = lambda b: ("-" if b["acc_mean"] is None  # noqa: E731
                      else f"{100 * b['acc_mean']:.1f} ± {100 * b['acc_std']:.1f}")
    for name, s in summary["methods"].items():
        old, new = s["old_clients"], s["new_clients"]
        row = [name, both(old), _fmt(pct(old["acc_worst10"]), ".1f"), both(new), _fmt(pct(new["acc_worst10"]), ".1f"),
               _fmt(pct(new["acc_min"]), ".1f"), str(old["n_unserved"] + new["n_unserved"]),
               f"{s['n_ok']}/{s['n_failed']}", str(s["rounds"]), str(s["rounds_to_95"] or "-"),
               _fmt(s["client_wall_s"], ".3f"), _fmt(s["mb_per_client"], ".3f")]
        lines.append(" | ".join(v.ljust(w) for v, (_, w) in zip(row, cols)))
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------------------------------
# Files


def _write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(["" if v is None else v for v in row] for row in rows)   # row by row: no copy of the table
    return path


COMPARISON_COLUMNS = ["method", "acc_mean", "acc_std", "acc_worst10", "acc_seen_only", "acc_with_unseen",
                      "old_acc_mean", "old_acc_std", "old_acc_worst10", "old_acc_min", "new_acc_mean", "new_acc_std",
                      "new_acc_worst10", "new_acc_min", "n_unserved", "n_clients", "n_ok", "n_failed", "rounds",
                      "rounds_to_95", "client_wall_s", "client_cpu_s", "mb_per_client", "peak_mem_mb"]


def _comparison_row(m: str, s: dict) -> list:
    flat = {**s, "n_unserved": s["old_clients"]["n_unserved"] + s["new_clients"]["n_unserved"],
            **{f"{g}_{k}": s[f"{g}_clients"][k] for g in ("old", "new") for k in ("acc_mean", "acc_std", "acc_worst10",
                                                                                  "acc_min")}}
    return [m] + [flat.get(k) for k in COMPARISON_COLUMNS[1:]]


def _plot_acc(path: Path, results: list[ClientResult], methods: list[str]) -> Path:
    from matplotlib.figure import Figure

    final = final_results(results)
    data = [[float(r.acc) for r in final.get(m, {}).values() if r.status == "ok" and r.acc is not None]
            for m in methods]
    fig = Figure(figsize=(max(4.0, 1.3 * len(methods) + 1), 4), layout="constrained")
    ax = fig.subplots()
    pos = [i + 1 for i, d in enumerate(data) if d]
    if pos:
        ax.boxplot([d for d in data if d], positions=pos, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data):
        ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(d)), d, s=8, alpha=0.5)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=20)
    ax.set_ylabel("client test accuracy (k-way)")
    ax.set_title("accuracy per client, by method")
    fig.savefig(path, dpi=120)
    return path


def _style(i: int) -> dict:
    """A colour and marker per method, distinct for up to 20 methods."""
    from matplotlib import colormaps

    return {"color": colormaps["tab20"](i % 20), "marker": "osD^v<>ph*"[i % 10], "ms": 4}


def _plot_rounds(path: Path, summary: dict) -> Path:
    """Old clients' mean accuracy after every round, one line per method (one-round methods as points)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for i, (name, s) in enumerate(summary["methods"].items()):
        pts = s.get("curve") or []
        if pts:
            ax.plot([p["round"] for p in pts], [p["acc_mean"] for p in pts], label=name, **_style(i))
    ax.set_xlabel("round (tina: the cohort that arrived in it)")
    ax.set_ylabel("mean accuracy, old clients")
    ax.set_title("accuracy after every round")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120)
    return path


def _plot_compute(path: Path, summary: dict) -> Path:
    """Accuracy against mean client compute (wall s over the run), one point per method: old clients filled, new
    clients hollow."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for i, (name, s) in enumerate(summary["methods"].items()):
        x = s.get("client_wall_s")
        if x is None:
            continue
        style = _style(i)
        for block, face, label in (("old_clients", style["color"], name), ("new_clients", "none", None)):
            y = s[block]["acc_mean"]
            if y is not None:
                ax.scatter([x], [y], s=45, marker=style["marker"], facecolors=face, edgecolors=style["color"],
                           label=label)
    ax.legend(fontsize=7, ncol=2)
    ax.set_xscale("log")
    ax.set_xlabel("mean client wall time over the run (s, log)")
    ax.set_ylabel("mean accuracy (filled: old clients, hollow: new)")
    ax.set_title("accuracy vs client compute")
    fig.savefig(path, dpi=120)
    return path


def _plot_phases(path: Path, summary: dict) -> Path:
    from matplotlib.figure import Figure

    methods = list(summary["methods"])
    phases = [p for p in PHASES if any(p in s["phase_wall_s"] for s in summary["methods"].values())]
    phases += sorted({p for s in summary["methods"].values() for p in s["phase_wall_s"]} - set(phases))
    fig = Figure(figsize=(max(4.0, 1.3 * len(methods) + 2), 4), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(methods))
    for p in phases:
        vals = np.array([summary["methods"][m]["phase_wall_s"].get(p, 0.0) for m in methods])
        ax.bar(methods, vals, bottom=bottom, label=p)
        bottom += vals
    ax.set_ylabel("mean client wall time (s)")
    ax.set_title("client time by phase")
    if phases:
        ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=20)
    fig.savefig(path, dpi=120)
    return path


def format_zoo_loop(zoo_growth: list[dict] | None) -> str:
    """Tina's upload loop, one line per cohort: the arriving clients' accuracy, the zoo before -> after, what the
    cohort uploaded (accepted with their mean images per class, refused, echoes dropped), the refresh's verdict with
    the probe scores, and Tina's probe accuracy after the cohort. Empty without a zoo loop."""
    if not zoo_growth:
        return ""
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"{'cohort':>6} {'tina acc':>8} {'zoo':>13} {'accepted':>8} {'img/class':>9} {'refused':>7} "
             f"{'echoes':>6} {'refresh':>12} {'probe before -> after':>22} {'probe':>6}"]
    for r in sorted(zoo_growth, key=lambda r: r["round"]):
        img = r.get("accepted_images_per_class")
        probe = (f"{pct(r.get('probe_before'))} -> {pct(r.get('probe_after'))}"
                 if r.get("probe_before") is not None else "")
        lines.append(f"{r['round']:>6} {pct(r.get('mean_acc')):>8} {r['zoo_size']:>6}->{r['zoo_size_after']:<6} "
                     f"{r.get('accepted', 0):>8} {'' if img is None else f'{img:.1f}':>9} {r.get('refused', 0):>7} "
                     f"{r.get('echoes', 0):>6} {r.get('refresh') or '-':>12} {probe:>22} {pct(r.get('probe')):>6}")
    return "\n".join(["Tina's upload loop (accuracies in %)"] + lines)


def _plot_zoo(path: Path, zoo_growth: list[dict]) -> Path:
    from matplotlib.figure import Figure

    rows = sorted(zoo_growth, key=lambda r: r["round"])
    size = [r["zoo_size"] for r in rows]
    mean = [r["mean_acc"] if r.get("mean_acc") is not None else np.nan for r in rows]
    std = [r.get("std_acc") or 0.0 for r in rows]
    fig = Figure(figsize=(13, 4), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.errorbar(size, mean, yerr=std, marker="o", capsize=3)
    for r, x, y in zip(rows, size, mean):
        ax1.annotate(f"r{r['round']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax1.set_xlabel("zoo size (heads) when the cohort arrived")
    ax1.set_ylabel("accuracy of arriving clients")
    ax1.set_title("new clients vs zoo size")
    rounds = np.array([r["round"] for r in rows])
    acc_n = np.array([r.get("accepted", 0) for r in rows])
    ref_n = np.array([r.get("refused", 0) for r in rows])
    echo_n = np.array([r.get("echoes", 0) for r in rows])
    ax2.bar(rounds, acc_n, label="accepted")
    ax2.bar(rounds, ref_n, bottom=acc_n, label="refused")
    ax2.bar(rounds, echo_n, bottom=acc_n + ref_n, label="echoes (dropped)")
    ax2.set_xlabel("round")
    ax2.set_ylabel("uploaded heads")
    ax2.set_title("zoo uploads per round")
    ax2.legend(fontsize=8)
    # Tina's probe accuracy after each cohort against the uploads accepted so far; rolled-back refreshes marked
    seen = np.cumsum(acc_n)
    probe = np.array([r["probe"] if r.get("probe") is not None else np.nan for r in rows])
    ax3.plot(seen, probe, marker="o")
    back = [i for i, r in enumerate(rows) if r.get("refresh") == "rolled back"]
    if back:
        ax3.scatter(seen[back], [r["probe_after"] for r in (rows[i] for i in back)], marker="x", color="red",
                    label="refresh rolled back (its score)", zorder=3)
        ax3.legend(fontsize=8)
    ax3.set_xlabel("accepted uploads (cumulative)")
    ax3.set_ylabel("Tina's probe accuracy")
    ax3.set_title("probe accuracy vs accepted uploads")
    fig.savefig(path, dpi=120)
    return path


def plot_partition(path: Path, partition, max_shown: int = 200) -> Path:
    """The clients' data: labelled training images per class (a client per column, classes by id; new clients
    right of the line) and each client's training and test sizes. Above `max_shown` clients, that many evenly spaced
    ones are drawn (the title says so): a column per client of 100,000 would be a 12,000-inch figure."""
    from matplotlib.figure import Figure

    every = sorted(partition.clients, key=lambda c: (c.is_new, c.client_id))
    clients = [every[i] for i in np.unique(np.linspace(0, len(every) - 1, min(max_shown, len(every))).astype(int))]
    shown = f" ({len(clients)} shown, evenly spaced)" if len(clients) < len(every) else ""
    n_classes = 1 + max((max(c.class_ids) for c in clients if c.class_ids), default=0)
    counts = np.zeros((n_classes, len(clients)))
    for j, c in enumerate(clients):
        np.add.at(counts[:, j], np.asarray(c.train_labels, dtype=np.int64), 1)
    fig = Figure(figsize=(max(6.0, 0.12 * len(clients) + 3), 7), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    im = ax1.imshow(np.where(counts > 0, counts, np.nan), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax1, label="labelled training images")
    ax1.set_ylabel("class id")
    ax1.set_title(f"partition: {len(every)} clients{shown}, {sum(c.is_new for c in every)} new (right of the "
                  f"line), {np.mean([c.k for c in every]):.1f} classes each")
    x = np.arange(len(clients))
    ax2.bar(x, [len(c.train_idx) for c in clients], label="train (labelled)")
    ax2.bar(x, [len(c.test_idx) for c in clients], bottom=[len(c.train_idx) for c in clients], label="test")
    n_old = sum(not c.is_new for c in clients)
    for ax in (ax1, ax2):
        ax.axvline(n_old - 0.5, color="red", lw=1)
    ax2.set_xlabel("client (old ones by id, then new ones)")
    ax2.set_ylabel("images")
    ax2.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively: summary.json stays strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(out_dir: Path, summary: dict, results: list[ClientResult], records: list[PhaseRecord],
                 zoo_growth: list[dict] | None = None) -> list[Path]:
    """Write summary.json, clients.csv (one row per result; a tina_ft row says whether the server's gate accepted
    or refused the client's upload, and why), phases.csv (one row per record), comparison.csv (one row per method),
    acc_by_method.png, time_by_phase.png and, with `zoo_growth` (per round: zoo_size, mean_acc, std_acc, accepted,
    refused, echoes, refresh, probe scores: `format_zoo_loop`), zoo_growth.png. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json_lists(out / "summary.json", _json_safe({"summary": summary, "table": format_table(summary),
                                                                  "zoo_growth": zoo_growth}),
                              {"clients": results, "phases": records}, lambda r: _json_safe(asdict(r)),
                              allow_nan=False)]
    cr = [f.name for f in fields(ClientResult)]
    paths.append(_write_csv(out / "clients.csv", cr, ([getattr(r, k) for k in cr] for r in results)))
    pr = [f.name for f in fields(PhaseRecord)]
    paths.append(_write_csv(out / "phases.csv", pr, ([getattr(r, k) for k in pr] for r in records)))
    methods = list(summary["methods"])
    paths.append(_write_csv(out / "comparison.csv", COMPARISON_COLUMNS,
                            [_comparison_row(m, summary["methods"][m]) for m in methods]))
    paths.append(_plot_acc(out / "acc_by_method.png", results, methods))
    paths.append(_plot_phases(out / "time_by_phase.png", summary))
    paths.append(_plot_rounds(out / "acc_by_round.png", summary))
    paths.append(_plot_compute(out / "acc_vs_compute.png", summary))
    if zoo_growth:
        paths.append(_plot_zoo(out / "zoo_growth.png", zoo_growth))
    return paths
