"""The one place that starts a Flower simulation.

`flwr.simulation.run_simulation` is deprecated in flwr 1.42 (in favour of `flwr run`, which needs a SuperLink daemon,
FLWR_HOME and a per-run virtualenv built with network access), but it is the only in-process launcher: the ServerApp
runs in a thread of this process, so it can use the Tina generator, the encoder and the feature bank that the driver
already loaded. If a future Flower removes it, only this module changes (the apps stay importable for `flwr run`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from typing import Any, Iterator

from fedtina.errors import FedtinaError
from fedtina.runtime import app_by_name
from fedtina.runtime import linkstate_index
from fedtina.runtime import node_partitions
from fedtina.runtime import reaper
from fedtina.runtime.app_by_name import load_app
from fedtina.runtime.grid import StopFlag
from fedtina.runtime.spec import RunSpec, set_run_spec

log = logging.getLogger("fedtina.federation")


class _OnceFilter(logging.Filter):
    """Lets Flower's `DEPRECATED FEATURE` banner through once per process (every run_simulation call logs it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith("DEPRECATED FEATURE"):
            return True
        key = msg.splitlines()[0]
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class _ClientTracebackFilter(logging.Filter):
    """Console only: drops Flower's ERROR records of a ClientApp exception (a full Ray traceback per failed message).
    The ServerApp logs one warning line per failed client instead; the traceback still reaches the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        msg = record.getMessage()
        return not ("ClientAppException" in msg or msg.startswith("An exception was raised when processing a message"))


_once = _OnceFilter()
_client_tracebacks = _ClientTracebackFilter()


def quiet_flower(console_level: int = logging.WARNING, file_handlers: list[logging.Handler] = ()) -> None:
    """Flower's logger keeps its own console handler (at `console_level`); it does not propagate to the root logger
    (Hydra's handlers would print every line twice) but writes to the run's log file through `file_handlers`."""
    import flwr.common  # noqa: F401 - Flower installs its console handler on import: it must exist to be tuned

    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    flwr_log.setLevel(logging.DEBUG if console_level <= logging.DEBUG else logging.INFO)  # no DEBUG in the log file
    if _once not in flwr_log.filters:
        flwr_log.addFilter(_once)
    for h in flwr_log.handlers:
        if type(h).__name__ == "ConsoleHandler":
            h.setLevel(console_level)
            if _client_tracebacks not in h.filters:
                h.addFilter(_client_tracebacks)
    for h in file_handlers:
        if h not in flwr_log.handlers:
            flwr_log.addHandler(h)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)


AUTO = "auto"


def backend_config(resources: dict[str, Any]) -> dict[str, Any]:
    """The `resources` Hydra node -> run_simulation's backend_config.

    resources: num_cpus / num_gpus per ClientApp actor; ray_address (null: start a local Ray with `init_num_cpus`
    CPUs, default all); object_store_mb (cap Ray's object store, useful with a small /dev/shm).
    With ray_address set (`auto`, `ray://host:10001`), init_args carry only the address: passing num_cpus to a
    running cluster makes ray.init fail, and the ServerApp would then wait until its timeout.
    """
    num_cpus = float(resources.get("num_cpus", 1))
    num_gpus = resources.get("num_gpus", 0.0) or 0.0   # fits the machine: fedtina.validate checked it
    num_gpus = AUTO if num_gpus == AUTO else float(num_gpus)   # auto: `share_gpus` sizes it once Ray is up
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if resources.get("ray_address"):
        init_args["address"] = str(resources["ray_address"])
    else:
        if resources.get("init_num_cpus"):
            init_args["num_cpus"] = int(resources["init_num_cpus"])
        if resources.get("object_store_mb"):
            init_args["object_store_memory"] = int(resources["object_store_mb"]) * 1024 * 1024
    return {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}, "init_args": init_args}


def _init_ray(backend: dict[str, Any]) -> None:
    """Start (or join) Ray here rather than inside Flower's backend, which only calls `ray.init` when Ray is not up:
    so the actor pool can be sized before the simulation starts, and Ray's own SIGTERM handler (installed by
    `ray.init`) is in place before ours replaces it. Same arguments as Flower's `RayBackend.init_ray`."""
    import sys

    import ray

    if ray.is_initialized():
        return
    # Ray's future default, which also silences its FutureWarning at every ray.init: an actor given num_gpus=0 keeps
    # the driver's CUDA_VISIBLE_DEVICES instead of a blank one. Such an actor still runs on the CPU, because
    # `fedtina.device.pick_device` asks Ray which GPUs the actor was given (none) rather than what it can see; the
    # blanking would hide the GPU from resources.device=cuda too, which is an explicit choice to use it.
    # Read by the driver at ray.init and by the workers a local Ray starts (they inherit this environment).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
                 **backend["init_args"])
    except (ConnectionError, RuntimeError, ValueError) as e:   # e.g. address=auto with no cluster on this machine
        where = backend["init_args"].get("address")
        raise FedtinaError(f"Ray did not start{f' (resources.ray_address={where!r})' if where else ''}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def gpu_share(nodes: list[dict[str, float]], num_cpus: float) -> float:
    """`num_gpus: auto`: the GPU share per actor that lets every CPU of each GPU node run an actor (`num_cpus` each)
    with the node's GPUs shared evenly among them (the smallest share of any node, so it fits everywhere): whole GPUs
    at or above one (Ray's rule), below one rounded down to Ray's resource precision (1e-4), so that the last actor
    still fits. 0.0 when no node has a GPU and a CPU for an actor. `nodes`: each Ray node's resources."""
    shares = [n["GPU"] / actors for n in nodes
              if n.get("GPU", 0) > 0 and (actors := int(n.get("CPU", 0) / num_cpus)) > 0]
    if not shares:
        return 0.0
    share = min(shares)
    return float(math.floor(share)) if share >= 1 else math.floor(share * 1e4 + 1e-9) / 1e4


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]


def share_gpus(backend: dict[str, Any]) -> dict[str, Any]:
    """`backend` with `num_gpus: auto` replaced by `gpu_share` of the running Ray cluster (started or joined); a
    number is an explicit share and stays as it is."""
    res = backend["client_resources"]
    if res["num_gpus"] != AUTO:
        return backend
    nodes = _alive_nodes()
    share = gpu_share(nodes, res["num_cpus"])
    if share == 0:
        have = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
        raise FedtinaError(f"resources.num_gpus=auto: no Ray node has a GPU and resources.num_cpus="
                           f"{res['num_cpus']:g} CPU(s) for an actor (the cluster has {have}); use resources=cpu")
    return {**backend, "client_resources": {**res, "num_gpus": share}}


def pool_line(backend: dict[str, Any], actors: int, nodes: list[dict[str, float]]) -> str:
    """The `[ray]` log line: the actor pool, where Ray runs, and how many actors share a GPU."""
    where = (f"joined {backend['init_args']['address']}" if "address" in backend["init_args"] else "started here")
    line = f"[ray] {actors} ClientApp actor(s) on {len(nodes)} Ray node(s), {where}"
    share = backend["client_resources"]["num_gpus"]
    if share > 0:
        gpus = sum(n.get("GPU", 0) for n in nodes)
        line += f", {actors / gpus:g} actor(s) per GPU ({gpus:g} GPU(s), num_gpus={share:g} each)"
    return line


def pool_size(backend: dict[str, Any]) -> int:
    """How many ClientApp actors Flower will start (its own rule); an impossible request fails here, in seconds,
    instead of leaving the ServerApp waiting for clients that can never run."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    res = backend["client_resources"]
    try:
        return int(pool_size_from_resources(res))
    except ValueError:
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        raise FedtinaError(f"no ClientApp actor fits: each needs resources.num_cpus={res['num_cpus']:g} and "
                           f"resources.num_gpus={res['num_gpus']:g}, the Ray cluster has {have}") from None


@contextlib.contextmanager
def _stop_on_signals(stop: StopFlag) -> Iterator[None]:
    """The first Ctrl-C or SIGTERM asks the ServerApp to stop (it writes the report of what finished, then the
    simulation ends); a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if stop.is_set():
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        stop.request(f"{name} received")
        log.warning("%s: stopping after the current step and writing the report of what finished "
                    "(again to abort at once)", name)

    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _hurry(spec: RunSpec, engine_done: threading.Event, grace_s: float = 3.0) -> None:
    """After a stop request the ServerApp writes its report and returns, but the engine only ends once the client
    work in flight has returned, which can take as long as that work runs: after `grace_s`, end the actors."""
    spec.finished.wait()
    if spec.stop.is_set() and not engine_done.wait(grace_s):
        log.warning("ending the ClientApp actors: their work in flight is abandoned")
        for h in logging.getLogger("flwr").handlers:   # Flower logs each dead actor's traceback: the file keeps them
            if type(h).__name__ == "ConsoleHandler":
                h.setLevel(logging.CRITICAL)
        reaper.kill_client_actors()


# the apps, found the way `flwr run` finds them (pyproject.toml's [tool.flwr.app.components]; a test keeps the two
# equal): the library itself never imports server/ or clients/
APPS = {"serverapp": "server.server_app:app", "clientapp": "clients.client_app:app"}


def run(spec: RunSpec, backend: dict[str, Any], verbose: bool = False) -> Any:
    """Run the ServerApp and `spec.n_clients` ClientApps (Ray actors) to completion; returns `spec.outcome`
    (filled by the ServerApp, also when it was stopped: then `outcome.interrupted` says why). A ServerApp
    exception is re-raised here; a failed simulation engine stops the ServerApp, which still writes its report."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    quiet_flower(logging.DEBUG if verbose else logging.WARNING)

    from flwr.simulation import run_simulation  # deprecated in 1.42, see the module docstring

    linkstate_index.install()
    node_partitions.install()
    spec.node_partitions = {}   # the engine fills it as it registers the nodes; the ServerApp waits for it
    app_by_name.install(APPS["clientapp"])
    server_app, client_app = (load_app(APPS[k]) for k in ("serverapp", "clientapp"))
    set_run_spec(spec)
    try:
        with reaper.watch():
            try:
                _init_ray(backend)
                backend = share_gpus(backend)
                spec.concurrency = pool_size(backend)
                log.info("%s", pool_line(backend, spec.concurrency, _alive_nodes()))
                engine_done = threading.Event()
                threading.Thread(target=_hurry, args=(spec, engine_done), daemon=True).start()
                with _stop_on_signals(spec.stop):
                    try:
                        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=spec.n_clients,
                                       backend_config=backend, verbose_logging=verbose)
                    except Exception as e:
                        # the engine died under a live ServerApp thread: stop it, let it write what finished
                        spec.stop.request(f"the simulation engine failed: {type(e).__name__}: {e}")
                        spec.finished.wait(60)
                        if spec.outcome is None:
                            raise
                    finally:
                        engine_done.set()
            finally:
                if ray.is_initialized():
                    ray.shutdown()
    finally:
        set_run_spec(None)
    if spec.outcome is None:
        raise FedtinaError("the simulation ended without results (the ServerApp did not finish); see the log above")
    return spec.outcome
