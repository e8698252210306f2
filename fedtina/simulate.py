"""The simulated federation: Tina against FedAvg and local fine-tuning on the same clients.

    python -m fedtina.simulate clients=100                    # compare: tina, selection, local_ft, fedavg, fedavg_ft
    python -m fedtina.simulate clients=20 rounds=2 method=tina dataset=caltech101
    python -m fedtina.simulate method=fedavg_full clients=10  # FedAvg of the whole ResNet-20 on images (costly)
    python -m fedtina.simulate clients=50 method=pfl rounds=10  # Tina against the personalized-FL methods

The driver builds (or loads from the cache) the core assets, writes the run's inputs into the Hydra run dir
(features.npy, partition.json, a copy of the zoo that the run grows), and runs ONE Flower simulation on Ray in which
the ServerApp (a thread of this process, holding Tina) plays every requested method. See docs/federation.md.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedtina.config import CoreConfig, HeadTrainConfig, from_dict
from fedtina.errors import FedtinaError
from fedtina.adversary.privacy import PrivacyConfig
from fedtina.runtime.spec import Faults, RunSpec
from fedtina.server.aggregation import AggregationConfig
from fedtina.io import atomic_write
from fedtina.validate import validate_partition, validate_simulate_config

log = logging.getLogger("fedtina.simulate")

CORE_KEYS = ("dataset", "protocol", "backbone", "encoder", "zoo", "tina", "limits", "cache_dir")


def _plain(cfg: DictConfig | dict) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def prepare(cfg: dict[str, Any], out_dir: Path, assets=None) -> RunSpec:
    """Build (or load) the assets and write the run's inputs into `out_dir`; the RunSpec for the ServerApp."""
    from fedtina.data.partition import PartitionConfig, make_partition, save_partition
    from fedtina.report.summary import plot_partition

    out_dir.mkdir(parents=True, exist_ok=True)
    core = from_dict(CoreConfig, {k: cfg[k] for k in CORE_KEYS if k in cfg})
    method = dict(cfg["method"])
    names = list(method.pop("names"))
    part_cfg, n_clients = from_dict(PartitionConfig, cfg["partition"]), int(cfg["clients"])
    if assets is None:
        from fedtina.assets import build_assets
        from fedtina.data import load_dataset
        from fedtina.data.split import make_split

        # the dataset, split and partition are cheap (cached) and the backbone is not: a too-small dataset, or a
        # partitioner that cannot deal it, fails here
        dataset = load_dataset(core.dataset, core.cache_path)
        split = make_split(dataset, core.protocol)
        validate_partition(cfg, dataset, split)
        partition = make_partition(dataset, split, n_clients, part_cfg)
        t0 = time.perf_counter()
        assets = build_assets(core, log=log.info)
        log.info("[assets] ready in %.1f s", time.perf_counter() - t0)
    else:
        partition = make_partition(assets.dataset, assets.split, n_clients, part_cfg)

    features = out_dir / "features.npy"
    _atomic_save_npy(features, np.ascontiguousarray(assets.bank.features, dtype=np.float32))
    images = None
    from fedtina.methods import REGISTRY

    if any(REGISTRY[n].needs_images for n in names):
        images = out_dir / "images.npy"
        _atomic_save_npy(images, np.ascontiguousarray(assets.dataset.images))
    partition_path = out_dir / "partition.json"
    save_partition(partition_path, partition)
    plot_partition(out_dir / "partition.png", partition)
    st = partition.stats()
    log.info("[partition] %d clients (%d new: they arrive after training), %.1f classes and %.0f train images "
             "each (min %d), %d with unseen classes, %d server hold-out images", st["clients"], st["new"],
             st["k_mean"], st["train_mean"], st["train_min"], st["with_unseen"], st["server_val"])

    zoo_dir = out_dir / "zoo"  # the run's zoo grows; the cached one is never modified
    if zoo_dir.exists():
        shutil.rmtree(zoo_dir)
    shutil.copytree(assets.zoo_dir, zoo_dir)

    res = cfg["resources"]
    spec = RunSpec(out_dir=str(out_dir.resolve()), features_path=str(features.resolve()),
                   partition_path=str(partition_path.resolve()), zoo_dir=str(zoo_dir.resolve()),
                   tina_path=str((out_dir / "tina" / "tina.safetensors").resolve()),
                   n_clients=int(cfg["clients"]), rounds=int(cfg["rounds"]), methods=names,
                   images_path=str(images.resolve()) if images else None,
                   options={k: dict(v) for k, v in method.items()},
                   fraction_train=float(cfg.get("fraction_train", 1.0)),
                   loggers=[str(x) for x in cfg.get("loggers") or []],
                   head_ft=from_dict(HeadTrainConfig, cfg["head_ft"]),
                   checks=dict(cfg["checks"]), faults=from_dict(Faults, cfg.get("faults")),
                   aggregation=from_dict(AggregationConfig, cfg.get("aggregation")),
                   privacy=from_dict(PrivacyConfig, cfg.get("privacy")),
                   timeout_s=float(cfg["timeout_s"]), node_wait_s=float(cfg["node_wait_s"]),
                   client_device=str(res.get("device", "auto")),
                   core={k: cfg[k] for k in CORE_KEYS if k in cfg})
    spec.save()
    spec.assets = assets
    return spec


def _log_file_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def run(cfg: DictConfig | dict | None, out_dir: str | Path, assets=None, resume: bool = False):
    """Prepare the run dir, run the simulation, write the report there; returns the Outcome (summary, results,
    records, zoo growth, files; `outcome.interrupted` says why a stopped run stopped). Tests call this with a
    composed config and their own `out_dir`.

    The run dir is held by this process (a second one is refused) and marked running / done / failed /
    interrupted. `resume=True` continues a killed, failed or interrupted run in `out_dir` from its checkpoint,
    with the config it was started with (`cfg` is ignored)."""
    from fedtina.runtime.rundir import RunDir, sigterm_interrupts

    out_dir = Path(out_dir)
    rd = RunDir(out_dir)
    rd.acquire()
    try:
        with sigterm_interrupts():
            if resume:
                plain = rd.config()
            else:
                plain = _plain(cfg)
                validate_simulate_config(plain)  # before anything costly: a bad value fails in a second, naming its key
                if rd.status() is not None:
                    raise FedtinaError(f"{out_dir} already holds a run ({rd.state()}); start in a new dir, or continue "
                                       f"it with resume={out_dir}")
                rd.save_config(plain)
            rd.mark("running")
            try:
                outcome = _run(plain, out_dir, assets, resume)
            except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (rundir.Terminated)
                rd.mark("interrupted", str(e) or "KeyboardInterrupt")
                raise
            except BaseException as e:
                rd.mark("failed", f"{type(e).__name__}: {e}")
                raise
            if outcome.failed:   # a machine error (a full disk) stopped it: resumable, never `done`
                rd.mark("failed", outcome.failed)
            else:
                rd.mark("interrupted" if outcome.interrupted else "done", outcome.interrupted)
            return outcome
    finally:
        rd.release()


def _run(plain: dict[str, Any], out_dir: Path, assets, resume: bool):
    from fedtina.methods import run_plan
    from fedtina.runtime import launch
    from fedtina.server.ledger import load_checkpoint
    from fedtina.server.loop import state_types

    t0 = time.perf_counter()
    handlers = _log_file_handlers()
    if resume:  # this process's own log goes to its Hydra dir; the resumed run's log continues too
        handlers.append(logging.FileHandler(out_dir / "simulate.log", mode="a"))
        logging.getLogger().addHandler(handlers[-1])
    try:
        launch.quiet_flower(logging.DEBUG if plain.get("verbose") else logging.WARNING, handlers)
        if resume and (out_dir / "run_spec.json").exists():
            from fedtina.assets import build_assets

            spec = RunSpec.load(out_dir)
            load_checkpoint(out_dir, state_types(run_plan(spec)))   # one that cannot be resumed fails here, in a line
            spec.assets = assets or build_assets(from_dict(CoreConfig, spec.core), log=log.info)
            log.info("[simulate] resuming %s", out_dir)
        else:  # a run killed before its inputs were written starts over
            spec = prepare(plain, out_dir, assets)
        spec.resume = resume
        backend = launch.backend_config(plain["resources"])
        log.info("[simulate] %d clients, %d rounds, methods %s; Ray: %s", spec.n_clients, spec.rounds,
                 ", ".join(spec.methods), backend)
        outcome = launch.run(spec, backend, verbose=bool(plain.get("verbose")))
        log.info("[simulate] %s in %.1f s", "stopped" if outcome.interrupted else "finished",
                 time.perf_counter() - t0)
        return outcome
    finally:
        if resume:
            logging.getLogger().removeHandler(handlers[-1])
            handlers[-1].close()


def exit_status(outcome) -> int:
    """The command's exit status for a run that returned: 1 when a machine error (a full disk) stopped it, 130
    when it was stopped (Ctrl-C, SIGTERM, a dead engine), 0 when it finished."""
    return 1 if outcome.failed else 130 if outcome.interrupted else 0


@hydra.main(version_base="1.3", config_path="../configs", config_name="simulate")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from fedtina.report.summary import format_by_labels, format_table, format_zoo_loop
    from fedtina.runtime.rundir import check_resume_overrides, find_resumable, resume_command

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.get("prepare_only"):
            validate_simulate_config(_plain(cfg))
            prepare(_plain(cfg), out_dir)
            print(f"prepared {out_dir}; run it with: flwr run . --run-config 'run-dir=\"{out_dir.resolve()}\"' "
                  f"--federation-config 'num_supernodes={cfg.clients}'")
            return None
        if cfg.get("resume") not in (None, False):
            found = find_resumable(str(cfg.resume), out_dir.parent)
            check_resume_overrides(found, _plain(cfg), list(HydraConfig.get().overrides.task))
            out_dir = found.path
            outcome = run(None, out_dir, resume=True)
        else:
            outcome = run(cfg, out_dir)
    except FedtinaError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM during run (rundir.Terminated: exit status 143)
        log.error("interrupted%s; %s", f" ({e})" if str(e) else "",
                  f"resume with: {resume_command(out_dir)}" if (out_dir / "status.json").exists()
                  else "nothing was run")
        raise SystemExit(getattr(e, "exit_code", 130)) from None
    print(format_table(outcome.summary))
    for group in ("old_clients", "new_clients"):
        if by_labels := format_by_labels(outcome.summary, group):
            print(by_labels)
    if loop := format_zoo_loop(outcome.zoo_growth):
        print(loop)
    for name, status in outcome.summary.get("method_status", {}).items():
        if status != "ok":
            print(f"{name}: {status}")
    print(f"results: {out_dir}")
    if code := exit_status(outcome):
        log.error("%s; the report above covers what finished; resume with: %s",
                  outcome.failed or outcome.interrupted, resume_command(out_dir))
        raise SystemExit(code)
    tina = outcome.summary["methods"].get("tina", {})
    return tina.get("acc_mean")  # for sweepers


import fedtina.schema.simulate  # noqa: E402,F401 - the defaults Hydra composes

if __name__ == "__main__":
    main()
