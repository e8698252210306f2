"""Bounds on hostile or mistaken input (fedtina.config.LimitsConfig): each is refused in one line naming the limit,
before it costs minutes or gigabytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedtina.config import LimitsConfig
from fedtina.errors import FedtinaError, LabelSetError
from fedtina.tina.generator import parse_label_text

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_a_long_whitespace_run_parses_and_a_long_description_is_refused():
    # the old split pattern backtracked over the run: quadratic, 55 s at 100,000 spaces
    assert parse_label_text("a" + " " * 9_000 + "andx") == ["a andx"]
    assert parse_label_text("cat" + " " * 5_000 + "and" + "\t" * 4_000 + "dog") == ["cat", "dog"]
    with pytest.raises(LabelSetError, match=r"100,005 characters, more than limits.max_description_chars=10,000$"):
        parse_label_text("a" + " " * 100_000 + "andx")


def test_a_long_class_name_is_refused_by_the_configured_limit():
    limits = LimitsConfig(max_name_chars=10, max_description_chars=50)
    assert parse_label_text("a model for: maple tree, oak and tractor", limits) == ["maple tree", "oak", "tractor"]
    with pytest.raises(LabelSetError, match=r"class name 'abcdefghijk'... has 11 characters, more than "
                                            r"limits.max_name_chars=10"):
        parse_label_text("oak, abcdefghijk", limits)
    with pytest.raises(LabelSetError, match="more than limits.max_description_chars=50"):
        parse_label_text("x" * 51, limits)


# --------------------------------------------------------------------------------------------------------------------
# config: clients and seeds, refused before anything is built


def _compose(*overrides: str) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("simulate", overrides=list(overrides)), resolve=True)


def test_too_many_clients_are_refused_with_a_memory_estimate():
    from fedtina.validate import validate_simulate_config

    with pytest.raises(FedtinaError, match=r"^clients=100,000,000 exceeds limits.max_clients=1,000,000 \(the driver "
                                           r"alone would need ~3,700 GB at ~37 KB per client\)"):
        validate_simulate_config(_compose("clients=100000000", "method.names=[selection]"))
    with pytest.raises(FedtinaError, match=r"^clients=11 exceeds limits.max_clients=10 "):
        validate_simulate_config(_compose("clients=11", "limits.max_clients=10"))
    validate_simulate_config(_compose("clients=10", "limits.max_clients=10"))


@pytest.mark.parametrize("key", ["partition.seed", "protocol.seed", "zoo.seed", "dataset.seed", "backbone.seed",
                                 "tina.seed", "limits.max_name_chars", "limits.max_clients"])
def test_negative_seeds_and_limits_are_refused(key):
    from fedtina.validate import validate_simulate_config

    with pytest.raises(FedtinaError, match=rf"^{key}=-1 is invalid: must be an integer >"):
        validate_simulate_config(_compose(f"{key}=-1"))


def test_a_negative_seed_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedtina.simulate", "zoo.seed=-1", f"cache_dir={tmp_path / 'c'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "zoo.seed=-1 is invalid" in lines[0], lines
