"""ResNet-20 shapes, generic-model training on a tiny fake dataset, the feature-bank cache, checkpoint errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

import fedtina.features.backbone as bb
from fedtina.config import BackboneConfig, ProtocolConfig
from fedtina.data.base import ImageDataset
from fedtina.data.split import make_split
from fedtina.errors import CorruptFileError, FedtinaError, UnknownClassError

COLOURS = np.array([[230, 40, 40], [40, 200, 60], [40, 70, 230], [230, 220, 40], [200, 60, 220]], dtype=np.float64)


@dataclass
class FakeSplit:
    """Stands in for fedtina.data.split.ProtocolSplit (same fields, same `key` property)."""

    seen: np.ndarray
    unseen: np.ndarray
    backbone_idx: np.ndarray
    zoo_idx: np.ndarray
    test_idx: np.ndarray
    tag: str = "a"
    novel: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def key(self) -> str:
        return f"fake{self.tag}"

    @property
    def backbone_classes(self) -> np.ndarray:
        return self.seen[~np.isin(self.seen, self.novel)]


def squares_dataset(per_class: int = 40, seed: int = 0) -> ImageDataset:
    """5 classes: a square of one colour at a random place on a noisy grey background."""
    rng = np.random.default_rng(seed)
    n = len(COLOURS) * per_class
    labels = np.repeat(np.arange(len(COLOURS)), per_class)
    images = rng.normal(110, 25, (n, 32, 32, 3))
    for i, c in enumerate(labels):
        y, x, s = rng.integers(0, 18), rng.integers(0, 18), rng.integers(8, 14)
        images[i, y : y + s, x : x + s] = COLOURS[c] + rng.normal(0, 15, 3)
    names = ["red square", "green square", "blue square", "yellow square", "violet square"]
    return ImageDataset("squares", np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64), names)


def squares_split(ds: ImageDataset, seen=(3, 0, 1, 2), tag: str = "a") -> FakeSplit:
    """First half of each class -> backbone, next quarter -> zoo, rest -> test. Class 4 is unseen."""
    parts = {"bb": [], "zoo": [], "test": []}
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.labels == c)
        h, q = len(idx) // 2, len(idx) * 3 // 4
        parts["bb"] += list(idx[:h]); parts["zoo"] += list(idx[h:q]); parts["test"] += list(idx[q:])
    seen = np.array(seen)
    unseen = np.setdiff1d(np.arange(ds.num_classes), seen)
    return FakeSplit(seen, unseen, *(np.array(parts[k]) for k in ("bb", "zoo", "test")), tag=tag)


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = BackboneConfig(width=8, epochs=3, batch_size=16, lr=0.05, seed=0, device="cpu")


@pytest.fixture(scope="module")
def data():
    ds = squares_dataset()
    return ds, squares_split(ds)


@pytest.fixture(scope="module")
def trained(data):
    ds, split = data
    return bb.train_generic(ds, split, TINY, "cpu", log=lambda s: None)


def test_resnet20_shapes_and_size():
    model = bb.build_backbone(BackboneConfig(), num_classes=10).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert model.features(x).shape == (2, 64)
    assert model(x).shape == (2, 10)
    assert model.feature_dim == 64
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < n_params < 0.29e6  # ResNet-20 is ~0.27 M parameters
    assert bb.build_backbone(BackboneConfig(width=8), 3).features(x).shape == (2, 32)
    assert torch.equal(model.features(x.permute(0, 2, 3, 1)), model.features(x))  # NHWC uint8 works as well


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(FedtinaError, match="resnet20"):
        bb.build_backbone(BackboneConfig(arch="vgg7"), 10)


def test_augment_keeps_shape_and_pixels():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = bb.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    same = bb.augment(x, torch.Generator().manual_seed(1), pad=0)  # no padding: each image is itself or its mirror
    for a, b in zip(x, same):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)


def test_remap_labels_follows_seen_order():
    assert bb.remap_labels(np.array([3, 0, 4, 1]), np.array([3, 0, 1])).tolist() == [0, 1, -1, 2]


def test_training_set_is_backbone_part_of_seen_classes(data):
    ds, split = data  # split.backbone_idx also holds images of the unseen class 4: they must be dropped
    images, labels = bb._backbone_training_set(ds, split)
    expected = split.backbone_idx[np.isin(ds.labels[split.backbone_idx], split.seen)]
    assert len(images) == len(expected) == 80 and np.array_equal(images, ds.images[expected])
    assert np.array_equal(split.seen[labels], ds.labels[expected])


def test_training_beats_chance_on_held_out_images(data, trained):
    ds, split = data
    assert trained.fc.out_features == len(split.seen)  # unseen class 4 never enters training
    test = split.test_idx[np.isin(ds.labels[split.test_idx], split.seen)]
    feats = bb.extract_features(trained, ds.images[test], "cpu")
    pred = split.seen[(feats @ trained.fc.weight.detach().numpy().T + trained.fc.bias.detach().numpy()).argmax(1)]
    acc = (pred == ds.labels[test]).mean()
    assert acc > 0.6, f"held-out accuracy {acc:.2f} (chance 0.25)"
    stats = bb.channel_stats(ds.images[split.backbone_idx[np.isin(ds.labels[split.backbone_idx], split.seen)]])
    assert np.allclose(trained.pixel_mean.numpy(), stats[0]) and np.allclose(trained.pixel_std.numpy(), stats[1])


def test_precision_choice_and_fp32_features_agree(data, trained):
    ds, _ = data
    cpu = torch.device("cpu")
    assert bb.autocast_dtype(cpu, "fp32") is None and bb.autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(FedtinaError, match="fp32"):
        bb.autocast_dtype(cpu, "fp8")
    exact = bb.extract_features(trained, ds.images[:64], precision="fp32")
    fast = bb.extract_features(trained, ds.images[:64])  # bfloat16 where the CPU has it
    assert np.linalg.norm(fast - exact) < 0.02 * np.linalg.norm(exact)
    assert not trained.training


def test_training_is_deterministic(data, trained):
    ds, split = data
    again = bb.train_generic(ds, split, TINY, "cpu", log=lambda s: None)
    for (k, a), b in zip(trained.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_feature_bank_cached_and_reused(data, trained, tmp_path, monkeypatch):
    ds, split = data
    calls = []
    monkeypatch.setattr(bb, "train_generic", lambda *a, **k: calls.append(1) or trained)
    bank = bb.build_feature_bank(ds, split, TINY, tmp_path, log=lambda s: None)
    assert calls == [1]
    assert bank.features.shape == (len(ds.images), 32) and bank.features.dtype == np.float32
    assert bank.generic_weight.shape == (4, 32) and bank.generic_bias.shape == (4,)
    w, b = bank.generic_row(3)  # seen = (3, 0, 1, 2): class 3 is row 0
    assert np.array_equal(w, trained.fc.weight.detach().numpy()[0]) and b == pytest.approx(trained.fc.bias[0].item())
    with pytest.raises(UnknownClassError, match="4"):
        bank.generic_row(4)

    def no_training(*a, **k):
        raise AssertionError("cache miss: train_generic called again")

    monkeypatch.setattr(bb, "train_generic", no_training)
    again = bb.build_feature_bank(ds, split, TINY, tmp_path, log=lambda s: None)
    assert np.array_equal(again.features, bank.features) and np.array_equal(again.seen, split.seen)
    assert again.backbone_path == bank.backbone_path and again.meta["key"] == bank.meta["key"]
    # the saved backbone reproduces the cached features from raw uint8 images (normalisation travels with it)
    loaded = bb.load_backbone(bank.backbone_path, "cpu")
    assert np.allclose(bb.extract_features(loaded, ds.images[:50]), bank.features[:50], atol=1e-5)
    with pytest.raises(AssertionError, match="cache miss"):  # another seed is another entry
        bb.build_feature_bank(ds, split, replace(TINY, seed=1), tmp_path, log=lambda s: None)


def test_cache_key_covers_its_inputs(data):
    ds, split = data
    key = bb.feature_cache_key(ds, split, TINY)
    assert ds.fingerprint in key and split.key in key
    others = [replace(TINY, seed=1), replace(TINY, epochs=4), replace(TINY, width=16), replace(TINY, lr=0.1),
              replace(TINY, arch="resnet32")]
    keys = {bb.feature_cache_key(ds, split, c) for c in others}
    keys.add(bb.feature_cache_key(ds, replace(split, tag="b"), TINY))
    assert key not in keys and len(keys) == len(others) + 1
    assert bb.feature_cache_key(ds, split, replace(TINY, device="cuda")) == key  # where it ran is not what it is


def test_corrupt_or_missing_backbone_file(trained, tmp_path):
    path = tmp_path / "backbone.safetensors"
    with pytest.raises(CorruptFileError, match="backbone.safetensors"):
        bb.load_backbone(path)
    bb.save_backbone(trained, path, "resnet20", 8)
    assert bb.load_backbone(path).fc.out_features == 4
    tensors, meta = bb.backbone_tensors(path)  # embeddable elsewhere (fedtina.generate) and rebuilt from the parts
    rebuilt = bb.backbone_from_tensors(tensors, meta)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(CorruptFileError, match="spec"):
        bb.backbone_from_tensors({k: v for k, v in tensors.items() if k != "fc.bias"}, meta)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(CorruptFileError, match="backbone.safetensors"):
        bb.load_backbone(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptFileError, match="backbone.safetensors"):
        bb.load_backbone(path)


def test_damaged_feature_bank_is_re_extracted_from_its_backbone(data, trained, tmp_path, monkeypatch):
    """A truncated features.npz beside an intact backbone checkpoint: features again in seconds, no retraining."""
    ds, split = data
    monkeypatch.setattr(bb, "train_generic", lambda *a, **k: trained)
    bank = bb.build_feature_bank(ds, split, TINY, tmp_path, log=lambda s: None)
    npz = bank.backbone_path.parent / "features.npz"
    backbone = bank.backbone_path.read_bytes()

    def no_training(*a, **k):
        raise AssertionError("the backbone was retrained")

    monkeypatch.setattr(bb, "train_generic", no_training)
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"garbage"):
        npz.write_bytes(damage(npz.read_bytes()))
        logs = []
        again = bb.build_feature_bank(ds, split, TINY, tmp_path, log=logs.append)
        assert np.allclose(again.features, bank.features, atol=1e-5) and np.array_equal(again.seen, bank.seen)
        assert np.array_equal(again.generic_weight, bank.generic_weight)
        assert any(str(npz) in m and "re-extract" in m for m in logs), logs
        assert bank.backbone_path.read_bytes() == backbone
    assert np.array_equal(bb.build_feature_bank(ds, split, TINY, tmp_path, log=lambda s: None).features,
                          again.features)


def test_damaged_or_missing_backbone_beside_a_feature_bank_is_named(data, trained, tmp_path, monkeypatch):
    """The bank's backbone is what clients and generated classifiers run: damage is reported, never retrained over."""
    ds, split = data
    monkeypatch.setattr(bb, "train_generic", lambda *a, **k: trained)
    bank = bb.build_feature_bank(ds, split, TINY, tmp_path, log=lambda s: None)
    path, folder = bank.backbone_path, bank.backbone_path.parent
    data_ = bytearray(path.read_bytes())
    data_[-100] ^= 0xFF                       # a flipped bit in a tensor: still parses
    path.write_bytes(bytes(data_))
    with pytest.raises(CorruptFileError, match=f"{path}.*delete {folder}"):
        bb.build_feature_bank(ds, split, TINY, tmp_path, log=lambda s: None)
    path.unlink()
    with pytest.raises(CorruptFileError, match=f"{path}.*delete {folder}"):
        bb.build_feature_bank(ds, split, TINY, tmp_path, log=lambda s: None)


# --------------------------------------------------------------------------------------------------------------------
# novel classes (protocol.novel_share) and the cosine classifier (backbone.classifier)


def test_novel_classes_never_reach_the_generic_model(tmp_path, monkeypatch):
    """The real split of the squares: 4 seen classes, one of them novel. No image of it is in the training set (the
    images are noise, so every one is distinct), the generic head has no row for it."""
    ds = squares_dataset()
    split = make_split(ds, ProtocolConfig(novel_share=0.25))
    (novel,) = split.novel
    assert len(split.seen) == 4 and len(split.backbone_classes) == 3
    images, labels = bb._backbone_training_set(ds, split)
    novel_images = {im.tobytes() for im in ds.images[ds.labels == novel]}
    assert not novel_images & {im.tobytes() for im in images}
    assert len(images) == len(split.backbone_idx) and set(split.backbone_classes[labels]) <= set(split.seen) - {novel}
    trained_on = []
    real = bb.train_generic
    monkeypatch.setattr(bb, "train_generic", lambda ds_, sp, *a, **k: trained_on.append(sp) or real(ds_, sp, *a, **k))
    bank = bb.build_feature_bank(ds, split, replace(TINY, epochs=1), tmp_path, log=lambda s: None)
    assert len(trained_on) == 1 and bank.generic_weight.shape[0] == 3
    assert np.array_equal(bank.seen, split.backbone_classes) and novel not in bank.seen
    with pytest.raises(UnknownClassError, match=str(novel)):
        bank.generic_row(int(novel))


def test_cosine_logits_are_scale_times_cosine():
    torch.manual_seed(0)
    model = bb.build_backbone(BackboneConfig(width=8, classifier="cosine"), num_classes=3).eval()
    with torch.no_grad():
        model.fc.scale.fill_(7.5)
        x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
        raw = model.embed(model.normalize(x))
        w = model.fc.weight
        cos = (raw @ w.T) / (raw.norm(dim=1, keepdim=True) * w.norm(dim=1)[None])
        torch.testing.assert_close(model(x), 7.5 * cos)
        feats = model.features(x)
        torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
        rows, bias = model.head_rows()
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 7.5, rtol=1e-5)
        np.testing.assert_allclose(feats.numpy() @ rows.T + bias, model(x).numpy(), rtol=1e-4, atol=1e-5)
    assert model.classifier == "cosine" and bias.tolist() == [0.0] * 3
    assert bb.build_backbone(BackboneConfig(width=8), 3).classifier == "linear"
    with pytest.raises(FedtinaError, match="backbone.classifier='arc' is invalid"):
        bb.build_backbone(BackboneConfig(classifier="arc"), 3)


def test_cosine_feature_bank_puts_every_generic_row_on_one_scale(data, tmp_path):
    ds, split = data
    cosine = replace(TINY, classifier="cosine")
    bank = bb.build_feature_bank(ds, split, cosine, tmp_path, log=lambda s: None)
    model = bb.load_backbone(bank.backbone_path, "cpu", classifier="cosine")
    scale = float(model.fc.scale.detach())
    np.testing.assert_allclose(np.linalg.norm(bank.features, axis=1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(bank.generic_weight, axis=1), scale, rtol=1e-5)
    assert not bank.generic_bias.any() and scale != bb.COSINE_INIT_SCALE   # the scale learned
    x = torch.from_numpy(ds.images[:20])
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_allclose(bank.features[:20] @ bank.generic_weight.T, logits, atol=0.05 * scale)


def test_the_classifier_is_in_the_cache_key_and_linear_keys_stay(data):
    """The linear key is pinned to its value before `backbone.classifier` existed: cached backbones keep their key."""
    ds, split = data
    key = bb.feature_cache_key(ds, split, TINY)
    assert key == "squares-b4a2320c3842-resnet20-w8-e3-s0-fakea-532cb591"
    assert bb.feature_cache_key(ds, split, replace(TINY, classifier="cosine")) != key


def test_a_checkpoint_of_the_wrong_classifier_is_refused(data, trained, tmp_path):
    ds, split = data
    path = tmp_path / "backbone.safetensors"
    bb.save_backbone(trained, path, "resnet20", 8)
    assert bb.load_backbone(path, classifier="linear").classifier == "linear"
    with pytest.raises(FedtinaError, match="has a linear classifier but backbone.classifier=cosine"):
        bb.load_backbone(path, classifier="cosine")
    # a cosine config that finds a linear checkpoint in its cache folder (no features yet): refused, not mixed
    cosine = replace(TINY, classifier="cosine")
    folder = tmp_path / "cache" / "features" / bb.feature_cache_key(ds, split, cosine)
    folder.mkdir(parents=True)
    (folder / "backbone.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(FedtinaError, match="linear classifier but backbone.classifier=cosine"):
        bb.build_feature_bank(ds, split, cosine, tmp_path / "cache", log=lambda s: None)
    # a checkpoint written before the option has no classifier in its spec: it is linear
    tensors, meta = bb.backbone_tensors(path)
    legacy = json.loads(meta)
    del legacy["classifier"]
    assert bb.backbone_from_tensors(tensors, json.dumps(legacy)).classifier == "linear"
