"""Config checks before any expensive step (fedtina.validate): every rule on its own, the wiring into
`fedtina.simulate` (nothing is built or started before a bad value fails), and the CLI's one error line.

Fast: no assets are built; each test starts from `configs/simulate.yaml` as composed and changes one value.
"""

from __future__ import annotations

import copy
import os
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedtina import validate
from fedtina.config import ProtocolConfig
from fedtina.data.base import ImageDataset
from fedtina.errors import FedtinaError
from fedtina.data.split import make_split
from fedtina.validate import validate_partition, validate_simulate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _compose(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("simulate", overrides=list(overrides)), resolve=True)


@pytest.fixture(scope="module")
def base() -> dict:
    return _compose()


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch):
    """The resource rules see a 2-CPU machine without CUDA, whatever runs the tests."""
    import torch

    monkeypatch.setattr(validate, "local_cpus", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _with(cfg: dict, **changes) -> dict:
    """A copy of `cfg` with dotted keys (passed with "__" for ".") set; `...` deletes the key."""
    out = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = out
        for p in path:
            node = node[p]
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return out


def test_the_default_config_and_the_test_configs_pass(base):
    validate_simulate_config(base)
    validate_simulate_config(_compose("method=fedavg", "rounds=1000", "clients=5"))  # FedAvg rounds are not cohorts
    validate_simulate_config(_compose("partition=sentence", "method=tina", "clients=1", "rounds=1"))
    validate_simulate_config(OmegaConf.create(base))                                 # a DictConfig works too


# ----------------------------------------------------------------------------------------------------------------
# values through Hydra's parser (the CLI's exact values)


@pytest.mark.parametrize("override, match", [
    ("clients=abc", r"^clients='abc' is invalid: must be an integer > 0$"),
    ("clients=2.5", r"^clients=2.5 is invalid"),
    ("clients=true", r"^clients=true is invalid"),   # a bool is an int in Python: it would run 1 client
    ("clients=0", r"^clients=0 is invalid"),
    ("clients=-3", r"^clients=-3 is invalid"),
    ("clients=null", r"^clients=null is invalid"),
    ("rounds=0", r"^rounds=0 is invalid"),
    ("timeout_s=0", r"^timeout_s=0 is invalid: must be a finite number > 0$"),
    ("timeout_s=-5", r"^timeout_s=-5 is invalid"),
    ("timeout_s=nan", r"^timeout_s=nan is invalid"),
    ("timeout_s=abc", r"^timeout_s='abc' is invalid"),
    ("node_wait_s=0", r"^node_wait_s=0 is invalid"),
    ("verbose=3", r"^verbose=3 is invalid: must be true or false$"),
])
def test_top_level_values(override, match):
    with pytest.raises(FedtinaError, match=match):
        validate_simulate_config(_compose(override))


@pytest.mark.parametrize("key, value", [
    ("head_ft__steps", 0), ("head_ft__steps", 2.5), ("head_ft__lr", 0), ("head_ft__l2_to_init", -1.0),
    ("head_ft__select", "yes"),
    ("method__tina__refresh_every", -1), ("method__tina__refresh_steps", 0), ("method__fedavg__epochs", 0),
    ("method__fedavg__lr", -0.1), ("method__fedavg__batch_size", 0), ("method__fedavg__batch_size", 1.5),
    ("method__tina__finetune", 1), ("fraction_train", 0), ("partition__new_share", -0.1),
    ("partition__k_min", 0), ("partition__k_max", "ten"), ("partition__alpha", 0), ("partition__unseen_share", 1.5),
    ("partition__unseen_per_client", -1), ("partition__test_fraction_server", 1.0), ("partition__seed", 0.5),
    ("partition__template", 3),
    ("checks__max_row_norm_ratio", 0), ("checks__max_acc_drop", -0.1), ("checks__max_bytes", 0),
    ("faults__crash_clients", ["a"]), ("faults__crash_clients", 3), ("faults__slow_s", -1.0),
    ("zoo__num_tasks", 0), ("zoo__num_tasks", "abc"), ("zoo__k_min", 0), ("zoo__finetune__steps", 0),
    ("zoo__finetune__lr", 0.0),
    ("dataset__images_per_class", 0), ("dataset__seed", "x"),
    ("backbone__epochs", 0), ("backbone__batch_size", -1), ("backbone__width", 2.0), ("backbone__lr", 0),
    ("protocol__novel_share", 1.0), ("protocol__novel_share", -0.1), ("backbone__classifier", 1),
    ("tina__max_classes", 0), ("tina__d_model", 0), ("tina__depth", 0), ("tina__train_steps", 0),
    ("tina__sample_steps", 0), ("tina__lr", 0), ("tina__ema_decay", 1.0), ("tina__subset_prob", 2.0),
    ("tina__warmup_steps", -1),
    ("encoder__template", None),
    ("cache_dir", 3),
    ("resources__num_cpus", 0), ("resources__num_cpus", -1), ("resources__num_cpus", "many"),
    ("resources__num_gpus", -0.5), ("resources__init_num_cpus", 0), ("resources__object_store_mb", -1),
    ("resources__ray_address", 5),
])
def test_each_value_is_typed_and_ranged(base, key, value):
    dotted = key.replace("__", ".")
    with pytest.raises(FedtinaError, match=rf"^{dotted}=.* is invalid: must be "):
        validate_simulate_config(_with(base, **{key: value}))


@pytest.mark.parametrize("key, value", [
    ("method__tina__refresh_every", 0), ("partition__unseen_per_client", 0), ("partition__unseen_share", 0.0),
    ("fraction_train", 1.0), ("fraction_train", 0.01), ("partition__new_share", 0.0),
    ("timeout_s", 0.5), ("resources__num_cpus", 0.5), ("resources__num_cpus", 2), ("resources__init_num_cpus", None),
    ("tina__warmup_steps", 0), ("faults__crash_clients", [0, 3]),
])
def test_boundary_values_pass(base, key, value):
    cfg = _with(base, **{key: value})
    if key == "partition__unseen_per_client":
        cfg["partition"]["unseen_share"] = 0.0  # no client holds unseen classes: 0 per client is fine
    validate_simulate_config(cfg)


def test_a_range_violation_names_the_key_the_value_and_the_range(base):
    """The range is the dataclass field's own (fedtina.config.bounded), for core, simulate and method options alike."""
    cases = [("tina__ema_decay", 1.5, r"^tina.ema_decay=1.5 is invalid: must be a finite number in \[0, 1\)$"),
             ("method__fedavg__lr", -0.5, r"^method.fedavg.lr=-0.5 is invalid: must be a finite number > 0$"),
             ("aggregation__beta", 0.5, r"^aggregation.beta=0.5 is invalid: must be a finite number in \[0, 0.5\)$"),
             ("privacy__delta", 0, r"^privacy.delta=0 is invalid: must be a finite number in \(0, 1\)$"),
             ("resources__init_num_cpus", 0, r"^resources.init_num_cpus=0 is invalid: must be an integer > 0 or null$")]
    for key, value, match in cases:
        with pytest.raises(FedtinaError, match=match):
            validate_simulate_config(_with(base, **{key: value}))


# ----------------------------------------------------------------------------------------------------------------
# defaults written once: the composed config is the dataclasses' defaults, key for key


def _defaults(cls) -> dict:
    return dataclasses.asdict(cls())


def test_the_composed_configs_are_the_dataclass_defaults():
    """Every key Hydra composes for simulate, bench and analyses (with the default groups) is a dataclass field at its
    default, and every field is there to override: YAML and dataclass cannot drift apart again."""
    from fedtina.config import AnalysisConfig, BenchConfig, CoreConfig
    from fedtina.data.partition import PartitionConfig
    from fedtina.methods import REGISTRY
    from fedtina.runtime.options import ResourcesConfig, SimulateConfig

    cfg = _compose("method=pfl")
    core = {k: v for k, v in _defaults(CoreConfig).items()}
    assert {k: cfg[k] for k in core} == core
    assert {k: cfg[k] for k in _defaults(SimulateConfig)} == _defaults(SimulateConfig)
    assert cfg["partition"] == _defaults(PartitionConfig)
    assert cfg["resources"] == _defaults(ResourcesConfig)
    assert set(cfg["method"]) == {"names", *[n for n, m in REGISTRY.items() if m.options]}
    for name, m in REGISTRY.items():
        if m.options:
            assert cfg["method"][name] == _defaults(m.options), name
    assert set(cfg) == {*core, *_defaults(SimulateConfig), "partition", "resources", "method"}
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        bench = OmegaConf.to_container(compose("analyses"), resolve=True)
    assert bench["bench"] == _defaults(BenchConfig) | {"shots": []}   # analyses.yaml's choice: zero-shot rows only
    assert bench["analysis"] == _defaults(AnalysisConfig)


@pytest.mark.parametrize("name", ["shapes", "folder", "cifar100", "caltech101"])
def test_each_dataset_group_is_its_registered_options(name):
    from fedtina.data.registry import dataset

    assert _compose(f"dataset={name}")["dataset"] == _defaults(dataset(name).options)


def test_code_built_from_defaults_builds_what_hydra_builds():
    """`CoreConfig()` (python -m fedtina.experiments.gpu_check) is the CoreConfig of every Hydra command's defaults,
    so both get the same cache keys (the zoo's hashes every ZooConfig field, finetune.select included)."""
    from fedtina.config import CoreConfig, core_config

    assert core_config(_compose()) == CoreConfig()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for name in ("bench", "generate"):
            assert core_config(OmegaConf.to_container(compose(name), resolve=True)) == CoreConfig(), name


def test_group_overrides_reach_the_stored_defaults():
    cfg = _compose("method.tina.prompt=both", "zoo.seed=1", "dataset=caltech101", "dataset.names_file=/n.tsv",
                   "encoder=clip", "encoder.pretrained=openai", "partition.alpha=0.1", "head_ft.steps=5")
    assert cfg["method"]["tina"]["prompt"] == "both" and cfg["zoo"]["seed"] == 1
    assert cfg["dataset"]["name"] == "caltech101" and cfg["dataset"]["names_file"] == "/n.tsv"
    assert cfg["backbone"]["epochs"] == 60                       # the caltech101 group's choice
    assert cfg["encoder"]["name"] == "clip" and cfg["encoder"]["pretrained"] == "openai"
    assert cfg["partition"]["alpha"] == 0.1 and cfg["head_ft"]["steps"] == 5
    with pytest.raises(Exception, match="zoo.sed"):              # an unknown key: Hydra refuses it, naming it
        _compose("zoo.sed=1")


def test_unknown_options_are_named(base):
    with pytest.raises(FedtinaError, match=r"unknown method option block\(s\) \['fo'\]"):
        validate_simulate_config(_with(base, method__fo=1))
    with pytest.raises(FedtinaError, match=r"unknown method.tina option\(s\) \['fo'\]"):
        validate_simulate_config(_with(base, method__tina__fo=1))
    with pytest.raises(FedtinaError, match=r"unknown zoo.finetune option\(s\) \['stepz'\]"):
        validate_simulate_config(_with(base, zoo__finetune__stepz=1))
    with pytest.raises(FedtinaError, match=r"^partition=3 is invalid"):
        validate_simulate_config(_with(base, partition=3))


# ----------------------------------------------------------------------------------------------------------------
# rules across keys


def test_method_names():
    with pytest.raises(FedtinaError, match=r"^method.names is missing: pick method=compare, method=pfl or one of "
                                           r"\['tina'"):
        validate_simulate_config(_compose("~method.names"))  # KeyError 'names' before
    with pytest.raises(FedtinaError, match=r"unknown method\(s\) \['foo'\]; valid: \['tina'"):
        validate_simulate_config(_compose("method.names=[tina,foo]"))
    with pytest.raises(FedtinaError, match=r"^method.names=\[\]: need one or more"):
        validate_simulate_config(_compose("method.names=[]"))
    with pytest.raises(FedtinaError, match=r"^method.names=\['tina', 'tina'\]: need one or more distinct"):
        validate_simulate_config(_compose("method.names=[tina,tina]"))
    with pytest.raises(FedtinaError, match=r"^method.names='tina' is invalid: must be a list of strings"):
        validate_simulate_config(_compose("method.names=tina"))


def test_rounds_may_not_exceed_clients_when_tina_runs():
    with pytest.raises(FedtinaError, match=r"^rounds=1000 exceeds the 4 clients that train \(clients=5 minus the new "
                                           r"ones\): .*996 cohorts would be empty"):
        validate_simulate_config(_compose("rounds=1000", "clients=5"))
    validate_simulate_config(_compose("rounds=4", "clients=5"))
    validate_simulate_config(_compose("rounds=5", "clients=5", "partition.new_share=0"))


def test_folder_dataset_needs_a_path():
    with pytest.raises(FedtinaError, match=r"^dataset=folder needs dataset.path"):
        validate_simulate_config(_compose("dataset=folder"))
    cfg = _compose("dataset=folder")
    cfg["dataset"]["path"] = "???"  # Hydra's missing value, as the group file had it
    with pytest.raises(FedtinaError, match=r"^dataset=folder needs dataset.path"):
        validate_simulate_config(cfg)
    validate_simulate_config(_compose("dataset=folder", "dataset.path=/data/x.zip"))  # existence: the loader's job


def test_a_missing_mandatory_value_is_named(base):
    with pytest.raises(FedtinaError, match=r"^encoder.model is required \(it is \?\?\? in the config\)"):
        validate_simulate_config(_with(base, encoder__model="???"))


@pytest.mark.parametrize("overrides, match", [
    (("dataset.name=mnist",), r"^dataset.name='mnist' is invalid; valid: \['shapes'"),
    (("backbone.arch=vgg",), r"^backbone.arch='vgg' is invalid; valid: \["),
    (("backbone.classifier=arc",), r"^backbone.classifier='arc' is invalid; valid: \['linear', 'cosine'\]$"),
    (("encoder.name=bert",), r"^encoder.name='bert' is invalid; valid: \["),
    (("partition.k_min=21", "partition.k_max=30"), r"^partition.k_max=30 exceeds tina.max_classes=20"),
    (("partition.k_min=8", "partition.k_max=6"), r"^partition.k_min=8, partition.k_max=6: need 1 <= k_min <= k_max"),
    (("partition.unseen_per_client=6",), r"^partition.unseen_per_client=6 exceeds partition.k_min=5"),
    (("partition.description=poem",), r"^partition.description='poem'"),
    (("loggers=[mlflow]",), r"^loggers='mlflow' is invalid; valid: \['tensorboard', 'wandb'\]"),
    (("loggers=tensorboard",), r"^loggers='tensorboard': need a list, e.g. \[tensorboard\]"),
    (("partition.scheme=shards",), r"^partition.scheme='shards'; valid: \['fedtina', 'dirichlet'"),
    (("zoo.k_min=12", "zoo.k_max=11"), r"^zoo.k_min=12 > zoo.k_max=11"),
    (("zoo.k_min=21", "zoo.k_max=21"), r"^zoo.k_max=21 exceeds tina.max_classes=20"),
    (("tina.d_model=130",), r"^tina.d_model=130 is not divisible by tina.num_heads=4"),
    (("tina.prediction=noise",), r"^tina.prediction='noise' is invalid; valid: \['x0'"),
    (("tina.schedule=quadratic",), r"^tina.schedule='quadratic', tina.timesteps=1000: unknown noise schedule"),
    (("tina.timesteps=1", "tina.sample_steps=1"), r"^tina.schedule='cosine', tina.timesteps=1: timesteps must"),
    (("tina.sample_steps=2000",), r"^tina.sample_steps=2000 exceeds tina.timesteps=1000"),
    (("tina.prompt_text=0.5",), r"^tina.prompt_text \+ prompt_images \+ prompt_both = 1.1: the prompt mix must"),
    (("tina.objective=gan",), r"^TinaConfig.objective must be one of \('diffusion', 'regress'\)"),
    (("tina.objective=regress", "tina.prediction=v"), r"^TinaConfig.objective=regress .* needs prediction=x0"),
    (("tina.prompt_sentences=0.5", "dataset.descriptions=null"), r"^tina.prompt_sentences > 0 .* dataset.descriptions"),
    (("tina.prompt_sentences=1.5",), r"^tina.prompt_sentences=1.5 .*\[0, 1\]"),
    (("resume=5",), r"^resume=5 is invalid"),
    (("method.tina.sample_steps=2000",), r"^method.tina.sample_steps=2000 exceeds the 1000 diffusion steps"),
    (("method.tina.sample_steps=-1",), r"^method.tina.sample_steps=-1"),
])
def test_cross_key_rules(overrides, match):
    with pytest.raises(FedtinaError, match=match):
        validate_simulate_config(_compose(*overrides))


def test_resources_a_local_ray_cannot_meet():
    with pytest.raises(FedtinaError, match=r"^resources.num_cpus=100 per client exceeds the 2 CPU\(s\) a local Ray "
                                           r"gets \(this machine\)"):
        validate_simulate_config(_compose("resources.num_cpus=100"))    # hung on an empty actor pool before
    with pytest.raises(FedtinaError, match=r"^resources.num_cpus=3 per client exceeds the 2 CPU\(s\) .*init_num_cpus"):
        validate_simulate_config(_compose("resources.num_cpus=3", "resources.init_num_cpus=2"))
    validate_simulate_config(_compose("resources.num_cpus=3", "resources.init_num_cpus=4"))  # Ray may over-declare
    validate_simulate_config(_compose("resources.num_cpus=100", "resources.ray_address=auto"))  # a cluster's size
    with pytest.raises(FedtinaError, match=r"^resources.num_gpus=auto shares the CUDA devices visible here among "
                                           r"the actors, and there are none: use resources=cpu$"):
        validate_simulate_config(_compose("resources=gpu"))
    with pytest.raises(FedtinaError, match=r"^resources.num_gpus=0.25 per client exceeds the 0 CUDA device"):
        validate_simulate_config(_compose("resources=gpu", "resources.num_gpus=0.25"))
    with pytest.raises(FedtinaError, match=r"^resources.num_gpus='half' is invalid: must be a finite number >= 0 or "
                                           r"auto$"):
        validate_simulate_config(_compose("resources.num_gpus=half"))


def test_a_ray_address_nobody_answers_at_fails_in_seconds():
    import socket
    import time

    with socket.socket() as s:   # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            with pytest.raises(FedtinaError, match=rf"^resources.ray_address='{address}': nobody answers at "
                                                   rf"127.0.0.1:{port} \(.*\); start the cluster there"):
                validate_simulate_config(_compose(f"resources.ray_address='{address}'"))
        assert time.monotonic() - t0 < 10   # refused at once, not after Ray's minute of retries
    with pytest.raises(FedtinaError, match=r"^resources.ray_address='cluster': need auto, host:port or ray://"):
        validate_simulate_config(_compose("resources.ray_address=cluster"))
    with socket.socket() as s:   # someone answers: accepted
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        validate_simulate_config(_compose(f"resources.ray_address='127.0.0.1:{s.getsockname()[1]}'"))


def test_resources_gpus_on_a_gpu_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    validate_simulate_config(_compose("resources=gpu"))
    with pytest.raises(FedtinaError, match=r"^resources.num_gpus=2 per client exceeds the 1 CUDA device"):
        validate_simulate_config(_compose("resources.num_gpus=2"))


def test_local_cpus_is_what_ray_would_see(monkeypatch):
    monkeypatch.undo()  # the real function
    assert 1 <= validate.local_cpus() <= (os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------------------
# the partition against the loaded dataset


def _dataset(n_classes: int, per_class: int = 8) -> tuple[ImageDataset, object]:
    labels = np.repeat(np.arange(n_classes), per_class)
    images = np.zeros((len(labels), 32, 32, 3), dtype=np.uint8)
    ds = ImageDataset("tiny", images, labels, [f"class {i}" for i in range(n_classes)])
    return ds, make_split(ds, ProtocolConfig())


def test_a_two_class_dataset_fails_on_the_partition(base):
    ds, split = _dataset(2)                                  # 2 seen, 0 unseen
    with pytest.raises(FedtinaError, match=r"^partition.k_max=10 exceeds the number of classes \(2\) \(dataset "
                                           r"'tiny' has 2 seen and 0 unseen classes\)$"):
        validate_partition(base, ds, split)


@pytest.mark.parametrize("changes, match", [
    ({"partition__k_min": 2, "partition__k_max": 10}, r"^partition.k_max=10 exceeds the number of seen classes \(8\)"),
    ({"partition__unseen_per_client": 3, "partition__k_min": 3, "partition__k_max": 3},
     r"^partition.unseen_per_client=3 exceeds the number of unseen classes \(2\)"),
    ({"partition__k_min": 2, "partition__k_max": 2, "partition__unseen_share": 0.0, "zoo__k_max": 9},
     r"^zoo.k_max=9 exceeds the seen classes zoo tasks draw from \(dataset 'tiny' has 8 seen"),
])
def test_partition_and_zoo_against_the_split(base, changes, match):
    ds, split = _dataset(10)                                 # 8 seen, 2 unseen
    cfg = _with(base, **{"zoo__k_min": 2, "zoo__k_max": 2, **changes})
    with pytest.raises(FedtinaError, match=match):
        validate_partition(cfg, ds, split)
    validate_partition(_with(base, partition__k_min=2, partition__k_max=4, zoo__k_min=2, zoo__k_max=8), ds, split)


# ----------------------------------------------------------------------------------------------------------------
# wiring into fedtina.simulate: the checks come before anything costly


def test_run_validates_before_anything_starts(monkeypatch, tmp_path):
    from fedtina import simulate

    monkeypatch.setattr(simulate, "prepare", lambda *a, **k: pytest.fail("prepare ran on a bad config"))
    with pytest.raises(FedtinaError, match=r"^clients='abc'"):
        simulate.run(_compose("clients=abc", f"cache_dir={tmp_path}"), tmp_path / "run")
    with pytest.raises(FedtinaError, match=r"^resources.num_cpus=100"):
        simulate.run(_compose("resources.num_cpus=100", f"cache_dir={tmp_path}"), tmp_path / "run")


def test_prepare_checks_the_partition_before_the_backbone(monkeypatch, tmp_path):
    """A config valid on its own but impossible on the dataset (16 unseen shape classes) fails once the dataset is
    loaded, before build_assets (which would train the backbone)."""
    import fedtina.assets
    from fedtina import simulate

    monkeypatch.setattr(fedtina.assets, "build_assets", lambda *a, **k: pytest.fail("build_assets ran"))
    cfg = _compose("dataset.images_per_class=4", f"cache_dir={tmp_path}", "clients=5", "rounds=1",
                   "partition.k_min=17", "partition.k_max=20", "partition.unseen_per_client=17")
    validate_simulate_config(cfg)
    with pytest.raises(FedtinaError, match=r"^partition.unseen_per_client=17 exceeds the number of unseen classes "
                                           r"\(16\) \(dataset 'shapes'"):
        simulate.prepare(cfg, tmp_path / "run")
    # a Flower Datasets partitioner that cannot deal the data fails there too (4 zoo-part images per class or fewer)
    cfg = _compose("dataset.images_per_class=4", f"cache_dir={tmp_path}", "clients=40", "rounds=1",
                   "partition.scheme=pathological", "partition.unseen_share=0")
    validate_simulate_config(cfg)
    with pytest.raises(FedtinaError, match=r"^partition.scheme=pathological cannot deal \d+ images of \d+ seen "
                                           r"classes to 40 clients: "):
        simulate.prepare(cfg, tmp_path / "run")


def test_a_novel_share_that_leaves_too_few_classes_fails_before_the_backbone(monkeypatch, tmp_path):
    """66 seen shape classes, 0.9 of them novel: 7 stay with the generic model, fewer than a zoo task's 10."""
    import fedtina.assets
    from fedtina.config import core_config

    monkeypatch.setattr(fedtina.assets, "build_feature_bank", lambda *a, **k: pytest.fail("the backbone trained"))
    cfg = _compose("dataset.images_per_class=4", f"cache_dir={tmp_path}", "protocol.novel_share=0.9")
    validate_simulate_config(cfg)
    with pytest.raises(FedtinaError, match=r"^protocol.novel_share=0.9 leaves the generic model 7 of the 66 seen "
                                           r"classes, fewer than zoo.k_max=10: lower protocol.novel_share$"):
        fedtina.assets.build_assets(core_config(cfg), log=lambda _m: None)


@pytest.mark.parametrize("override, key", [("clients=abc", "clients"),
                                           ("resources.num_cpus=100", "resources.num_cpus")])
def test_simulate_cli_prints_one_error_line_and_exits_2(tmp_path, override, key):
    proc = subprocess.run([sys.executable, "-m", "fedtina.simulate", override, f"cache_dir={tmp_path / 'cache'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{key}=" in lines[0] and "ERROR" in lines[0], out
    assert not (tmp_path / "cache" / "datasets").exists()  # nothing was built
