"""The zoo store (append-only, crash safe, verifiable) and build_zoo on fake features."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import fedtina.zoo.store as zoo
from fedtina.config import HeadTrainConfig, ZooConfig
from fedtina.errors import CorruptFileError, FedtinaError, LabelSetError
from fedtina.zoo.store import ZooEntry, ZooStore, build_zoo

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def entry(names=("cat", "dog", "fox"), d=8, seed=0, source="zoo", **extra) -> ZooEntry:
    rng = np.random.default_rng(seed)
    params = {"head.weight": rng.normal(size=(len(names), d)).astype(np.float32),
              "head.bias": rng.normal(size=len(names)).astype(np.float32), **extra}
    return ZooEntry(tuple(names), params, {"test_acc": 0.1 * seed, "zoo_acc": 1 / 3}, source)


def same(a: ZooEntry, b: ZooEntry) -> bool:
    """Bit-exact params (and dtypes), names, metrics, source."""
    return (a.class_names == b.class_names and a.metrics == b.metrics and a.source == b.source
            and a.params.keys() == b.params.keys()
            and all(a.params[n].dtype == b.params[n].dtype and a.params[n].shape == b.params[n].shape
                    and a.params[n].tobytes() == b.params[n].tobytes() for n in a.params))


def blob_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "blobs").iterdir())


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# round trip and queries


def test_round_trip_reopen_and_order(tmp_path):
    originals = [entry(seed=0), entry(("maple tree", "oak tree"), seed=1, source="tina"),
                 entry(("a", "b", "c", "d"), seed=2, **{"adapter.lora_a": np.arange(6, dtype=np.float16).reshape(2, 3),
                                                         "adapter.count": np.array([3], np.int64)}),
                 entry(seed=3)]
    with ZooStore(tmp_path) as store:
        ids = [store.append(originals[0])] + store.append_many(originals[1:])
        assert ids == [1, 2, 3, 4] and len(store) == 4
        assert all(same(store.get(i), e) for i, e in zip(ids, originals))
    store = ZooStore(tmp_path)  # reopen
    loaded = store.entries()
    assert [e.entry_id for e in loaded] == ids and all(same(a, b) for a, b in zip(loaded, originals))
    assert [e.entry_id for e in store.entries([4, 1])] == [4, 1]
    head = store.get(2).head
    assert head.class_names == ("maple tree", "oak tree") and head.weight.shape == (2, 8)
    assert store.verify().ok and store.verify().orphans == []
    assert store.append(entry(seed=5)) == 5
    with pytest.raises(FedtinaError, match="99"):
        store.get(99)


def test_query(tmp_path):
    store = ZooStore(tmp_path)
    store.append_many([entry(("cat", "dog")), entry(("cat", "fox", "owl")), entry(("dog", "owl"), source="tina"),
                       entry(("eel", "ant", "bee"), source="tina")])
    assert store.query() == [1, 2, 3, 4]
    assert store.query(class_name="cat") == [1, 2]
    assert store.query(class_name="owl", k=2) == [3]
    assert store.query(k=3) == [2, 4]
    assert store.query(source="tina") == [3, 4]
    assert store.query(class_name="dog", source="zoo") == [1]
    assert store.query(class_name="no such class") == []


def test_append_only(tmp_path):
    store = ZooStore(tmp_path)
    store.append(entry())
    assert not any(hasattr(store, m) for m in ("delete", "update", "remove", "clear"))
    for sql in ("DELETE FROM entries", "UPDATE entries SET source='x'", "DELETE FROM entry_classes"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            store._conn.execute(sql)
    assert len(store) == 1


def test_bulk_append_and_load(tmp_path):
    entries = [entry((f"c{i}", f"c{i + 1}", f"c{i + 2}"), d=64, seed=i) for i in range(200)]
    store = ZooStore(tmp_path)
    ids = store.append_many(entries)
    assert ids == list(range(1, 201))
    loaded = ZooStore(tmp_path).entries()
    assert len(loaded) == 200 and all(same(a, b) for a, b in zip(loaded, entries))


# ----------------------------------------------------------------------------------------------------------------
# validation: bad entries store nothing


@pytest.mark.parametrize("bad, error, match", [
    (lambda: entry(names=()), LabelSetError, "empty"),
    (lambda: entry(names=("cat", "dog", "cat")), LabelSetError, "duplicated.*cat"),
    (lambda: entry(names=("cat", "")), LabelSetError, "non-empty"),
    (lambda: ZooEntry("cat", entry().params, {}), LabelSetError, "string"),
    (lambda: ZooEntry(("a", "b"), entry().params, {}), FedtinaError, "k=2"),
    (lambda: ZooEntry(("a", "b", "c"), {**entry().params, "head.bias": np.zeros(4, np.float32)}, {}),
     FedtinaError, "head.bias"),
    (lambda: ZooEntry(("a", "b", "c"), {"head.weight": np.zeros((3, 2), np.float32)}, {}), FedtinaError, "head.bias"),
    (lambda: ZooEntry(("a", "b", "c"), {**entry().params, "head.weight": np.full((3, 8), np.nan, np.float32)}, {}),
     FedtinaError, "NaN"),
    (lambda: ZooEntry(("a", "b", "c"), {**entry().params, "x": np.array([np.inf])}, {}), FedtinaError, "'x'"),
    (lambda: ZooEntry(("a", "b", "c"), entry().params, {"acc": "high"}), FedtinaError, "metrics"),
])
def test_bad_entries_rejected_and_nothing_stored(tmp_path, bad, error, match):
    store = ZooStore(tmp_path)
    store.append(entry())
    with pytest.raises(error, match=match):
        store.append_many([entry(seed=1), bad()])
    with pytest.raises(error, match="#0"):
        store.append(bad())
    assert len(store) == 1 and len(blob_files(tmp_path)) == 1 and store.verify().orphans == []


# ----------------------------------------------------------------------------------------------------------------
# crash safety


def test_crash_between_blob_write_and_index_insert(tmp_path, monkeypatch):
    store = ZooStore(tmp_path)
    store.append(entry(seed=0))

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash before the index insert")

    monkeypatch.setattr(zoo, "_insert_row", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        store.append_many([entry(seed=1), entry(seed=2)])
    monkeypatch.undo()
    assert len(store) == 1
    reopened = ZooStore(tmp_path)
    assert len(reopened) == 1 and same(reopened.get(1), entry(seed=0))
    report = reopened.verify()
    assert report.ok and len(report.orphans) == 2 and len(blob_files(tmp_path)) == 3
    assert reopened.append(entry(seed=3)) == 2 and same(ZooStore(tmp_path).get(2), entry(seed=3))


CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    import fedtina.zoo.store as zoo
    from fedtina.zoo.store import ZooEntry, ZooStore

    root, where = sys.argv[1], sys.argv[2]
    def entry(seed):
        rng = np.random.default_rng(seed)
        return ZooEntry(("a", "b"), {"head.weight": rng.normal(size=(2, 4)).astype(np.float32),
                                     "head.bias": np.zeros(2, np.float32)}, {"m": float(seed)})
    store = ZooStore(root)
    store.append_many([entry(0), entry(1)])            # committed before the crash
    calls = {"n": 0}
    def crash_on_third(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                os._exit(17)                           # no cleanup, no rollback: like a kill -9
            return real(*args, **kwargs)
        return wrapped
    if where == "mid_transaction":                     # 2 rows inserted, not committed
        zoo._insert_row = crash_on_third(zoo._insert_row)
    elif where == "mid_blob_write":                    # 2 blobs in place, the 3rd a half-written tmp file
        os.fsync = crash_on_third(os.fsync)
    store.append_many([entry(s) for s in range(2, 7)])
    print("no crash")
""")


@pytest.mark.parametrize("where", ["mid_transaction", "mid_blob_write"])
def test_process_killed_inside_append_many_is_all_or_nothing(tmp_path, where):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), where], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 17, proc.stdout + proc.stderr
    store = ZooStore(tmp_path)
    assert len(store) == 2 and [e.metrics["m"] for e in store.entries()] == [0.0, 1.0]
    report = store.verify()
    assert report.ok
    if where == "mid_transaction":
        assert len(report.orphans) == 5
    else:
        assert len(report.orphans) == 3 and sum(o.startswith(".tmp-") for o in report.orphans) == 1
    assert store.append_many([entry(seed=9)]) == [3]


def test_corrupt_blob_is_reported_and_others_still_load(tmp_path):
    store = ZooStore(tmp_path)
    store.append_many([entry(seed=s) for s in range(3)])
    blob = store.blob_dir / store._conn.execute("SELECT blob FROM entries WHERE id = 2").fetchone()[0]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=f"entry 2.*{blob.name}.*sha256"):
        store.get(2)
    assert same(store.get(1), entry(seed=0)) and same(store.get(3), entry(seed=2))
    with pytest.raises(CorruptFileError, match="entry 2"):
        store.entries()
    assert [e.entry_id for e in store.entries(skip_corrupt=True)] == [1, 3]
    blob_3 = store.blob_dir / store._conn.execute("SELECT blob FROM entries WHERE id = 3").fetchone()[0]
    blob_3.unlink()
    with pytest.raises(CorruptFileError, match=f"entry 3.*{blob_3.name}"):
        store.get(3)
    report = ZooStore(tmp_path).verify()
    assert sorted(report.corrupt) == [2, 3] and not report.ok and report.num_entries == 3


def test_garbage_index_is_refused_and_left_untouched(tmp_path):
    index = tmp_path / "index.sqlite"
    index.write_bytes(np.random.default_rng(0).bytes(5000))
    before = file_digest(index)
    with pytest.raises(CorruptFileError, match=str(index)):
        ZooStore(tmp_path)
    assert file_digest(index) == before
    assert not (tmp_path / "index.sqlite-wal").exists()


def test_foreign_sqlite_database_is_refused_and_left_untouched(tmp_path):
    index = tmp_path / "index.sqlite"
    conn = sqlite3.connect(index)
    conn.execute("CREATE TABLE entries (id INTEGER, what TEXT)")
    conn.execute("INSERT INTO entries VALUES (1, 'not a zoo')")
    conn.commit()
    conn.close()
    before = file_digest(index)
    with pytest.raises(CorruptFileError, match="not a fedtina zoo index"):
        ZooStore(tmp_path)
    assert file_digest(index) == before


def test_truncated_index_is_refused(tmp_path):
    store = ZooStore(tmp_path)
    store.append_many([entry(seed=s) for s in range(50)])
    store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    index = tmp_path / "index.sqlite"
    index.write_bytes(index.read_bytes()[:1024 + 100])
    before = file_digest(index)
    with pytest.raises(CorruptFileError, match=str(index)):
        s = ZooStore(tmp_path)
        s.entries()
    assert file_digest(index) == before


def damage_middle(path: Path) -> None:
    """Overwrite 4 KiB in the middle of a file (a bad sector, a stray write): the SQLite header stays valid."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xab" * 4096
    path.write_bytes(bytes(data))


def test_damage_inside_the_index_is_caught_on_open(tmp_path):
    store = ZooStore(tmp_path)
    store.append_many([entry(("a", "b", "c"), d=64, seed=s) for s in range(300)])
    store.close()
    index = tmp_path / "index.sqlite"
    damage_middle(index)
    before = file_digest(index)
    with pytest.raises(CorruptFileError, match=f"zoo index {index}.*integrity check"):
        ZooStore(tmp_path)
    assert file_digest(index) == before


def test_database_errors_on_reads_name_the_index(tmp_path, monkeypatch):
    """Damage the open-time check did not see (here: the check is skipped) still ends in CorruptFileError."""
    store = ZooStore(tmp_path)
    store.append_many([entry(("a", "b", "c"), d=64, seed=s) for s in range(300)])
    store.close()
    index = tmp_path / "index.sqlite"
    damage_middle(index)
    monkeypatch.setattr(zoo, "_quick_check", lambda conn, path: None)
    store = ZooStore(tmp_path)
    with pytest.raises(CorruptFileError, match=f"zoo index {index}"):
        store.entries()
    with pytest.raises(CorruptFileError, match=f"zoo index {index}"):
        store.verify()


def test_concurrent_reader_sees_whole_entries(tmp_path):
    writer = ZooStore(tmp_path)
    errors, seen = [], []
    done = threading.Event()

    def read():
        reader = ZooStore(tmp_path)
        try:
            while not done.is_set():
                loaded = reader.entries()
                seen.append(len(loaded))
                for e in loaded:
                    assert same(e, entry(seed=e.entry_id - 1))
        except Exception as e:  # noqa: BLE001 - surfaced in the main thread
            errors.append(e)

    thread = threading.Thread(target=read)
    thread.start()
    for s in range(0, 40, 4):
        writer.append_many([entry(seed=s + j) for j in range(4)])
    done.set()
    thread.join(30)
    assert not errors, errors
    assert seen == sorted(seen) and len(ZooStore(tmp_path)) == 40


# ----------------------------------------------------------------------------------------------------------------
# build_zoo on fake features


def fake_assets(num_classes=10, per_class=30, d=12, seed=0):
    """Gaussian class clusters as features; the "generic" rows are noisy class means; 8 seen classes."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=1.2, size=(num_classes, d)).astype(np.float32)
    labels = np.repeat(np.arange(num_classes), per_class)
    features = (means[labels] + rng.normal(size=(len(labels), d))).astype(np.float32)
    seen = np.arange(8)
    bank = SimpleNamespace(features=features, generic_weight=(means[seen] + rng.normal(scale=1.0, size=(8, d))
                                                              ).astype(np.float32),
                           generic_bias=np.zeros(8, np.float32), seen=seen)
    part = np.tile(np.arange(per_class), num_classes)
    split = SimpleNamespace(seen=seen, unseen=np.arange(8, num_classes), backbone_idx=np.flatnonzero(part < 10),
                            zoo_idx=np.flatnonzero((part >= 10) & (part < 20)), test_idx=np.flatnonzero(part >= 20),
                            backbone_classes=seen)
    return bank, split, [f"class {c}" for c in range(num_classes)], labels


ZOO = ZooConfig(num_tasks=12, k_min=3, k_max=5, seed=0, finetune=HeadTrainConfig(steps=60, lr=0.05))


def test_build_zoo_builds_once(tmp_path):
    bank, split, names, labels = fake_assets()
    root, logs = tmp_path / "zoo" / "key", []
    store = build_zoo(root, bank, split, names, labels, ZOO, log=logs.append)
    assert store.ids() == list(range(1, 13)) and logs
    assert sorted(p.name for p in root.parent.iterdir()) == [".key.lock", "key"]   # no temporary directory left
    entries = store.entries()
    seen_names = {names[c] for c in split.seen}
    assert len({frozenset(e.class_names) for e in entries}) == 12
    assert all(3 <= e.k <= 5 and set(e.class_names) <= seen_names and e.source == "zoo" for e in entries)
    assert all(e.metrics["n_zoo"] == 10 * e.k and e.metrics["n_test"] == 10 * e.k for e in entries)
    assert np.mean([e.metrics["test_acc"] for e in entries]) > np.mean([e.metrics["generic_test_acc"] for e in entries])
    assert all(e.metrics["zoo_acc"] >= 0.5 for e in entries)
    # metrics are recomputable from the stored heads
    e = entries[0]
    idx = np.concatenate([split.test_idx[labels[split.test_idx] == names.index(n)] for n in e.class_names])
    pos = np.repeat(np.arange(e.k), 10)
    assert e.metrics["test_acc"] == pytest.approx(float(np.mean(e.head.predict(bank.features[idx]) == pos)))
    store.close()

    def no_build(*a, **k):
        raise AssertionError("the zoo was built again")

    blobs = blob_files(root)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(zoo, "finetune_heads", no_build)
        m.setattr(zoo, "oracle_heads", no_build)
        again = build_zoo(root, bank, split, names, labels, ZOO, log=logs.append)
    assert again.ids() == list(range(1, 13)) and blob_files(root) == blobs


@pytest.mark.parametrize("num_tasks", [11, 20])
def test_a_built_zoo_is_never_topped_up_or_partly_used(tmp_path, num_tasks):
    """A zoo whose size is not num_tasks is not this config's zoo: refused, named, left as it is."""
    bank, split, names, labels = fake_assets()
    root = tmp_path / "key"
    build_zoo(root, bank, split, names, labels, ZOO, log=lambda _: None).close()
    before = {p.name: file_digest(p) for p in [root / "index.sqlite", *(root / "blobs").iterdir()]}
    other = ZooConfig(**{**ZOO.__dict__, "num_tasks": num_tasks})
    with pytest.raises(CorruptFileError, match=f"12 entries.*{num_tasks}.*delete {root}"):
        build_zoo(root, bank, split, names, labels, other, log=lambda _: None)
    assert {p.name: file_digest(p) for p in [root / "index.sqlite", *(root / "blobs").iterdir()]} == before


def test_build_zoo_refuses_a_damaged_zoo(tmp_path):
    bank, split, names, labels = fake_assets()
    root = tmp_path / "key"
    store = build_zoo(root, bank, split, names, labels, ZOO, log=lambda _: None)
    blob = store.blob_dir / store._conn.execute("SELECT blob FROM entries WHERE id = 5").fetchone()[0]
    store.close()
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match=f"{blob}.*delete {root}"):
        build_zoo(root, bank, split, names, labels, ZOO, log=lambda _: None)
    (root / "index.sqlite").unlink()
    with pytest.raises(CorruptFileError, match=f"no index.*delete {root}"):
        build_zoo(root, bank, split, names, labels, ZOO, log=lambda _: None)
    assert not (root / "index.sqlite").exists()


def test_a_failed_build_leaves_no_zoo(tmp_path, monkeypatch):
    """The zoo is built in a temporary directory and renamed into place: a crash leaves no partial zoo at root, and
    the next build starts over (a killed build's temporary directory is replaced)."""
    bank, split, names, labels = fake_assets()
    root = tmp_path / "key"

    def boom(*a, **k):
        raise RuntimeError("simulated crash mid-build")

    monkeypatch.setattr(ZooStore, "append_many", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        build_zoo(root, bank, split, names, labels, ZOO, log=lambda _: None)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".key.lock"]
    left = tmp_path / ".key.building"   # as a kill -9 mid-build leaves it
    ZooStore(left).append(entry(("class 0", "class 1")))
    store = build_zoo(root, bank, split, names, labels, ZOO, log=lambda _: None)
    assert len(store) == 12 and store.verify().ok and not left.exists()


def test_build_zoo_rejects_bank_without_generic_rows_for_seen(tmp_path):
    bank, split, names, labels = fake_assets()
    split.seen = split.backbone_classes = np.arange(9)  # class 8 should be the generic model's, but has no row
    with pytest.raises(FedtinaError, match="covers 8 classes, not the split's 9 backbone classes"):
        build_zoo(tmp_path / "key", bank, split, names, labels, ZooConfig(num_tasks=2, k_min=2, k_max=2),
                  log=lambda _: None)
    assert not (tmp_path / "key").exists()


def test_zoo_heads_over_novel_classes_start_from_imprinted_rows(tmp_path, monkeypatch):
    """Novel classes (seen, no generic row): the zoo still holds heads over them; each starts from its class mean
    centred on the generic model's training features, on the generic rows' scale, beside the generic rows of the
    other classes (heads.RowScale)."""
    bank, split, names, labels = fake_assets()
    split.seen, split.novel = np.arange(10), np.array([8, 9])
    split.unseen = np.zeros(0, np.int64)
    starts = []
    monkeypatch.setattr(zoo, "finetune_heads", lambda inits, *a, **k: starts.extend(inits) or list(inits))
    entries = build_zoo(tmp_path / "key", bank, split, names, labels, ZOO, log=lambda _: None).entries()
    with_novel = [e for e in entries if {"class 8", "class 9"} & set(e.class_names)]
    assert with_novel and len(starts) == len(entries)
    scale = np.linalg.norm(bank.generic_weight, axis=1).mean()
    center = bank.features[split.backbone_idx].mean(0)
    offset = (bank.generic_weight @ center + bank.generic_bias).mean()
    for head in starts:
        for j, n in enumerate(head.class_names):
            c = names.index(n)
            if c < 8:
                np.testing.assert_array_equal(head.weight[j], bank.generic_weight[c])
                continue
            zoo_x = bank.features[split.zoo_idx[labels[split.zoo_idx] == c]].mean(0) - center
            np.testing.assert_allclose(head.weight[j], scale * zoo_x / np.linalg.norm(zoo_x), rtol=1e-4, atol=1e-6)
            assert head.bias[j] == pytest.approx(offset - head.weight[j] @ center, rel=1e-4, abs=1e-5)


def test_build_zoo_is_deterministic(tmp_path):
    bank, split, names, labels = fake_assets()
    cfg = ZooConfig(num_tasks=9, k_min=2, k_max=4, seed=3, finetune=HeadTrainConfig(steps=20))
    a = build_zoo(tmp_path / "a", bank, split, names, labels, cfg, log=lambda _: None).entries()
    b = build_zoo(tmp_path / "b", bank, split, names, labels, cfg, log=lambda _: None).entries()
    assert [e.class_names for e in a] == [e.class_names for e in b]
    assert all(np.array_equal(x.head.weight, y.head.weight) for x, y in zip(a, b))


def test_nan_metric_round_trips(tmp_path):
    """A metric may be unknown (NaN), e.g. a server-side check that could not run; params may not."""
    store = ZooStore(tmp_path)
    store.append(ZooEntry(("a", "b"), entry(("a", "b")).params, {"server_val_acc": float("nan"), "acc": 0.5}, "c:1"))
    got = ZooStore(tmp_path).get(1)
    assert np.isnan(got.metrics["server_val_acc"]) and got.metrics["acc"] == 0.5 and got.source == "c:1"
