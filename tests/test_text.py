"""Text encoders: MiniLM offline, open_clip with random weights and its offline guard, template + embedding cache."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import numpy as np
import pytest

import fedtina.net
import fedtina.features.text as tx
from fedtina.config import EncoderConfig
from fedtina.errors import CorruptFileError, EncoderUnavailableError, FedtinaError


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of waiting on it."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def minilm():
    return tx.MiniLMEncoder(device="cpu")


def test_minilm_dim_norm_and_semantics(minilm, no_network):
    assert isinstance(minilm, tx.TextEncoder)
    v = minilm.encode(["maple tree", "oak tree", "tractor"])
    assert v.shape == (3, 384) and v.dtype == np.float32 and minilm.dim == 384
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.1, sim  # maple~oak (0.67) >> maple~tractor (0.37)
    # padding in a batch does not change a text's vector (mean pooling respects the attention mask)
    alone = minilm.encode(["tractor"])
    assert np.allclose(alone[0], v[2], atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


@pytest.fixture(scope="module")
def clip_random():
    return tx.OpenClipEncoder("ViT-B-32", pretrained=None, device="cpu")


def test_open_clip_random_weights_offline(clip_random, no_network, monkeypatch):
    monkeypatch.setattr(fedtina.net, "can_reach", lambda *a, **k: pytest.fail("random weights must not probe"))
    assert clip_random.id == "clip-ViT-B-32-random-seed0"
    assert clip_random.dim == 512
    v = clip_random.encode(["a photo of a maple tree.", "a photo of a tractor."])
    assert v.shape == (2, 512) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    im = clip_random.encode_images(images)
    assert im.shape == (3, 512) and np.allclose(np.linalg.norm(im, axis=1), 1.0, atol=1e-5)


def test_open_clip_random_weights_are_the_same_in_every_process(clip_random, no_network):
    """The id "clip-ViT-B-32-random-seed0" keys the embedding cache and Tina checkpoints: it must name one set of
    weights, whatever the process did with torch's RNG before."""
    import torch

    torch.manual_seed(1234)
    other = tx.OpenClipEncoder("ViT-B-32", pretrained=None, device="cpu")
    texts = ["a photo of a maple tree.", "a photo of a tractor."]
    assert other.id == clip_random.id and np.array_equal(other.encode(texts), clip_random.encode(texts))


def test_open_clip_tag_offline_fails_fast(monkeypatch):
    monkeypatch.setattr(fedtina.net, "can_reach", lambda *a, **k: False)
    t0 = time.perf_counter()
    with pytest.raises(EncoderUnavailableError, match="encoder=minilm") as info:
        tx.OpenClipEncoder("ViT-B-32", pretrained="openai")
    assert time.perf_counter() - t0 < 2.0
    assert "encoder.pretrained=" in str(info.value) and "no network" in str(info.value)
    with pytest.raises(EncoderUnavailableError):  # through the config as well
        tx.make_encoder(EncoderConfig(name="clip", pretrained="laion2b_s34b_b79k"))


def test_open_clip_checkpoint_paths(tmp_path, no_network):
    with pytest.raises(EncoderUnavailableError, match="does not exist"):
        tx.OpenClipEncoder(pretrained=str(tmp_path / "missing.bin"))
    bad = tmp_path / "open_clip_pytorch_model.bin"
    bad.write_bytes(b"not a checkpoint")
    enc = tx.OpenClipEncoder(pretrained=str(bad), device="cpu")
    assert enc.id == f"clip-ViT-B-32-{hashlib.sha256(b'not a checkpoint').hexdigest()[:10]}"
    with pytest.raises(CorruptFileError, match="open_clip_pytorch_model.bin"):
        enc.encode(["x"])


class CountingEncoder:
    """A fake TextEncoder: deterministic unit vectors from a hash of the text; records what it was asked."""

    dim = 8

    def __init__(self, id: str = "fake") -> None:
        self.id = id
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
        v = np.stack([np.random.default_rng(s).normal(size=self.dim) for s in seeds]).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_cached_encoder_memory_and_disk(tmp_path):
    fake = CountingEncoder()
    enc = tx.CachedTextEncoder(fake, "a photo of a {}.", cache_dir=tmp_path)
    v = enc.embed_names(["maple tree", "tractor", "maple tree"])
    assert fake.calls == [["a photo of a maple tree.", "a photo of a tractor."]]  # template applied, deduplicated
    assert v.shape == (3, 8) and np.array_equal(v[0], v[2])
    assert np.array_equal(v[1], fake.encode(["a photo of a tractor."])[0])
    fake.calls.clear()
    enc.embed_names(["tractor"])
    assert fake.calls == []  # memory hit
    assert enc.dim == 8 and enc.id.startswith("fake-")
    assert len(list((tmp_path / "text").glob("fake-*.npz"))) == 1

    fresh = CountingEncoder()
    again = tx.CachedTextEncoder(fresh, "a photo of a {}.", cache_dir=tmp_path)
    assert np.array_equal(again.embed_names(["maple tree", "tractor", "maple tree"]), v)
    assert fresh.calls == []  # disk hit: a new instance never calls the encoder
    again.embed_names(["oak tree", "tractor"])
    assert fresh.calls == [["a photo of a oak tree."]]  # only the new name
    third = CountingEncoder()
    tx.CachedTextEncoder(third, "a photo of a {}.", cache_dir=tmp_path).embed_names(["oak tree", "maple tree"])
    assert third.calls == []  # the rewritten file holds the merged names

    other = tx.CachedTextEncoder(CountingEncoder(), "a drawing of a {}.", cache_dir=tmp_path)
    assert other.id != enc.id
    other.embed_names(["tractor"])
    assert other.encoder.calls == [["a drawing of a tractor."]]  # another template is another cache
    assert enc.embed_names([]).shape == (0, 8)


def test_cached_encoder_ignores_unreadable_cache(tmp_path):
    enc = tx.CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    enc.embed_names(["tractor"])
    enc.path.write_bytes(b"garbage")
    fake = CountingEncoder()
    with pytest.warns(UserWarning, match="unreadable"):
        again = tx.CachedTextEncoder(fake, cache_dir=tmp_path)
    again.embed_names(["tractor"])
    assert fake.calls == [["a photo of a tractor."]]


def test_concurrent_cache_writers_keep_each_others_names(tmp_path, monkeypatch):
    """Writer b reads the cache file while writer a is between its own read and write: without the cache lock, a's
    write would drop b's name."""
    a = tx.CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    b = tx.CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    real, in_write, resume = tx._save_npz_atomic, threading.Event(), threading.Event()

    def paused_for_a(path, **arrays):
        if threading.current_thread() is writer_a:
            in_write.set()
            resume.wait(10)
        real(path, **arrays)

    monkeypatch.setattr(tx, "_save_npz_atomic", paused_for_a)
    writer_a = threading.Thread(target=a.embed_names, args=(["maple tree"],))
    writer_b = threading.Thread(target=b.embed_names, args=(["tractor"],))
    writer_a.start()
    assert in_write.wait(10)
    writer_b.start()
    writer_b.join(0.5)
    resume.set()
    writer_a.join(10)
    writer_b.join(10)
    third = tx.CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    third.embed_names(["maple tree", "tractor"])
    assert third.encoder.calls == []


@pytest.mark.parametrize("template", ["a photo of a", "a {0} photo", "{} and {}"])
def test_bad_template(template):
    with pytest.raises(FedtinaError, match="template"):
        tx.CachedTextEncoder(CountingEncoder(), template)


def test_make_encoder(tmp_path, no_network):
    with pytest.raises(FedtinaError, match="minilm"):
        tx.make_encoder(EncoderConfig(name="bert"))
    enc = tx.make_encoder(EncoderConfig(name="minilm"), tmp_path)
    assert isinstance(enc, tx.CachedTextEncoder) and enc.dim == 384 and enc.id.startswith("minilm-l6-v2-")
    assert enc.encoder._model is None  # lazy: nothing loaded until the first encode
    assert tx.make_encoder(EncoderConfig(name="clip"), None).encoder.id == "clip-ViT-B-32-random-seed0"


def test_the_cache_stores_texts_compactly_and_refuses_overlong_ones(tmp_path):
    """A numpy string array is as wide as its longest text: one 200,000-character name grew a 134 KB cache to 67 MB.
    Texts are stored as a UTF-8 blob; a text past the limit never reaches the encoder or the cache."""
    short = [f"class {i}" for i in range(100)]
    enc = tx.CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    enc.embed_names(short)
    small = enc.path.stat().st_size
    enc.embed_names(["x" * 10_000])                       # the longest text allowed
    assert enc.path.stat().st_size < small + 12_000       # fixed width: 101 x 10,000 x 4 bytes = 4 MB
    fake = CountingEncoder()
    again = tx.CachedTextEncoder(fake, cache_dir=tmp_path)
    assert np.array_equal(again.embed_names(short + ["x" * 10_000]), enc.embed_names(short + ["x" * 10_000]))
    assert fake.calls == []
    with pytest.raises(FedtinaError, match=r"^text 'yyyy.*'\.\.\. has 10,001 characters, more than "
                                           r"limits.max_description_chars=10,000 a class name or description may "
                                           r"have$"):
        again.embed_names(["ok", "y" * 10_001])
    assert fake.calls == [] and len(tx.CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)._memory) == 101


def test_a_cache_in_the_old_string_array_format_is_read_then_rewritten(tmp_path):
    enc = tx.CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    vectors = CountingEncoder().encode(["a photo of a oak.", "a photo of a élan."])
    np.savez(enc.path.parent.mkdir(parents=True) or enc.path, names=np.array(["oak", "élan"]), vectors=vectors)
    fake = CountingEncoder()
    old = tx.CachedTextEncoder(fake, cache_dir=tmp_path)
    assert np.array_equal(old.embed_names(["oak", "élan"]), vectors) and fake.calls == []
    old.embed_names(["pine"])                              # rewritten in the compact format, old names kept
    with np.load(old.path) as z:
        assert "names" not in z.files and tx.unpack_texts(z) == ["oak", "pine", "élan"]


def test_a_full_disk_while_caching_is_one_error_line_and_the_cache_stays(tmp_path, monkeypatch):
    import errno
    import os

    enc = tx.CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    enc.embed_names(["oak"])
    before = enc.path.read_bytes()

    def full(f, **arrays):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(FedtinaError, match=rf"^cannot write {enc.path}: no space left on its device"):
        enc.embed_names(["pine"])
    assert enc.path.read_bytes() == before
    assert {p.name for p in enc.path.parent.iterdir()} == {enc.path.name, f".{enc.path.name}.lock"}
