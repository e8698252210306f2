"""The core end to end on the embedded data, at toy size: dataset -> backbone -> zoo -> Tina -> benchmark table, and
text -> a saved, loadable classifier. Tina must beat chance by a clear margin on tasks it never saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedtina.experiments import bench, harness
from fedtina import generate
from fedtina.errors import CorruptFileError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
K = 5
TINY = [
    "dataset.images_per_class=40",
    "backbone.width=8", "backbone.epochs=8", "backbone.batch_size=32",
    "zoo.num_tasks=150", f"zoo.k_min={K}", f"zoo.k_max={K}", "zoo.finetune.steps=50",
    "tina.max_classes=8", "tina.d_model=64", "tina.depth=2", "tina.num_heads=4", "tina.train_steps=600",
    "tina.batch_size=32", "tina.warmup_steps=30", "tina.sample_steps=10", "tina.log_every=10000",
]


def _cfg(name: str, cache: Path, *extra: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(name, overrides=[*TINY, f"cache_dir={cache}", *extra])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-cache")


@pytest.fixture(scope="module")
def report(cache, tmp_path_factory) -> dict:
    cfg = _cfg("bench", cache, "bench.num_tasks=12", f"bench.k={K}", "bench.ood_unseen=2")
    return harness.execute("bench", cfg, tmp_path_factory.mktemp("bench-out")).data


@pytest.mark.slow
def test_bench_reports_every_row_and_tina_beats_chance(report):
    for row in bench.ROWS:
        for key in ("id_acc", "ood_acc", "id_std", "ood_std", "personalize_s", "generated_params"):
            assert key in report[row], (row, key)
        assert 0.0 <= report[row]["id_acc"] <= 1.0
    chance = 1.0 / K
    # zero-shot generation from class names alone, on ID tasks that are not zoo tasks
    assert report["tina"]["id_acc"] > chance + 0.2, report["tina"]
    assert report["tina"]["ood_acc"] > chance + 0.15, report["tina"]
    assert report["tina"]["generated_params"] == K * (4 * 8 + 1)  # k rows of 32-d features (width 8) + a bias
    assert report["oracle"]["id_acc"] >= report["scratch"]["id_acc"] - 0.05


@pytest.mark.slow
def test_bench_shots_axis_has_every_row_at_every_n(report, tmp_path):
    from fedtina.tina.shots import SHOT_ROWS

    shots = report["shots"]
    assert list(shots) == ["0", "1", "2", "5", "10", "all"]
    assert set(shots["0"]) == {"selection", "gidaris", "tina"} and "oracle" in shots["all"]
    for n in ("1", "2", "5", "10", "all"):
        assert set(SHOT_ROWS) <= set(shots[n]), n
        for row in SHOT_ROWS:
            r = shots[n][row]
            assert 0.0 <= r["id_acc"] <= 1.0 and 0.0 <= r["ood_acc"] <= 1.0 and r["personalize_s"] >= 0, (n, row)
    # the benchmark's own rows are the n=0 / all entries
    assert shots["0"]["tina"]["ood_acc"] == report["tina"]["ood_acc"]
    assert shots["all"]["oracle"]["id_acc"] == report["oracle"]["id_acc"]
    # image prompts carry information: with every zoo-part image, Tina is well above chance on OOD tasks
    assert shots["all"]["tina_img"]["ood_acc"] > 1.0 / K + 0.2, shots["all"]["tina_img"]


@pytest.mark.slow
def test_bench_reuses_the_cache_and_writes_bench_json(report, cache, tmp_path):
    # a second run reuses every cached stage and gets the same numbers
    out = tmp_path / "bench-again"
    cfg = _cfg("bench", cache, "bench.num_tasks=12", f"bench.k={K}", "bench.ood_unseen=2")
    again = harness.execute("bench", cfg, out).data
    assert json.loads((out / "bench.json").read_text())["tina"]["id_acc"] == again["tina"]["id_acc"]
    assert again["tina"]["id_acc"] == pytest.approx(report["tina"]["id_acc"])
    assert again["setup_s"] < report["setup_s"]


@pytest.mark.slow
def test_generate_cli_writes_a_loadable_classifier(report, cache, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    names = "red solid circle, blue striped square and green dotted triangle"
    rc = generate.main([f"text=a model for: {names}", f"out={out}", *TINY, f"cache_dir={cache}"])
    assert rc == 0 and out.exists()
    assert "load_classifier" in capsys.readouterr().out
    model = generate.load_classifier(out)
    assert model.class_names == ["red solid circle", "blue striped square", "green dotted triangle"]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert model(torch.from_numpy(images)).shape == (4, 3)
    assert set(model.predict(images)) <= set(model.class_names)


@pytest.mark.slow
def test_generate_cli_rejects_bad_label_sets(report, cache, tmp_path, capsys):
    out = tmp_path / "bad.safetensors"
    assert generate.main(["text=tractor, tractor", f"out={out}", *TINY, f"cache_dir={cache}"]) == 2
    assert "duplicate" in capsys.readouterr().err.lower()
    too_many = ", ".join(f"class {i}" for i in range(9))  # tina.max_classes=8
    assert generate.main([f"text={too_many}", f"out={out}", *TINY, f"cache_dir={cache}"]) == 2
    assert "8" in capsys.readouterr().err
    assert not out.exists()


def test_load_classifier_rejects_a_corrupted_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        generate.load_classifier(bad)
