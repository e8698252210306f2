"""Property-based tests (hypothesis) of every input a user or a client hands fedtina: client descriptions, label
sets, names files, descriptions files, class-folder archives and simulate configs. Each input either works or ends
in one FedtinaError line that names the problem: never another exception, a hang, or a changed cache."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from fedtina.errors import FedtinaError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = st.text(st.characters(codec="utf-8"), max_size=200)
# text that looks like what people type: names, separators, prefixes, bullets, odd whitespace
WORDS = st.sampled_from(["maple tree", "oak", "and", "&", ",", ";", ":", "\n", "-", "* ", "1.", "a model for:",
                         "classes:", "  ", "\t", ".", "'", '"', "to classify", "é", "猫", ""])
TYPED = st.lists(WORDS, max_size=25).map(" ".join)


def one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)
    return msg


# --------------------------------------------------------------------------------------------------------------------
# descriptions and label sets


@FUZZ
@given(st.one_of(TEXT, TYPED))
def test_parse_label_text_returns_clean_names_for_any_text(text):
    from fedtina.tina.generator import parse_label_text

    names = parse_label_text(text)
    for n in names:
        assert n and n == n.strip() and not set(",;\n") & set(n), (text, names)


@FUZZ
@given(st.one_of(TEXT, TYPED), st.integers(1, 20))
def test_a_described_label_set_is_accepted_or_refused_in_one_line(text, max_classes):
    from fedtina.generate import check_label_set
    from fedtina.tina.generator import parse_label_text

    names = parse_label_text(text)
    try:
        check_label_set(names, max_classes)
    except FedtinaError as e:
        one_line(e)
        return
    assert 2 <= len(names) <= max_classes and len(set(names)) == len(names)


ITEM = st.one_of(st.text(max_size=12), st.integers(), st.none(), st.floats(allow_nan=True))


@FUZZ
@given(st.one_of(st.lists(st.lists(ITEM, max_size=6), max_size=4), st.text(max_size=20),
                 st.lists(st.text(max_size=12), max_size=3)))
def test_generator_validates_any_label_sets(label_sets):
    from fedtina.tina.generator import TinaGenerator

    try:
        clean = TinaGenerator.validate(SimpleNamespace(max_classes=5), label_sets)
    except FedtinaError as e:
        one_line(e)
        return
    assert len(clean) == len(label_sets)
    for names in clean:
        assert 1 <= len(names) <= 5 and len(set(names)) == len(names) and all(isinstance(n, str) for n in names)


# --------------------------------------------------------------------------------------------------------------------
# names and descriptions files

LINES = st.lists(st.one_of(st.tuples(st.text(max_size=10), st.text(max_size=20)).map("\t".join), TEXT,
                           st.just("# a comment"), st.just("")), max_size=8).map("\n".join)
BYTES = st.one_of(LINES.map(lambda s: s.encode("utf-8")), st.binary(max_size=200))


@FUZZ
@given(BYTES)
@example(b"0\t\x1b")   # a name of control characters only: empty once cleaned, so a bad line
def test_names_file_reads_or_names_its_bad_line(tmp_path, data):
    from fedtina.data.folder import read_names_file

    path = tmp_path / "names.txt"
    path.write_bytes(data)
    try:
        names = read_names_file(path)
    except FedtinaError as e:
        assert str(path) in one_line(e)
        return
    assert all(k and v and k == k.strip() for k, v in names.items())


@FUZZ
@given(BYTES)
def test_descriptions_file_reads_or_names_its_bad_line(tmp_path, data):
    from fedtina.data.descriptions import load_descriptions

    path = tmp_path / "descriptions.txt"
    path.write_bytes(data)
    classes = ["red dot", "blue ring", "a", "b"]
    try:
        out = load_descriptions(str(path), classes)
    except FedtinaError as e:
        assert str(path) in one_line(e)
        return
    assert out and set(out) <= set(classes) and all(out.values())


# --------------------------------------------------------------------------------------------------------------------
# class-folder archives


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


MEMBER = st.tuples(st.lists(st.sampled_from(["cat", "dog", "Cat", ".hidden", "__MACOSX", "a b", "x_y", "é", "wrap"]),
                            min_size=0, max_size=3),
                   st.sampled_from(["1.png", "2.png", "3.jpg", "notes.txt", ".DS_Store", "4.PNG"]),
                   st.sampled_from(["png", "garbage", "empty"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(MEMBER, max_size=8), st.booleans())
@example([(["cat"], "1.png", "png"), (["dog"], "2.png", "png"), (["dog"], "notes.txt", "garbage")], False)
@example([(["cat"], "1.png", "png"), (["dog"], "2.png", "garbage")], False)
def test_class_folder_archive_loads_or_fails_in_one_line_without_touching_the_cache(tmp_path_factory, members,
                                                                                    not_a_zip):
    from fedtina.data.folder import load_class_folder

    root = tmp_path_factory.mktemp("fuzz")
    archive, cache = root / "data.zip", root / "cache"
    if not_a_zip:
        archive.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        with zipfile.ZipFile(archive, "w") as z:
            for i, (dirs, name, kind) in enumerate(members):
                body = {"png": _png(i), "garbage": b"\x00\x01garbage", "empty": b""}[kind]
                z.writestr("/".join([*dirs, name]), body)
    try:
        ds = load_class_folder(archive, cache_dir=cache)
    except FedtinaError as e:
        one_line(e)
        cached = sorted(p.name for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
        assert not [n for n in cached if n.endswith(".npz") or ".tmp" in n], cached
        return
    assert len(ds.class_names) >= 2 and ds.images.shape[1:] == (32, 32, 3) and len(ds.images) == len(ds.labels)
    again = load_class_folder(archive, cache_dir=cache)   # from the cache: the same dataset
    np.testing.assert_array_equal(again.images, ds.images)


# --------------------------------------------------------------------------------------------------------------------
# simulate configs

KEYS = ["clients", "rounds", "timeout_s", "fraction_train", "partition.k_min", "partition.k_max", "partition.alpha",
        "partition.scheme", "partition.new_share", "partition.labels_per_class", "head_ft.steps", "head_ft.lr",
        "checks.max_acc_drop", "faults.poison_kind", "faults.poison_clients", "faults.mislabel_share",
        "aggregation.name", "aggregation.num_malicious", "aggregation.beta", "privacy.upload_clip",
        "privacy.upload_noise", "privacy.delta", "method.names", "method.tina.prompt", "method.tina.refresh_every",
        "resources.num_gpus", "resources.num_cpus", "tina.max_classes", "loggers", "unknown_section.key"]
VALUE = st.one_of(st.integers(-5, 300), st.floats(-2, 2), st.sampled_from([float("nan"), float("inf")]), st.booleans(),
                  st.none(), st.text(max_size=12), st.sampled_from(["fedavg", "tina", "krum", "bulyan", "nan",
                                                                    "sign_flip", "images", "???"]),
                  st.lists(st.one_of(st.integers(-2, 5), st.sampled_from(["tina", "fedavg", "x"])), max_size=3))


@pytest.fixture(scope="module")
def base_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return OmegaConf.to_container(compose("simulate", overrides=["clients=20"]), resolve=True)


def _set(cfg: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for p in path:
        cfg = cfg.setdefault(p, {}) if isinstance(cfg.get(p, {}), dict) else {}
    cfg[last] = value


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUE), min_size=1, max_size=4))
@example([("aggregation.name", "krum"), ("aggregation.num_malicious", 2)])
@example([("aggregation.name", "bulyan"), ("aggregation.num_malicious", 4)])
def test_any_simulate_override_is_valid_or_one_line(base_config, changes):
    import copy

    from fedtina.validate import validate_simulate_config

    cfg = copy.deepcopy(base_config)
    for key, value in changes:
        _set(cfg, key, value)
    try:
        validate_simulate_config(cfg)
    except FedtinaError as e:
        one_line(e)
