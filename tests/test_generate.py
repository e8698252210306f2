"""`python -m fedtina.generate text=... out=...` on bad input: every check runs before the assets are built (build_assets is replaced
by a failure here), ends in one `error:` line and exit code 2; and the loaded classifier's input checks (dtype,
range, shape). Fast: a tiny untrained backbone, no assets. The happy path is in tests/test_end_to_end.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtina import generate
from fedtina.features.backbone import build_backbone
from fedtina.config import BackboneConfig
from fedtina.errors import FedtinaError, LabelSetError
from fedtina.generate import PersonalizedClassifier, as_images, check_label_set, check_out_path
from fedtina.zoo.heads import Head


@pytest.fixture
def no_build(monkeypatch):
    """Any check that lets a bad input through reaches build_assets, which fails the test at once."""
    monkeypatch.setattr(generate, "build_assets", lambda *a, **k: pytest.fail("build_assets ran on bad input"))


def _main(capsys, text: str, out, *overrides: str) -> tuple[int, list[str]]:
    rc = generate.main([f"text={text}", f"out={out}", *overrides])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


# ----------------------------------------------------------------------------------------------------------------
# the output path, checked first


def test_out_onto_a_directory(tmp_path, capsys, no_build):
    rc, err = _main(capsys, "maple tree, oak tree", tmp_path, f"cache_dir={tmp_path}")
    assert rc == 2 and len(err) == 1
    assert err[0] == (f"error: out={tmp_path} is a directory; give a file name, e.g. "
                      f"out={tmp_path}/model.safetensors")


def test_out_below_a_file(tmp_path, capsys, no_build):
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "sub" / "model.safetensors"
    rc, err = _main(capsys, "maple tree, oak tree", out, f"cache_dir={tmp_path}")
    assert rc == 2 and len(err) == 1 and f"{tmp_path / 'notes.txt'} is a file, not a directory" in err[0]
    assert (tmp_path / "notes.txt").read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc: a directory nobody can write")
def test_out_where_nothing_can_be_written(tmp_path, capsys, no_build):
    rc, err = _main(capsys, "maple tree, oak tree", "/proc/model.safetensors", f"cache_dir={tmp_path}")
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: out=/proc/model.safetensors: cannot write in /proc")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_in_a_read_only_directory(tmp_path, capsys, no_build):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, err = _main(capsys, "maple tree, oak tree", ro / "m.safetensors", f"cache_dir={tmp_path}")
    finally:
        ro.chmod(0o755)
    assert rc == 2 and len(err) == 1 and "cannot write in" in err[0]


def test_out_path_that_can_be_created_passes_and_creates_nothing(tmp_path):
    out = tmp_path / "new" / "deeper" / "model.safetensors"
    check_out_path(out)
    check_out_path(tmp_path / "model.safetensors")
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # the probe file is gone too


# ----------------------------------------------------------------------------------------------------------------
# the label set and the config, before the assets


def test_one_class_is_not_a_classifier(tmp_path, capsys, no_build):
    out = tmp_path / "m.safetensors"
    rc, err = _main(capsys, "a one-class classifier", out, f"cache_dir={tmp_path}")
    assert rc == 2 and len(err) == 1
    assert "a classifier needs at least 2 classes; the description names 1 ('a one-class classifier')" in err[0]
    assert not out.exists()
    with pytest.raises(LabelSetError, match="names 0"):
        check_label_set([], 20)


def test_duplicates_and_too_many_classes_fail_before_the_assets(tmp_path, capsys, no_build):
    out = str(tmp_path / "m.safetensors")
    rc, err = _main(capsys, "tractor, tractor", out, f"cache_dir={tmp_path}")
    assert rc == 2 and "duplicated class names ['tractor']" in err[0]
    small = ["tina.max_classes=8", "zoo.k_min=5", "zoo.k_max=5", f"cache_dir={tmp_path}"]
    rc, err = _main(capsys, ", ".join(f"class {i}" for i in range(9)), out, *small)
    assert rc == 2 and "9 classes, more than tina.max_classes=8" in err[0]
    check_label_set(["a", "b"], 2)


@pytest.mark.parametrize("override, match", [
    ("tina.d_model=130", "tina.d_model=130 is not divisible"),
    ("zoo.num_tasks=abc", "zoo.num_tasks='abc' is invalid"),
    ("seed=1.5", "seed=1.5 is invalid: must be an integer"),
    ("dataset=folder", "dataset=folder needs dataset.path"),
    ("clients=3", "Could not override 'clients'"),          # Hydra's own error, in one line
])
def test_bad_config_is_one_line(tmp_path, capsys, no_build, override, match):
    rc, err = _main(capsys, "maple tree, oak tree", tmp_path / "m.safetensors", override,
                    f"cache_dir={tmp_path}")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_cli_onto_a_directory_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedtina.generate", "text=maple tree, oak tree", f"out={tmp_path}",
                           f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: out={tmp_path} is a directory; give a file name, e.g. "
                                                f"out={tmp_path}/model.safetensors"]
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------------------------------
# the loaded classifier's input


@pytest.fixture(scope="module")
def model() -> PersonalizedClassifier:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(width=4), num_classes=3).eval()
    backbone.set_normalization(np.array([120.0, 110.0, 100.0]), np.array([60.0, 55.0, 50.0]))
    weight = np.random.default_rng(0).normal(size=(3, backbone.feature_dim)).astype(np.float32)
    return PersonalizedClassifier(backbone, Head(("a", "b", "c"), weight, np.zeros(3, np.float32))).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


def test_float_images_in_0_1_predict_as_their_uint8_version(model, images, one_thread):
    with torch.no_grad():
        ref = model(images)
        as_float = model(images.astype(np.float32) / 255.0)
        as_chw = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)  # torchvision's layout
    torch.testing.assert_close(as_float, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(as_chw, ref, rtol=1e-4, atol=1e-4)
    assert model.predict(images.astype(np.float64) / 255.0) == model.predict(images)


def test_a_single_image_gets_a_batch_axis(model, images, one_thread):
    assert model.predict(images[0]) == model.predict(images[:1])
    assert model(torch.from_numpy(images[0])).shape == (1, 3)


@pytest.mark.parametrize("bad, match", [
    (lambda im: im.astype(np.float32), r"float images must be in \[0, 1\], got values in \[0, 255\]"),
    (lambda im: np.full(im.shape, np.nan, np.float32), r"float images must be in \[0, 1\], got values in \[nan"),
    (lambda im: im.astype(np.int64), r"images of dtype torch.int64: expected uint8 0..255 or float in \[0, 1\]"),
    (lambda im: im[..., 0], r"images of shape \[4, 32, 32\]: expected uint8"),
    (lambda im: im[:, :28, :28], r"images of shape \[4, 28, 28, 3\]: expected .*\[N, 32, 32, 3\]"),
    (lambda im: im[None], r"images of shape \[1, 4, 32, 32, 3\]"),
    (lambda im: ["not", "images"], r"images must be an array of uint8"),
])
def test_other_input_is_one_clear_error(model, images, bad, match):
    with pytest.raises(FedtinaError, match=match):
        model.predict(bad(images))
    with pytest.raises(FedtinaError, match=match):
        as_images(bad(images))


def test_as_images_keeps_uint8_as_is(images):
    x = as_images(images)
    assert x.dtype == torch.uint8 and x.shape == (4, 32, 32, 3)
    assert as_images(images[:0]).shape == (0, 32, 32, 3)  # an empty batch is not an error


# ----------------------------------------------------------------------------------------------------------------
# the command line: key=value, with `text` and `out` taken literally


def test_text_and_out_are_taken_literally(tmp_path):
    text = "a model for: o'hare, back\\slash and \"quoted\", x\\"
    cfg = generate._compose([f"text={text}", f"out={tmp_path}/my model, v1.safetensors", "seed=3"])
    assert cfg["text"] == text and cfg["out"] == f"{tmp_path}/my model, v1.safetensors" and cfg["seed"] == 3
    assert generate._compose(["text='x, y'"])["text"] == "x, y"     # already quoted for Hydra: as written
    assert generate.literal("dataset=shapes") == "dataset=shapes"   # any other override as written


def test_missing_text_is_one_line(tmp_path, capsys, no_build):
    rc = generate.main([f"out={tmp_path / 'm.safetensors'}", f"cache_dir={tmp_path}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err == ['error: text= is missing: describe the classes, e.g. text="maple tree, oak tree, '
                               'tractor"']
