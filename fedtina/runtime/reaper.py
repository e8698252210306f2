"""Stops the Ray processes a run started, however the run ends, kill -9 of the driver included.

`ray.shutdown()` stops a local Ray cluster when the driver exits normally, but after a SIGKILL some of Ray's
processes (its dashboard and runtime-env agents) are re-parented to init and live on, ignoring SIGTERM. `watch()`
starts a small watcher process that notes, once a second, the driver's Ray descendants; when its pipe to the driver
closes (the `with` block ends, or the driver dies in any way), it sends SIGTERM, then SIGKILL, to those still alive.
A process is matched on pid and start time, so a recycled pid is never hit. Linux only (`/proc`); elsewhere a no-op.
Processes of a Ray cluster that the run joined (`resources.ray_address`) are not descendants and are left alone.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

_PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, or None."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def ray_descendants(root: int) -> dict[int, str]:
    """{pid: start time} of the Ray processes below `root`."""
    parent = {int(d.name): s[0] for d in _PROC.iterdir() if d.name.isdigit() and (s := _stat(int(d.name)))}
    below, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in below}
        below |= frontier
    return {p: s[1] for p in below if b"ray" in _cmdline(p) and (s := _stat(p))}


def terminate(procs: dict[int, str], grace_s: float = 3.0) -> None:
    """SIGTERM, then after `grace_s` SIGKILL, to the processes of `procs` that are still the same processes."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        alive = [p for p, start in procs.items() if (s := _stat(p)) and s[1] == start]
        for p in alive:
            with contextlib.suppress(OSError):
                os.kill(p, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if (s := _stat(p)) and s[1] == procs[p]]
        if not alive:
            return


def kill_client_actors() -> None:
    """End this process's ClientApp actors at once (their in-flight work is abandoned)."""
    actors = {p: s for p, s in ray_descendants(os.getpid()).items() if b"ClientAppActor" in _cmdline(p)}
    terminate(actors, grace_s=0.0)


def _watch(driver: int) -> None:
    """The watcher process: note the driver's Ray descendants until stdin closes, then stop those left."""
    seen: dict[int, str] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 1.0)
        seen.update({p: s for p, s in ray_descendants(driver).items() if p != os.getpid()})
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    terminate(seen)


@contextlib.contextmanager
def watch() -> Iterator[None]:
    """Reap this process's Ray descendants when the block ends or this process dies."""
    if not (_PROC / "self" / "stat").exists():
        yield
        return
    code = f"from fedtina.runtime.reaper import _watch; _watch({os.getpid()})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)   # no terminal Ctrl-C for it
    try:
        yield
    finally:
        proc.stdin.close()   # EOF: the watcher reaps what is left, then exits
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
