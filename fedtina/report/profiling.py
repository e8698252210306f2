"""Per-phase client profiles: wall time, CPU time, peak memory and bytes moved, carried back to the server in a
ConfigRecord (`to_config` / `from_config`).

What the numbers mean:

* `wall_s`: `time.perf_counter()` elapsed over the phase.
* `cpu_s`: `time.process_time()` elapsed: CPU time of the *whole process*, all threads (torch's intra-op threads
  included, and the tiny sampler thread below). In a Ray actor the process runs one ClientApp call at a time, so this
  is the phase's CPU cost; it can exceed `wall_s` when several cores work.
* `peak_mem_mb`: the largest resident set size (RSS, MiB) of the process seen during the phase, sampled from
  `/proc/self/statm` by one background thread per process every 5 ms and at both ends. It is the process's
  absolute footprint (interpreter, imported libraries and pages of memory-mapped feature files it touched
  included), i.e. "does this fit"; `mem_delta_mb` is that peak minus the RSS at the start of the phase, i.e. what the
  phase itself added. Without /proc (macOS) the process-lifetime `ru_maxrss` is used instead, which only says
  something when it rose during the phase. Allocations shorter than the sampling interval may be missed.
* `peak_gpu_mb`: on CUDA (when torch is already imported and CUDA initialised), `torch.cuda.max_memory_allocated`
  over the phase (the peak statistics are reset at the start), in MiB; 0 otherwise.
* `bytes_sent` / `bytes_recv`: payload sizes the caller passes (e.g. `ArrayRecord.count_bytes()`), not socket bytes.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

PHASES = ("describe", "generate", "evaluate", "finetune", "upload", "train")
STATUSES = ("ok", "error", "failed", "refused")
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


# slots: ~800,000 records at 100,000 clients, each without a per-instance __dict__
@dataclass(slots=True)
class PhaseRecord:
    method: str
    round: int
    client_id: int
    phase: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_mem_mb: float = 0.0
    bytes_sent: int = 0
    bytes_recv: int = 0
    acc: float | None = None
    status: str = "ok"                # ok | error | failed | refused
    detail: str = ""
    mem_delta_mb: float = 0.0         # peak RSS during the phase minus RSS at its start
    peak_gpu_mb: float = 0.0


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc), else the lifetime peak (ru_maxrss)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_MB
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _cuda():
    """torch.cuda when torch is already imported and CUDA is initialised; never imports torch itself."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda
    return None


class _Sampler:
    """One daemon thread per process that samples the RSS every `interval_s` while any PhaseTimer is open and raises
    their peaks. A thread started per phase cost ~20% of a Ray actor's time on 1-ms client phases (start + join)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._open: set[PhaseTimer] = set()
        self._lock = threading.Lock()
        self._busy = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = -1

    def add(self, timer: "PhaseTimer") -> None:
        with self._lock:
            if self._pid != os.getpid():   # first use, or a forked child: the parent's thread is not here
                self._pid, self._open = os.getpid(), set()
                self._thread = threading.Thread(target=self._run, name="fedtina-phase-timer", daemon=True)
                self._thread.start()
            self._open.add(timer)
            self._busy.set()

    def remove(self, timer: "PhaseTimer") -> None:
        with self._lock:
            self._open.discard(timer)
            if not self._open:
                self._busy.clear()

    def _run(self) -> None:
        while True:
            self._busy.wait()
            time.sleep(self.interval_s)
            rss = rss_mb()
            with self._lock:
                for t in self._open:
                    t._peak = max(t._peak, rss)


_SAMPLER = _Sampler(interval_s=0.005)


class PhaseTimer:
    """Context manager measuring one phase (see the module docstring):

        with PhaseTimer() as t:
            head = finetune_local(...)
        rec = t.record("tina", rnd, cid, "finetune", acc=0.8)

    The attributes `wall_s`, `cpu_s`, `peak_mem_mb`, `mem_delta_mb`, `peak_gpu_mb` are set on exit (also when the
    body raises; the exception propagates). The RSS is sampled by the process's one sampler thread (`_Sampler`)."""

    def __init__(self) -> None:
        self.wall_s = self.cpu_s = self.peak_mem_mb = self.mem_delta_mb = self.peak_gpu_mb = 0.0

    def __enter__(self) -> "PhaseTimer":
        self._start_rss = self._peak = rss_mb()
        self._cuda = _cuda()
        if self._cuda is not None:
            self._cuda.reset_peak_memory_stats()
        _SAMPLER.add(self)
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = time.process_time() - self._c0
        _SAMPLER.remove(self)
        self.peak_mem_mb = max(self._peak, rss_mb())
        self.mem_delta_mb = max(0.0, self.peak_mem_mb - self._start_rss)
        if self._cuda is not None:
            self.peak_gpu_mb = self._cuda.max_memory_allocated() / 2**20

    def record(self, method: str, round: int, client_id: int, phase: str, **extra: Any) -> PhaseRecord:
        """A PhaseRecord with this timer's measurements; `extra` sets the other fields (bytes, acc, status...)."""
        return PhaseRecord(method, int(round), int(client_id), phase, wall_s=self.wall_s, cpu_s=self.cpu_s,
                           peak_mem_mb=self.peak_mem_mb, mem_delta_mb=self.mem_delta_mb,
                           peak_gpu_mb=self.peak_gpu_mb, **extra)


def measure(fn, *args: Any, **kwargs: Any) -> tuple[Any, PhaseTimer]:
    """Call `fn(*args, **kwargs)` under a PhaseTimer: (result, timer)."""
    with PhaseTimer() as t:
        out = fn(*args, **kwargs)
    return out, t


# --------------------------------------------------------------------------------------------------------------------
# ConfigRecord encoding (values: str | int | float | bool only)


def to_config(rec: PhaseRecord) -> dict[str, str | int | float | bool]:
    """A flat dict a Flower ConfigRecord accepts. `acc=None` is encoded explicitly as `has_acc=False` (and acc 0.0),
    since ConfigRecords cannot hold None."""
    d: dict[str, str | int | float | bool] = {}
    for k, v in asdict(rec).items():
        if k == "acc":
            d["has_acc"] = v is not None
            d["acc"] = float(v) if v is not None else 0.0
        elif isinstance(v, bool) or isinstance(v, str):
            d[k] = v
        elif isinstance(v, int):
            d[k] = int(v)
        else:
            d[k] = float(v)
    return d


def from_config(d: dict[str, Any]) -> PhaseRecord:
    """Inverse of `to_config`; keys missing from `d` take the dataclass defaults, unknown keys are ignored."""
    kwargs: dict[str, Any] = {}
    for f in fields(PhaseRecord):
        if f.name not in d:
            continue
        v = d[f.name]
        if f.name == "acc":
            v = float(v) if d.get("has_acc", True) else None
        elif f.name in ("round", "client_id", "bytes_sent", "bytes_recv"):
            v = int(v)
        elif f.name in ("method", "phase", "status", "detail"):
            v = str(v)
        else:
            v = float(v)
        kwargs[f.name] = v
    return PhaseRecord(**kwargs)


CLIENT_MEASURES = ("wall_s", "cpu_s", "peak_mem_mb", "mem_delta_mb", "peak_gpu_mb")   # what a client's profile reports
MAX_DETAIL = 300   # characters of a client's note kept in its phase record


def from_reply(d: dict[str, Any], method: str, rnd: int, client_id: int, phase: str) -> PhaseRecord:
    """A client's profile of one phase (a reply's `prof` ConfigRecord, written by `to_config`), as the server files
    it: who, what and when are the server's (`method`, `rnd`, `client_id`, `phase`), never the client's; the
    client's measures must be finite non-negative numbers, its accuracy in [0, 1]. A malformed profile raises
    ValueError naming the field."""
    def number(key: str, default: float | None = None) -> float:
        v = d.get(key, default)
        signed = key == "mem_delta_mb"   # memory may be given back during a phase
        if (v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or (v < 0 and not signed)):
            raise ValueError(f"profile field {key}={v!r} is not a finite number{'' if signed else ' >= 0'}")
        return float(v)

    has_acc = d.get("has_acc", False)
    if not isinstance(has_acc, bool):
        raise ValueError(f"profile field has_acc={has_acc!r} is not a bool")
    acc = number("acc") if has_acc else None
    if acc is not None and acc > 1:
        raise ValueError(f"profile field acc={acc!r} is not in [0, 1]")
    detail = d.get("detail", "")
    if not isinstance(detail, str):
        raise ValueError(f"profile field detail is a {type(detail).__name__}, not text")
    measures = {k: number(k, 0.0 if k in ("mem_delta_mb", "peak_gpu_mb") else None) for k in CLIENT_MEASURES}
    return PhaseRecord(method, int(rnd), int(client_id), phase, acc=acc, detail=detail[:MAX_DETAIL], **measures)


def records_to_config(records: list[PhaseRecord]) -> dict[str, str | int | float | bool]:
    """Several records in one ConfigRecord: keys `"<i>.<field>"` plus `"n"`, e.g. a reply's evaluate + finetune +
    upload phases."""
    out: dict[str, str | int | float | bool] = {"n": len(records)}
    for i, rec in enumerate(records):
        out.update({f"{i}.{k}": v for k, v in to_config(rec).items()})
    return out


def records_from_config(d: dict[str, Any]) -> list[PhaseRecord]:
    """Inverse of `records_to_config`."""
    out = []
    for i in range(int(d.get("n", 0))):
        prefix = f"{i}."
        out.append(from_config({k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}))
    return out
