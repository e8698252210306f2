"""Shared fixtures."""

import pytest
import torch

import fedtina.schema.simulate  # noqa: F401 - the dataclasses' defaults into Hydra's ConfigStore, for every compose


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensor problems: a second OpenMP thread only adds sync waits, long ones on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(cache dir, assets) of the simulation tests' tiny config (tests/simkit.py): the core pipeline run once per
    session; later builds with the same config load from this cache."""
    from simkit import compose

    from fedtina.assets import build_assets
    from fedtina.config import CoreConfig, from_dict
    from fedtina.simulate import CORE_KEYS, _plain

    cache = tmp_path_factory.mktemp("cache")
    plain = _plain(compose(cache))
    assets = build_assets(from_dict(CoreConfig, {k: plain[k] for k in CORE_KEYS if k in plain}), log=lambda _m: None)
    return cache, assets


@pytest.fixture
def task_identity():
    """Messages are stamped with the running task's identity, which a unit test has to provide."""
    from flwr.supercore.task_identity import TaskIdentity

    before = {k: getattr(TaskIdentity, k, None) for k in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    for k, v in before.items():
        setattr(TaskIdentity, k, v)
