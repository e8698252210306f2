"""The scale benchmark: `python -m fedtina.simulate` at growing client counts, timed and measured from outside.

    python -m fedtina.experiments.scale                                          # 100, 1,000, 10,000 x the default methods
    python -m fedtina.experiments.scale 'clients=[100,1000,10000,100000]' 'methods=[tina,selection]'

Each count is one fresh `simulate` process (warm cache, its run dir under this run's dir). Measured: wall time of
the process; per method, the ServerApp's wall time for it; the driver's peak RSS (the simulate process alone) and the
whole machine's peak memory above what was in use before the run (driver, Ray and its actors: every process), sampled
every `sample_s`; client messages per second (client replies over the federation's wall time); Tina's generated heads
per second. Then, over the counts, the growth exponent b of time and memory (least squares of log y = a + b log n:
b = 1 is linear). The table is printed and written to `scale.md` / `scale.json` (the rows so far, after each count).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedtina.errors import FedtinaError
from fedtina.experiments.harness import Result

ASSETS = None   # every count is its own `simulate` process
log = logging.getLogger("fedtina.experiments.scale")


def _mem_used_mb() -> float:
    """The machine's memory in use (MemTotal - MemAvailable), MB."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = float(value.split()[0]) / 1024
    return info["MemTotal"] - info["MemAvailable"]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemorySampler:
    """Peak driver RSS and peak machine memory above `baseline`, sampled in a thread while a process runs."""

    def __init__(self, pid: int, sample_s: float) -> None:
        self.pid, self.sample_s = pid, sample_s
        self.baseline = _mem_used_mb()
        self.driver_peak = self.machine_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.sample_s):
            self.driver_peak = max(self.driver_peak, _rss_mb(self.pid))
            self.machine_peak = max(self.machine_peak, _mem_used_mb() - self.baseline)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def growth_exponent(ns: list[float], ys: list[float]) -> float | None:
    """b of the least-squares fit log y = a + b log n (None with fewer than two usable points)."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys) if n > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else None


def _heads_per_s(run_dir: Path) -> float | None:
    heads = wall = 0.0
    with open(run_dir / "server_phases.csv") as f:
        for row in csv.DictReader(f):
            if row["method"] == "tina" and row["phase"] == "generate" and " heads in " in row["detail"]:
                heads += float(row["detail"].split()[0])
                wall += float(row["wall_s"])
    return heads / wall if wall > 0 else None


def measure(run_dir: Path, wall_s: float, sampler: MemorySampler) -> dict[str, Any]:
    """One run's row, from its run dir and what was sampled from outside."""
    doc = json.loads((run_dir / "summary.json").read_text())["summary"]
    per_method = doc["server_wall_s"]["methods"]
    with open(run_dir / "phases.csv") as f:
        messages = sum(1 for _ in f) - 1
    with open(run_dir / "server_phases.csv") as f:
        describe = sum(float(r["wall_s"]) for r in csv.DictReader(f) if r["phase"] == "describe")
    federation = sum(per_method.values()) + describe
    failed = sum(m.get("n_failed", 0) for m in doc["methods"].values())
    return {"wall_s": round(wall_s, 1), "methods_s": per_method, "federation_s": round(federation, 1),
            "driver_peak_mb": round(sampler.driver_peak), "machine_peak_mb": round(sampler.machine_peak),
            "messages": messages, "messages_per_s": round(messages / federation, 1) if federation > 0 else None,
            "heads_per_s": _heads_per_s(run_dir), "failed": failed,
            "status": doc.get("method_status", {}), "interrupted": doc.get("interrupted")}


def run_one(n: int, cfg: dict, out_dir: Path) -> dict[str, Any]:
    run_dir = out_dir / f"clients_{n}"
    methods = [f"method.names=[{','.join(cfg['methods'])}]"] if cfg["methods"] else []
    args = [sys.executable, "-m", "fedtina.simulate", f"clients={n}", f"hydra.run.dir={run_dir}", *methods,
            *cfg["overrides"]]
    log.info("[scale] %s", " ".join(args[1:]))
    t0 = time.perf_counter()
    with open(out_dir / f"clients_{n}.log", "w") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
        sampler = MemorySampler(proc.pid, float(cfg["sample_s"]))
        try:
            rc = proc.wait(timeout=float(cfg["timeout_s"]))
        except subprocess.TimeoutExpired:
            proc.terminate()   # simulate stops cleanly on SIGTERM and still writes its report
            rc = proc.wait()
        finally:
            sampler.stop()
    wall = time.perf_counter() - t0
    if not (run_dir / "summary.json").exists():
        raise FedtinaError(f"clients={n}: simulate exited {rc} without a report; see {out_dir / f'clients_{n}.log'}")
    row = measure(run_dir, wall, sampler)
    row["clients"], row["rc"] = n, rc
    log.info("[scale] clients=%d: %.0f s wall, driver %d MB, machine +%d MB, %.0f msg/s", n, wall,
             row["driver_peak_mb"], row["machine_peak_mb"], row["messages_per_s"] or 0)
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, and the growth exponents over them."""
    methods = list(dict.fromkeys(m for r in rows for m in r["methods_s"]))
    head = ["clients", "wall s", *[f"{m} s" for m in methods], "driver MB", "machine MB", "msg/s", "heads/s",
            "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['clients']:,}", f"{r['wall_s']:.0f}", *[f"{r['methods_s'].get(m, float('nan')):.1f}"
                                                             for m in methods],
                 f"{r['driver_peak_mb']:,}", f"{r['machine_peak_mb']:,}", f"{r['messages_per_s'] or 0:.0f}",
                 f"{r['heads_per_s']:.0f}" if r["heads_per_s"] else "-", str(r["failed"])]
        lines.append("| " + " | ".join(cells) + " |")
    ns = [r["clients"] for r in rows]
    expo = {k: growth_exponent(ns, [r[k] for r in rows]) for k in ("wall_s", "federation_s", "driver_peak_mb",
                                                                    "machine_peak_mb")}
    lines.append("")
    lines.append("growth exponent b (y ~ clients^b; 1 = linear): " + ", ".join(
        f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in expo.items()))
    return "\n".join(lines)


def check(cfg: dict) -> None:
    counts = cfg["clients"]
    if not isinstance(counts, list) or not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                         for n in counts):
        raise FedtinaError(f"clients={counts}: need a list of positive client counts, e.g. 'clients=[100,1000]'")


def run(cfg: dict, assets: None, out_dir: Path) -> Result:
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in cfg["clients"]:
        rows.append(run_one(int(n), cfg, out_dir))
        # after each count: a 100,000-client run takes half an hour, and the earlier rows must survive a kill
        (out_dir / "scale.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=1))
    return Result({"rows": rows}, lambda data: format_table(data["rows"]))


if __name__ == "__main__":
    from fedtina.experiments import harness
    harness.main(__spec__.name)
