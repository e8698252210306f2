"""A prepared run dir, replayed under Flower's deployment runtime: a SuperLink and one SuperNode per client started on
loopback, `flwr run` against them, followed to the end, everything stopped after.

    python -m fedtina.simulate prepare_only=true clients=3 rounds=1 hydra.run.dir=outputs/prepared
    python -m fedtina.deploy run_dir=outputs/prepared                 # TLS + SuperNode authentication (default)
    python -m fedtina.deploy run_dir=outputs/prepared tls=false auth=false          # insecure
    python -m fedtina.deploy run_dir=outputs/prepared superlink=10.0.0.5:8000 tls=false auth=false   # join one

Options are key=value (`DeployConfig`). With TLS the certificates are generated in the replay dir; with auth each
SuperNode gets its own key pair there and only those keys are registered, so no other SuperNode can join, and the
ServerApp knows each client by the node its key was given (`deployment/node_partitions.json`), not by the id it
claims; without auth it has only the claims (checked to be free partition ids) and warns so in its log. Each
replay runs in a fresh dir (default `<run_dir>/replays/<stamp>`) that starts from the prepared state; its results
(summary.json, clients.csv, ...) land there as a simulation's do. Ctrl-C or SIGTERM stops every process it started
and prints one line; a second signal aborts at once.
"""

from __future__ import annotations

import json
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from fedtina.errors import FedtinaError
from fedtina.runtime.deployment import Deployment, check_security, fresh_replay

PROJECT_DIR = Path(__file__).resolve().parents[1]   # the Flower app (pyproject.toml's [tool.flwr.app])


@dataclass
class DeployConfig:
    run_dir: str = "???"              # a run dir written by `python -m fedtina.simulate prepare_only=true` (required)
    out: str | None = None            # the replay dir (default: <run_dir>/replays/<stamp>)
    tls: bool = True                  # TLS with certificates generated in the replay dir
    auth: bool = True                 # SuperNode authentication: only the keys generated here may join (needs tls)
    superlink: str | None = None      # host:port of a running SuperLink to join instead of starting one (insecure)
    supernodes: int | None = None     # SuperNodes to start (default: the prepared run's clients)
    timeout_s: float = 1800.0         # seconds the run may take


def replay(prepared: Path, dest: Path, tls: bool = False, superlink: str | None = None,
           supernodes: int | None = None, timeout_s: float = 1800.0, auth: bool = False) -> dict:
    """Replay `prepared` in `dest` under the deployment runtime; the run's summary.json as a dict."""
    if not (PROJECT_DIR / "pyproject.toml").exists():
        raise FedtinaError(f"{PROJECT_DIR} has no pyproject.toml: fedtina.deploy needs the source checkout "
                           f"(pip install -e .)")
    spec = fresh_replay(prepared, dest)
    n = spec.n_clients if supernodes is None else supernodes
    with Deployment(dest / "deployment", n, tls=tls, superlink=superlink, auth=auth) as d:
        res = d.run(PROJECT_DIR, dest, timeout_s=timeout_s)
    summary = dest / "summary.json"
    if res.returncode != 0 or not summary.exists():
        raise FedtinaError(f"flwr run exited with code {res.returncode} after {res.wall_s:.0f} s"
                           f"{'' if summary.exists() else ' without a report'}; see {res.log} and the logs in "
                           f"{dest / 'deployment'}")
    return json.loads(summary.read_text())


def parse_args(argv: list[str]) -> DeployConfig:
    """key=value arguments -> DeployConfig, each value typed by its field; a bad one is one FedtinaError line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fedtina.config import POSITIVE, check_value

    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        raise FedtinaError(f"arguments are key=value (e.g. run_dir=outputs/prepared tls=true), got {bad}")
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as e:
        raise FedtinaError(f"cannot parse {argv}: {e}".splitlines()[0]) from None
    cfg, hints = DeployConfig(), typing.get_type_hints(DeployConfig)
    for key, value in given.items():
        if key not in hints:
            raise FedtinaError(f"unknown option {key!r}; valid: {sorted(hints)}")
        check_value(key, value, hints[key], POSITIVE if key in ("supernodes", "timeout_s") else None)
        setattr(cfg, key, value)
    check_value("run_dir", cfg.run_dir, str)
    check_security(cfg.tls, cfg.auth, cfg.superlink)
    return cfg


def main(argv: list[str] | None = None) -> int:
    from fedtina.report.summary import format_table
    from fedtina.runtime.rundir import sigterm_interrupts

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = parse_args(argv)
        prepared = Path(cfg.run_dir).expanduser()
        dest = Path(cfg.out) if cfg.out else prepared / "replays" / time.strftime("%Y-%m-%d_%H-%M-%S")
        with sigterm_interrupts():
            doc = replay(prepared, dest, tls=cfg.tls, superlink=cfg.superlink, supernodes=cfg.supernodes,
                         timeout_s=cfg.timeout_s, auth=cfg.auth)
    except FedtinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (rundir.Terminated): Deployment stopped every process
        print(f"interrupted{f' ({e})' if str(e) else ''}: the SuperLink and SuperNodes were stopped",
              file=sys.stderr)
        return getattr(e, "exit_code", 130)
    print(format_table(doc["summary"]))
    print(f"results: {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
