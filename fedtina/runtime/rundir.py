"""A run dir's lifecycle: one process at a time, a status marker that tells a finished run from a killed one, and
the checkpoint that `resume=true` restarts from.

* `.run.lock` is held (flock) by the process running in the dir: a second process is refused, and a dead process
  releases it whatever killed it, so "status says running but nobody holds the lock" means killed.
* `status.json`: {state: running | done | failed | interrupted, pid, updated, detail, resume}, written atomically at
  every change of state.
* `checkpoint.json`: what finished so far (the ServerApp writes it after every method and whenever a method saves its
  resume state; see `fedtina.server.ledger`), written atomically, so a kill leaves the previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from fedtina.errors import FedtinaError
from fedtina.io import atomic_write, write_json_lists

STATUS, LOCK, CHECKPOINT, CONFIG = "status.json", ".run.lock", "checkpoint.json", "config.json"
RESUMABLE = ("running", "interrupted", "failed")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt: the same clean-up, then exit status 143."""
    exit_code = 128 + signal.SIGTERM

    def __str__(self) -> str:
        return "SIGTERM"


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside: SIGTERM raises `Terminated` (a KeyboardInterrupt), so `kill` cleans up as Ctrl-C does (children
    stopped, status `interrupted`, one line) instead of ending the process on the spot; a second SIGTERM during the
    clean-up ends it at once. Main thread only (Python installs handlers nowhere else)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the next one aborts
        raise Terminated()

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _write_json(path: Path, doc: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))


def _read_json(path: Path, what: str) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FedtinaError(f"{what} {path} is unreadable ({e}); the run dir cannot be resumed") from None


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- one process at a time ----------------------------------------------------------------------------------
    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = (self.status() or {}).get("pid", "?")
            raise FedtinaError(f"run dir {self.path} is in use by another fedtina process (pid {owner}); "
                               f"start the run in a new dir") from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # closing drops the flock
            self._lock_fd = None

    def locked_by_other(self) -> bool:
        if not (self.path / LOCK).exists() or self._lock_fd is not None:
            return False
        fd = os.open(self.path / LOCK, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # -- status -------------------------------------------------------------------------------------------------
    def status(self) -> dict | None:
        return _read_json(self.path / STATUS, "run status")

    def mark(self, state: str, detail: str = "") -> None:
        _write_json(self.path / STATUS, {"state": state, "pid": os.getpid(), "updated": time.strftime("%FT%T%z"),
                                         "detail": detail, "resume": resume_command(self.path)})

    def state(self) -> str:
        """`none` (no run yet), `killed` (marked running, but no process holds the lock), or the marked state."""
        st = self.status()
        if st is None:
            return "none"
        if st.get("state") == "running" and not self.locked_by_other():
            return "killed"
        return str(st.get("state"))

    # -- what finished so far -----------------------------------------------------------------------------------
    def save_checkpoint(self, doc: dict[str, Any], lists: dict[str, Iterable[Any]] | None = None,
                        item: Callable[[Any], Any] = lambda x: x) -> None:
        """`doc` and the long `lists` (their items encoded one at a time by `item`) as one JSON object."""
        write_json_lists(self.path / CHECKPOINT, doc, lists or {}, item)

    def checkpoint(self) -> dict[str, Any] | None:
        return _read_json(self.path / CHECKPOINT, "checkpoint")

    def save_config(self, cfg: dict[str, Any]) -> None:
        _write_json(self.path / CONFIG, cfg)

    def config(self) -> dict[str, Any]:
        cfg = _read_json(self.path / CONFIG, "run config")
        if cfg is None:
            raise FedtinaError(f"{self.path} has no {CONFIG}: it is not a run dir written by fedtina.simulate")
        return cfg


def resume_command(path: Path) -> str:
    return f"python -m fedtina.simulate resume={Path(path).resolve()}"


def find_resumable(resume: str, root: Path) -> RunDir:
    """`resume=<run dir>`: that dir; `resume=true`: the newest run dir under `root` that was killed, interrupted
    or failed. Refuses a dir that finished, is in use, or holds no run."""
    if str(resume).lower() in ("true", "1", "yes"):
        candidates = sorted((d for d in root.glob("*") if (d / STATUS).exists() and RunDir(d).state() in
                             ("killed", "interrupted", "failed")), key=lambda d: (d / STATUS).stat().st_mtime)
        if not candidates:
            raise FedtinaError(f"resume=true: no killed, interrupted or failed run under {root}; "
                               f"pass resume=<run dir> to name one")
        return RunDir(candidates[-1])
    rd = RunDir(Path(resume).expanduser())
    state = rd.state()
    if state == "none":
        raise FedtinaError(f"resume={resume}: {rd.path} holds no fedtina run (no {STATUS})")
    if state == "done":
        raise FedtinaError(f"resume={resume}: the run in {rd.path} already finished; nothing to resume")
    if state == "running":
        raise FedtinaError(f"resume={resume}: the run in {rd.path} is still running (pid {rd.status().get('pid')})")
    return rd


def check_resume_overrides(run: "RunDir", composed: dict[str, Any], overrides: list[str]) -> None:
    """A resumed run continues with its own config: a command-line override (other than `resume` and `hydra.*`)
    whose value differs from the run's is one line, not silently ignored. `composed`: the command's config with
    those overrides applied, so a group choice (`method=pfl`) compares as the section it selects."""
    keys = [k for k in (o.lstrip("+~").split("=", 1)[0] for o in overrides)
            if k != "resume" and not k.startswith("hydra.")]
    run_config = run.config() if keys else {}
    differ = []
    for key in keys:
        mine, theirs = _select(composed, key), _select(run_config, key)
        if mine != theirs:
            differ.append(f"{key} (this command: {_short(mine)}; the run: {_short(theirs)})")
    if differ:
        raise FedtinaError(f"resume continues the run with its own config; these overrides differ from it: "
                           f"{'; '.join(differ)}. Drop them to resume, or start a new run")


def _select(cfg: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."

