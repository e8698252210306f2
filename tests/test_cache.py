"""The shared cache as `build_assets` builds it: keys cover what changes a product, products are immutable once built,
builds run under a file lock (two processes at once end with one intact cache), damage is reported against the cache
file to delete, and files get the normal mode. A tiny real pipeline (82 shape classes x 16 images, a 1-epoch narrow
ResNet-20, 40 zoo heads, a 1-block Tina of 20 steps) built once per module, ~10 s."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedtina.assets import build_assets, tina_key, zoo_key
from fedtina.config import (BackboneConfig, CoreConfig, DatasetConfig, EncoderConfig, HeadTrainConfig, TinaConfig,
                            ZooConfig)
from fedtina.errors import CorruptFileError
from fedtina.zoo.store import ZooStore

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cache: Path) -> CoreConfig:
    return CoreConfig(
        dataset=DatasetConfig(images_per_class=16),
        backbone=BackboneConfig(width=8, epochs=1, batch_size=64, device="cpu"),
        encoder=EncoderConfig(device="cpu"),
        zoo=ZooConfig(num_tasks=40, k_min=5, k_max=8, finetune=HeadTrainConfig(steps=20, select=True)),
        tina=TinaConfig(d_model=32, depth=1, num_heads=2, train_steps=20, batch_size=16, warmup_steps=5,
                        sample_steps=4, log_every=1000, device="cpu", cpu_threads=1),
        cache_dir=str(cache))


def quiet(_message: str) -> None:
    pass


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache dir, assets) of the tiny config, built once."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, build_assets(tiny(cache), log=quiet)


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built cache (to damage) and the paths of its products."""
    cache, assets = built
    shutil.copytree(cache, tmp_path / "cache")
    rel = lambda p: tmp_path / "cache" / Path(p).relative_to(cache)  # noqa: E731
    return SimpleNamespace(cache=tmp_path / "cache", zoo_dir=rel(assets.zoo_dir), tina_path=rel(assets.tina_path),
                           backbone=rel(assets.bank.backbone_path))


def damage_middle(path: Path, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = b"\xab" * min(n, len(data) - mid)
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------------------------
# keys


def test_zoo_key_covers_every_field_that_changes_the_zoo():
    ds, split = SimpleNamespace(name="shapes", fingerprint="abc123"), SimpleNamespace(key="split0")
    cfg = tiny(Path("/unused"))
    key = zoo_key(cfg, ds, split)
    assert key.startswith("shapes-abc123-resnet20-w8-e1-s0-split0-") and "-n40-k5_8s0-" in key
    changed = [replace(cfg, zoo=replace(cfg.zoo, num_tasks=41)), replace(cfg, zoo=replace(cfg.zoo, k_max=9)),
               replace(cfg, zoo=replace(cfg.zoo, seed=1)),
               replace(cfg, zoo=replace(cfg.zoo, finetune=replace(cfg.zoo.finetune, weight_decay=0.1))),
               replace(cfg, zoo=replace(cfg.zoo, finetune=replace(cfg.zoo.finetune, select=False))),
               *(replace(cfg, backbone=replace(cfg.backbone, **{f: v})) for f, v in
                 [("lr", 0.2), ("batch_size", 32), ("weight_decay", 0.0), ("precision", "fp32"), ("width", 16),
                  ("epochs", 2), ("seed", 1), ("arch", "resnet32")])]
    keys = {zoo_key(c, ds, split) for c in changed}
    assert key not in keys and len(keys) == len(changed)
    # where it runs and what comes after the zoo are not part of it
    assert zoo_key(replace(cfg, backbone=replace(cfg.backbone, device="cuda"),
                           tina=replace(cfg.tina, train_steps=5)), ds, split) == key


def test_tina_key_is_the_one_cached_tinas_were_saved_under():
    """Pinned: a default Tina of this checkpoint format cached then still loads (a new format must change it: the
    key before format 3 was ...-671ea944c5cf). Where it trains and how it logs are not part of the key; the other
    fields, the zoo's size and the image prompts' features are."""
    enc, cfg = SimpleNamespace(id="fake-encoder"), TinaConfig()
    assert tina_key(cfg, enc, 600) == "fake-encoder-n600-537516ffb57e"
    assert tina_key(replace(cfg, device="cuda", log_every=7, cpu_threads=1), enc, 600) == tina_key(cfg, enc, 600)
    keys = {tina_key(c, enc, 600) for c in (cfg, replace(cfg, lr=2e-3), replace(cfg, depth=2))} | \
        {tina_key(cfg, enc, 601), tina_key(cfg, enc, 600, image_prompts="clip")}
    assert len(keys) == 5


def test_another_num_tasks_is_another_zoo(built, copy):
    """`zoo.num_tasks=41` must neither append to the 40-head zoo nor use it: it builds its own."""
    cfg = tiny(copy.cache)
    index_before = sha(copy.zoo_dir / "index.sqlite")
    bigger = build_assets(replace(cfg, zoo=replace(cfg.zoo, num_tasks=41)), log=quiet, with_tina=False)
    assert bigger.zoo_dir != copy.zoo_dir and len(bigger.zoo) == 41
    assert len(ZooStore(copy.zoo_dir)) == 40 and sha(copy.zoo_dir / "index.sqlite") == index_before


# ----------------------------------------------------------------------------------------------------------------
# damage is reported against the cache file, and nothing is rebuilt over it


def test_damaged_zoo_index_is_named_with_the_directory_to_delete(copy):
    index = copy.zoo_dir / "index.sqlite"
    damage_middle(index)
    before = sha(index)
    with pytest.raises(CorruptFileError, match=f"{index}.*delete {copy.zoo_dir}"):
        build_assets(tiny(copy.cache), log=quiet)
    assert sha(index) == before


def test_truncated_zoo_blob_is_named_in_the_cache(copy):
    blob = sorted((copy.zoo_dir / "blobs").iterdir())[7]
    blob.write_bytes(blob.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match=f"{blob}.*delete {copy.zoo_dir}"):
        build_assets(tiny(copy.cache), log=quiet)
    assert blob.stat().st_size == 200


@pytest.mark.parametrize("damage", ["middle", "truncated"])
def test_damaged_tina_checkpoint_is_named(copy, damage):
    if damage == "middle":
        damage_middle(copy.tina_path, 64)
    else:
        copy.tina_path.write_bytes(copy.tina_path.read_bytes()[:-500])
    before = sha(copy.tina_path)
    with pytest.raises(CorruptFileError, match=f"{copy.tina_path}.*delete it"):
        build_assets(tiny(copy.cache), log=quiet)
    assert sha(copy.tina_path) == before


def test_damaged_feature_bank_is_re_extracted_not_retrained(copy, monkeypatch):
    import fedtina.features.backbone as bb

    npz = copy.backbone.parent / "features.npz"
    npz.write_bytes(npz.read_bytes()[:1000])
    monkeypatch.setattr(bb, "train_generic", lambda *a, **k: pytest.fail("the backbone was retrained"))
    assets = build_assets(tiny(copy.cache), log=quiet)
    assert assets.bank.features.shape[0] == len(assets.dataset.images) and len(assets.zoo) == 40


# ----------------------------------------------------------------------------------------------------------------
# file modes


def test_cache_files_get_the_normal_mode(built):
    cache, _ = built
    mask = os.umask(0o022)
    os.umask(mask)
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".npz", ".safetensors", ".sqlite", ".lock"}
    assert {str(p.relative_to(cache)): oct(p.stat().st_mode & 0o777) for p in files if
            p.stat().st_mode & 0o777 != 0o666 & ~mask} == {}


# ----------------------------------------------------------------------------------------------------------------
# two processes at once


CHILD = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from fedtina.assets import build_assets
    from fedtina.config import CoreConfig, from_dict

    assets = build_assets(from_dict(CoreConfig, json.loads(sys.argv[1])), log=lambda m: print(m, file=sys.stderr))
    h = hashlib.sha256()
    for name, t in sorted(assets.tina.model.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().float().numpy().tobytes())
    print(json.dumps({"zoo_dir": str(assets.zoo_dir), "tina_path": str(assets.tina_path),
                      "tina_file": hashlib.sha256(assets.tina_path.read_bytes()).hexdigest(),
                      "tina_weights": h.hexdigest(), "zoo_len": len(assets.zoo)}))
""")


def test_two_processes_building_one_config_at_once_share_one_cache(tmp_path):
    cfg = json.dumps(asdict(tiny(tmp_path / "cache")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, cfg], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    a, b = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    logs = outs[0][1] + outs[1][1]
    # each product built once: the second process waited on the lock and loaded the first one's
    assert [logs.count(m) for m in ("backbone: training", "zoo: fine-tuned", "[tina] trained and saved",
                                    "[tina] loaded")] == [1, 1, 1, 1], logs
    assert a == b and a["zoo_len"] == 40
    store = ZooStore(a["zoo_dir"])
    assert len(store) == 40 and len({frozenset(e.class_names) for e in store.entries()}) == 40
    assert store.verify().ok and store.verify().orphans == []
    assert sorted(p.name for p in Path(a["zoo_dir"]).parent.iterdir()) == sorted(
        [Path(a["zoo_dir"]).name, f".{Path(a['zoo_dir']).name}.lock"])
