"""A prepared run dir, replayed under Flower's deployment runtime: a SuperLink and one SuperNode per client started on
loopback, `flwr run` against them, followed to the end, everything stopped after.

    python -m fedtina.simulate prepare_only=true clients=3 rounds=1 hydra.run.dir=outputs/prepared
    python -m fedtina.deploy outputs/prepared                     # insecure
    python -m fedtina.deploy outputs/prepared --tls               # TLS, certificates generated locally
    python -m fedtina.deploy outputs/prepared --superlink 10.0.0.5:8000   # join a running SuperLink (insecure)

Each replay runs in a fresh dir (default `<prepared>/replays/<stamp>`) that starts from the prepared state; its
results (summary.json, clients.csv, ...) land there as a simulation's do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedtina.errors import FedtinaError
from fedtina.runtime.deployment import Deployment, fresh_replay

PROJECT_DIR = Path(__file__).resolve().parents[1]   # the Flower app (pyproject.toml's [tool.flwr.app])


def replay(prepared: Path, dest: Path, tls: bool = False, superlink: str | None = None,
           supernodes: int | None = None, timeout_s: float = 1800.0) -> dict:
    """Replay `prepared` in `dest` under the deployment runtime; the run's summary.json as a dict."""
    if not (PROJECT_DIR / "pyproject.toml").exists():
        raise FedtinaError(f"{PROJECT_DIR} has no pyproject.toml: fedtina.deploy needs the source checkout "
                           f"(pip install -e .)")
    spec = fresh_replay(prepared, dest)
    n = spec.n_clients if supernodes is None else supernodes
    with Deployment(dest / "deployment", n, tls=tls, superlink=superlink) as d:
        res = d.run(PROJECT_DIR, dest, timeout_s=timeout_s)
    summary = dest / "summary.json"
    if res.returncode != 0 or not summary.exists():
        raise FedtinaError(f"flwr run exited with code {res.returncode} after {res.wall_s:.0f} s"
                           f"{'' if summary.exists() else ' without a report'}; see {res.log} and the logs in "
                           f"{dest / 'deployment'}")
    return json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> int:
    from fedtina.report.summary import format_table

    ap = argparse.ArgumentParser(prog="python -m fedtina.deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("prepared", type=Path, help="a run dir written by `python -m fedtina.simulate prepare_only=true`")
    ap.add_argument("--out", type=Path, help="the replay dir (default: <prepared>/replays/<stamp>)")
    ap.add_argument("--tls", action="store_true", help="TLS with certificates generated in the replay dir")
    ap.add_argument("--superlink", help="host:port of a running SuperLink to join instead of starting one")
    ap.add_argument("--supernodes", type=int, help="SuperNodes to start (default: the prepared run's clients)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take (default 1800)")
    args = ap.parse_args(argv)
    dest = args.out or args.prepared / "replays" / time.strftime("%Y-%m-%d_%H-%M-%S")
    try:
        doc = replay(args.prepared, dest, tls=args.tls, superlink=args.superlink, supernodes=args.supernodes,
                     timeout_s=args.timeout)
    except FedtinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(doc["summary"]))
    print(f"results: {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
