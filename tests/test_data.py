"""Datasets: the embedded shapes dataset, class-folder reading (folder, zip, names file), CIFAR-100's offline error."""

from __future__ import annotations

import logging
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedtina import net
from fedtina.config import DatasetConfig, ProtocolConfig
from fedtina.data import CALTECH101_ZIP, ImageDataset, clean_class_name, load_dataset
from fedtina.data import cifar, folder, shapes
from fedtina.data.folder import load_class_folder, write_dataset_npz
from fedtina.errors import DatasetUnavailableError, FedtinaError
from fedtina.io import cache_lock
from fedtina.data.split import make_split

# ----------------------------------------------------------------------------------------------------------------
# shapes


@pytest.fixture(scope="module")
def small_shapes() -> ImageDataset:
    return shapes.make_shapes(images_per_class=6, seed=0)


def test_shapes_is_deterministic_in_its_seed(small_shapes):
    again = shapes.make_shapes(images_per_class=6, seed=0)
    other = shapes.make_shapes(images_per_class=6, seed=1)
    assert again.images.tobytes() == small_shapes.images.tobytes()
    assert np.array_equal(again.labels, small_shapes.labels)
    assert other.class_names == small_shapes.class_names          # the class list does not depend on the seed
    assert (other.images != small_shapes.images).mean() > 0.5


def test_shapes_arrays_and_classes(small_shapes):
    ds = small_shapes
    assert ds.name == "shapes"
    assert ds.images.dtype == np.uint8 and ds.images.shape == (ds.num_classes * 6, 32, 32, 3)
    assert ds.labels.dtype == np.int64 and np.array_equal(np.bincount(ds.labels), np.full(ds.num_classes, 6))
    assert 60 <= ds.num_classes <= 120
    assert len(set(ds.class_names)) == ds.num_classes
    vocab = (set(shapes.COLOURS), set(shapes.TEXTURES), set(shapes.SHAPES))
    for name in ds.class_names:
        words = name.split(" ")
        assert len(words) == 3 and all(w in v for w, v in zip(words, vocab)), name
    counts = Counter(w for n in ds.class_names for w in n.split())
    assert set(counts) == set().union(*vocab)
    assert min(counts.values()) >= 6                                 # every word appears in many classes
    # images are not blank or constant: a real picture per image
    assert ds.images.reshape(len(ds.images), -1).std(axis=1).min() > 10


def test_shapes_colour_words_match_pixels(small_shapes):
    """Images of 'red ...' classes are redder than those of 'blue ...' classes, where the object sits (centre)."""
    ds = small_shapes
    centre = ds.images[:, 12:20, 12:20].astype(np.float64).mean(axis=(1, 2))      # [N, 3]
    word = np.array([ds.class_names[label].split()[0] for label in ds.labels])
    red_minus_blue = centre[:, 0] - centre[:, 2]
    assert red_minus_blue[word == "red"].mean() > red_minus_blue[word == "blue"].mean() + 40
    assert centre[word == "green", 1].mean() > centre[word == "purple", 1].mean() + 15
    assert centre[word == "white"].min(axis=1).mean() > centre[word == "blue"].min(axis=1).mean() + 20


def test_unseen_classes_are_new_combinations_of_seen_words(small_shapes):
    split = make_split(small_shapes, ProtocolConfig())
    seen_words = {w for c in split.seen for w in small_shapes.class_names[c].split()}
    for c in split.unseen:
        assert set(small_shapes.class_names[c].split()) <= seen_words, small_shapes.class_names[c]


def test_load_shapes_builds_once_then_reads_the_cache(tmp_path, monkeypatch):
    cfg = DatasetConfig(name="shapes", images_per_class=2, seed=5)
    first = shapes.load_shapes(cfg, tmp_path)
    files = sorted((tmp_path / "datasets").iterdir())
    assert [f.suffix for f in files] == [".lock", ".npz"] and f"v{shapes.SHAPES_VERSION}" in files[1].name
    assert files[0].name == f".{files[1].name}.lock"   # the build ran under the cache lock

    def no_build(*args, **kwargs):
        raise AssertionError("make_shapes called although the cache exists")

    monkeypatch.setattr(shapes, "make_shapes", no_build)
    second = load_dataset(cfg, tmp_path)
    assert second.name == "shapes" and second.class_names == first.class_names
    assert np.array_equal(second.images, first.images) and np.array_equal(second.labels, first.labels)
    with pytest.raises(AssertionError, match="make_shapes called"):   # another seed is another cache file
        shapes.load_shapes(DatasetConfig(images_per_class=2, seed=6), tmp_path)


def test_corrupt_shapes_cache_is_rebuilt(tmp_path):
    cfg = DatasetConfig(images_per_class=1, seed=0)
    path = shapes.shapes_cache_path(1, 0, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip")
    ds = shapes.load_shapes(cfg, tmp_path)
    assert ds.images.tobytes() == shapes.make_shapes(1, 0).images.tobytes()
    assert np.load(path)["images"].shape == ds.images.shape                 # the cache was rewritten
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]     # no temporary file left behind


def test_a_build_waiting_on_the_lock_reads_what_the_holder_wrote(tmp_path, monkeypatch):
    """Two processes building one dataset: the second waits for the first and reads its file."""
    cfg = DatasetConfig(images_per_class=1, seed=0)
    path = shapes.shapes_cache_path(1, 0, tmp_path)
    built, calls, result = shapes.make_shapes(1, 0), [], []
    monkeypatch.setattr(shapes, "make_shapes", lambda *a: calls.append(a) or built)
    with cache_lock(path):
        thread = threading.Thread(target=lambda: result.append(shapes.load_shapes(cfg, tmp_path)))
        thread.start()
        thread.join(1.0)
        assert thread.is_alive() and not result    # waiting for the lock
        write_dataset_npz(built, path)
    thread.join(30)
    assert calls == [] and result[0].images.tobytes() == built.images.tobytes()


def test_load_dataset_rejects_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(FedtinaError, match=r"^dataset.name='imagenet' is invalid; valid: \['shapes', 'caltech101', "
                                           r"'cifar100', 'folder'\]$"):
        load_dataset(DatasetConfig(name="imagenet"), tmp_path)
    with pytest.raises(FedtinaError, match="dataset.path"):
        load_dataset(DatasetConfig(name="folder"), tmp_path)
    with pytest.raises(DatasetUnavailableError, match="nowhere"):
        load_dataset(DatasetConfig(name="caltech101", path=str(tmp_path / "nowhere.zip")), tmp_path)


def test_a_dataset_is_one_registered_module(tmp_path, monkeypatch):
    """A module that registers a name, an options dataclass and a loader is loadable by name, built from a config
    section by its name (its own fields and defaults), and named in the error for an unknown one."""
    from dataclasses import dataclass

    from fedtina.config import CoreConfig, from_dict
    from fedtina.data import registry

    @dataclass
    class TinyConfig(DatasetConfig):
        name: str = "tiny"
        colours: int = 3

    def load(cfg, cache_dir):
        return ImageDataset("tiny", np.zeros((cfg.colours, 32, 32, 3), np.uint8), np.arange(cfg.colours),
                            [f"c{i}" for i in range(cfg.colours)])

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    registry.register(registry.Dataset("tiny", TinyConfig, load))
    core = from_dict(CoreConfig, {"dataset": {"name": "tiny", "colours": 4}})
    assert core.dataset == TinyConfig(colours=4) and load_dataset(core.dataset, tmp_path).num_classes == 4
    with pytest.raises(FedtinaError, match=r"^unknown dataset option\(s\) \['colours'\]"):
        from_dict(CoreConfig, {"dataset": {"name": "shapes", "colours": 4}})
    with pytest.raises(FedtinaError, match=r"^dataset.name='mnist' is invalid; valid: \[.*'tiny'\]$"):
        from_dict(CoreConfig, {"dataset": {"name": "mnist"}})
    with pytest.raises(FedtinaError, match="registered twice"):
        registry.register(registry.Dataset("tiny", TinyConfig, load))


# ----------------------------------------------------------------------------------------------------------------
# class folders


def _png(path: Path, rgb: tuple[int, int, int], size=(32, 32), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, rgb)
    (img.convert("L") if mode == "L" else img).save(path)


@pytest.fixture
def tree(tmp_path) -> Path:
    """cougar_body: 2 red PNGs in nested folders; Faces_easy: a grey greyscale PNG of another size and a green JPEG;
    n02_dog: a blue PNG (named by the names file); an empty folder; a few files that are no images."""
    root = tmp_path / "my_data"
    _png(root / "cougar_body" / "a" / "b" / "x.png", (250, 0, 0))
    _png(root / "cougar_body" / "y.PNG", (250, 0, 0), size=(64, 48))
    _png(root / "Faces_easy" / "grey.png", (128, 128, 128), size=(40, 20), mode="L")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(root / "Faces_easy" / "green.JPG")
    _png(root / "n02_dog" / "dog.png", (0, 0, 250))
    (root / "empty_class").mkdir()
    (root / "n02_dog" / "notes.txt").write_text("not an image")
    (root / "loose.png").write_bytes((root / "n02_dog" / "dog.png").read_bytes())   # belongs to no class
    (root / ".hidden").mkdir()
    _png(root / ".hidden" / "z.png", (1, 2, 3))
    return root


def _zip(root: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, prefix + p.relative_to(root).as_posix())
    return dest


def _check_tree(ds: ImageDataset, dog_name: str = "n02 dog") -> None:
    assert ds.class_names == ["faces easy", "cougar body", dog_name]     # sorted ids: Faces_easy, cougar_body, n02_dog
    assert ds.images.shape == (5, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]
    faces = ds.images[ds.labels == 0]                                    # sorted paths: green.JPG, grey.png
    assert np.abs(faces[0].astype(int) - [0, 200, 0]).max() < 8         # JPEG is lossy
    assert np.all(faces[1] == 128)                                       # greyscale -> equal RGB channels
    assert np.all(ds.images[ds.labels == 1] == [250, 0, 0])             # resized from 64x48 too
    assert np.all(ds.images[ds.labels == 2] == [0, 0, 250])


def test_folder_reads_a_directory(tree, caplog):
    with caplog.at_level(logging.WARNING):
        ds = load_class_folder(tree)
    _check_tree(ds)
    assert ds.name == "my_data"
    assert "empty_class" in caplog.text


def test_folder_reads_a_zip_with_a_wrapper_folder_and_a_names_file(tree, tmp_path):
    names = tmp_path / "names.tsv"
    names.write_text("# id\tname\nn02_dog\tgolden retriever\n\nunused_id\tsomething\n")
    plain = _zip(tree, tmp_path / "plain.zip")
    wrapped = _zip(tree, tmp_path / "wrapped.zip", prefix="101_Objects/")
    from_dir = load_class_folder(tree, names_file=names)
    _check_tree(from_dir, dog_name="golden retriever")
    for path in (plain, wrapped):
        ds = load_class_folder(path, names_file=names)
        _check_tree(ds, dog_name="golden retriever")
        assert np.array_equal(ds.images, from_dir.images)
    assert load_class_folder(wrapped).name == "wrapped"
    assert load_class_folder(wrapped, name="mine").name == "mine"


def test_folder_cache_is_reused_and_keyed_by_the_names_file(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    names = tmp_path / "names.tsv"
    names.write_text("n02_dog\tdog\n")
    first = load_class_folder(tree, names_file=names, cache_dir=cache)
    assert len(list((cache / "datasets").glob("folder-*.npz"))) == 1

    def no_decode(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder, "decode_image", no_decode)
    again = load_class_folder(tree, names_file=names, cache_dir=cache)
    assert again.class_names == first.class_names and np.array_equal(again.images, first.images)
    names.write_text("n02_dog\tpuppy\n")                              # another names file: another cache entry
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_class_folder(tree, names_file=names, cache_dir=cache)


def test_folder_errors_name_the_problem(tree, tmp_path):
    with pytest.raises(DatasetUnavailableError, match="missing_dir"):
        load_class_folder(tmp_path / "missing_dir")
    bad = tmp_path / "bad_names.tsv"
    bad.write_text("n02_dog\tdog\ncougar_body cougar\n")
    with pytest.raises(FedtinaError, match=r"bad_names.tsv line 2"):
        load_class_folder(tree, names_file=bad)
    clash = tmp_path / "clash.tsv"
    clash.write_text("n02_dog\tcougar body\n")
    with pytest.raises(FedtinaError, match="'cougar_body' and 'n02_dog'.*'cougar body'"):
        load_class_folder(tree, names_file=clash)
    with pytest.raises(FedtinaError, match="names file .*absent.tsv does not exist"):
        load_class_folder(tree, names_file=tmp_path / "absent.tsv")
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(FedtinaError, match="found 0 class folder"):
        load_class_folder(empty)
    one = tmp_path / "one"
    _png(one / "only" / "x.png", (1, 1, 1))
    with pytest.raises(FedtinaError, match="found 1 class folder"):
        load_class_folder(one)
    broken = tmp_path / "broken"
    _png(broken / "a" / "x.png", (1, 1, 1))
    (broken / "b").mkdir()
    (broken / "b" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(FedtinaError, match=r"cannot decode image .*b/x.jpg"):
        load_class_folder(broken)
    not_zip = tmp_path / "fake.zip"
    not_zip.write_bytes(b"nope")
    with pytest.raises(FedtinaError, match="fake.zip is not a readable zip"):
        load_class_folder(not_zip)


def test_folder_names_that_clean_to_the_same_text_are_an_error(tmp_path):
    _png(tmp_path / "d" / "sea_horse" / "x.png", (1, 1, 1))
    _png(tmp_path / "d" / "sea-horse" / "x.png", (1, 1, 1))
    assert clean_class_name("sea-horse") == clean_class_name("sea_horse") == "sea horse"
    with pytest.raises(FedtinaError, match="'sea-horse' and 'sea_horse'"):
        load_class_folder(tmp_path / "d")


@pytest.mark.skipif(not CALTECH101_ZIP.exists(), reason=f"{CALTECH101_ZIP} absent")
def test_caltech101_zip(tmp_path, monkeypatch):
    ds = load_dataset(DatasetConfig(name="caltech101"), tmp_path)
    assert ds.name == "caltech101"
    assert ds.num_classes == 101 and len(ds.images) == 8677
    assert {"cougar body", "faces easy", "soccer ball"} <= set(ds.class_names)
    assert np.bincount(ds.labels).min() >= 31

    def reread(*a, **k):
        raise AssertionError("the zip was decoded again instead of read from the cache")

    monkeypatch.setattr("fedtina.data.folder._read_classes", reread)
    again = load_dataset(DatasetConfig(name="caltech101"), tmp_path)
    assert np.array_equal(again.images, ds.images) and again.class_names == ds.class_names


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-100


def test_cifar_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(net, "can_reach", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match=r"cifar-100-python\.tar\.gz.*dataset=shapes"):
        cifar.load_cifar100(str(tmp_path / "cifar"), download=True, cache_dir=tmp_path)
    assert time.perf_counter() - start < 5


def test_cifar_download_off_never_probes_the_network(tmp_path, monkeypatch):
    def probe(*a, **k):
        raise AssertionError("probed the network although download=False")

    monkeypatch.setattr(net, "can_reach", probe)
    with pytest.raises(DatasetUnavailableError, match="download=false"):
        load_dataset(DatasetConfig(name="cifar100", path=str(tmp_path), download=False), tmp_path)


def test_cifar_offline_env_through_the_real_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTINA_OFFLINE", "1")
    net.can_reach.cache_clear()
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="cannot be reached"):
        load_dataset(DatasetConfig(name="cifar100"), tmp_path)
    assert time.perf_counter() - start < 5
    net.can_reach.cache_clear()


def test_cifar_uses_its_cache_without_the_original_files(tmp_path, monkeypatch):
    monkeypatch.setattr(net, "can_reach", lambda *a, **k: False)
    fake = ImageDataset("cifar100", np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 0, 1]), ["maple tree", "oak"])
    write_dataset_npz(fake, tmp_path / "datasets" / f"cifar100-v{cifar.CIFAR_VERSION}.npz")
    ds = cifar.load_cifar100(None, download=False, cache_dir=tmp_path)
    assert ds.name == "cifar100" and ds.class_names == ["maple tree", "oak"] and len(ds.images) == 4
