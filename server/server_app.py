"""fedtina's ServerApp (Flower Message API). It hosts the run's server-side models and zoo and plays the requested
methods one after the other on the same clients: the loops live in `fedtina.methods`, one module per method, and
this app hands their plan to the method-agnostic engine (`fedtina.server.loop.run_all`).

Started by `python -m fedtina.simulate` (through `fedtina.runtime.launch.run`), it runs in a thread of the driver
and reads the driver's RunSpec. Under `flwr run` it rebuilds the spec from `--run-config 'run-dir="<run dir>"'`.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtina.methods import run_plan
from fedtina.runtime.spec import get_run_spec, spec_from_run_config
from fedtina.server.loop import run_all

app = ServerApp()
log = logging.getLogger("fedtina.federation")


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec = get_run_spec() or spec_from_run_config(dict(context.run_config), log=log.info)
    try:
        spec.outcome = run_all(grid, spec, run_plan(spec))
    finally:
        spec.finished.set()   # the driver waits on it when the simulation engine fails under this thread
