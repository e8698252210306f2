"""The run loop: `run_all` plays the methods it is given, one after the other on the same clients, and writes the
report in the run dir, whatever happened. It knows no method: each is an object (fedtina.methods.registry.Method)
with a `name`, a server loop `run(fed, state)`, an optional resume `state` dataclass, the methods it `requires`
(whose state it may read), an optional `describe(fed)` (config entries it asks of every client's `query.describe`)
and a one-line `summary`."""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from flwr.serverapp import Grid

from fedtina.errors import FedtinaError
from fedtina.runtime.grid import Interrupted
from fedtina.runtime.rundir import resume_command
from fedtina.runtime.spec import RunSpec
from fedtina.server.federation import Federation
from fedtina.server.ledger import Outcome, Progress, load_checkpoint, server_summary, write_server_phases

log = logging.getLogger("fedtina.federation")


# errors of the machine, not of a method: a full disk or quota, a failing or read-only device, no file handles or
# memory left. A method stopped by one has not finished: the run stops resumable instead of recording it failed.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE,
                            errno.ENOMEM})


class MachineFailed(FedtinaError):
    """A method stopped by an error of the machine (`MACHINE_ERRNOS`)."""


def machine_error(e: BaseException) -> OSError | None:
    """The OSError of the machine behind `e` (itself, or what it was raised from), if any."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in MACHINE_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def state_types(methods: Sequence[Any]) -> dict[str, type]:
    """The resume state dataclass of each method that has one, by name."""
    return {m.name: m.state for m in methods if m.state is not None}


def run_all(grid: Grid, spec: RunSpec, methods: Sequence[Any]) -> Outcome:
    """Every method of `methods`, in that order, on the same clients; then the report in the run dir, whatever
    happened: a method that fails (e.g. every client failed) is recorded as failed and the others go on; a stop
    request (Ctrl-C, SIGTERM, a dead engine) ends the run after the current step with the report of what finished,
    and so does a method stopped by an error of the machine (a full disk: `outcome.failed` says why), whose
    checkpoint stays that of the last finished step.
    With `spec.resume`, the run continues from the run dir's checkpoint: finished methods are skipped and each
    method gets back the state it had saved."""
    fed = Federation(grid, spec)
    types = state_types(methods)
    saved = load_checkpoint(spec.out_dir, types) if spec.resume else None
    if saved is not None:
        fed.ledger.out, fed.prog = saved
        log.info("[federation] resuming after %s", ", ".join(fed.prog.done) or "the start")
    else:
        fed.prog = Progress.fresh(types)
    prog = fed.prog
    t0 = time.perf_counter()
    try:
        fed.wait_for_nodes()
        log.info("[federation] %d clients registered in %.1f s; methods: %s", len(fed.nodes),
                 time.perf_counter() - t0, ", ".join(spec.methods))
        extra: dict[str, Any] = {}
        for method in methods:
            if method.describe is not None:
                extra.update(method.describe(fed))
        fed.describe(record=saved is None, **extra)   # a resumed run keeps the first describe's profiles
        for method in methods:
            name = method.name
            if name in prog.done:
                continue
            t = time.perf_counter()
            log.info("[%s] %s", name, method.summary or "starts")
            fed.playing = method
            try:
                method.run(fed, prog.states.get(name))
                status = "ok"
            except Interrupted:
                raise
            except Exception as e:  # noqa: BLE001 - one method failing must not lose the others' results
                if machine_error(e) is not None:   # not the method's fault: the run stops, resumable
                    raise MachineFailed(f"[{name}] {type(e).__name__}: {e}") from e
                status = f"failed: {e}"
                log.error("[%s] failed: %s%s", name, e, "" if isinstance(e, FedtinaError) else
                          " (traceback in the log file)", exc_info=not isinstance(e, FedtinaError))
            finally:
                fed.playing = None
            fed.out.method_status[name] = status
            prog.timings[name] = prog.timings.get(name, 0.0) + round(time.perf_counter() - t, 3)
            prog.done.append(name)
            fed.checkpoint()
    except Interrupted as e:
        fed.out.interrupted = str(e)
        log.warning("[federation] %s; writing the report of what finished (resume: %s)", e,
                    resume_command(Path(spec.out_dir)))
    except MachineFailed as e:
        fed.out.failed = str(e)
        log.error("[federation] the run stops: %s; its checkpoint is kept (resume: %s)", e,
                  resume_command(Path(spec.out_dir)))
    finally:
        for name in spec.methods:
            fed.out.method_status.setdefault(name, "interrupted" if fed.out.interrupted or fed.out.failed
                                             else "not run")
        _report(fed, prog.timings)
        fed.ledger.loggers.close()
    log.info("[federation] %s in %.1f s (%s)", "stopped" if fed.out.interrupted or fed.out.failed else "done",
             time.perf_counter() - t0, ", ".join(f"{k} {v:.1f} s" for k, v in prog.timings.items()))
    return fed.out


def _report(fed: Federation, timings: dict[str, float]) -> None:
    from fedtina.report.summary import summarize, write_report

    out, spec = fed.out, fed.spec
    out.summary = summarize(out.results, out.records, out.rounds)
    out.summary["method_status"] = {m: out.method_status.get(m, "not run") for m in spec.methods}
    out.summary["interrupted"] = out.interrupted or None
    out.summary["failed"] = out.failed or None
    out.summary["server_wall_s"] = {"methods": timings, "phases": server_summary(out.server_records)}
    out.files = write_report(Path(spec.out_dir), out.summary, out.results, out.records, out.zoo_growth)
    out.files.append(write_server_phases(Path(spec.out_dir) / "server_phases.csv", out.server_records))
