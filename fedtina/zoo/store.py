"""The zoo: an append-only, crash-safe store of fine-tuned heads (Tina's training data), and `build_zoo`, which builds
the cache's zoo once and checks it every time it is opened.

On disk (`root/`):

* `blobs/<sha256 prefix>-<random>.safetensors`: one file per entry, the parameters as tensors and the entry's class
  names, metrics and source as JSON in the safetensors header metadata, so a blob describes itself.
* `index.sqlite` (WAL journal): table `entries` (id, blob, sha256, k, class names JSON, source, metrics JSON,
  created_at) and table `entry_classes` (entry_id, position, class_name) for queries. Triggers refuse UPDATE and
  DELETE: the store is append-only.

Crash safety: an append writes each blob to a temporary file, fsyncs it, renames it into place and fsyncs the
directory, and only then inserts all index rows in one SQLite transaction. A crash before the commit leaves orphan
blobs (ignored; `verify()` lists them) and no rows; a crash after it leaves everything. Readers see an entry only
through its row, so they see it whole or not at all. The store never overwrites or deletes a file it did not just
create: an index that is not ours, or that fails SQLite's quick check when opened, is reported as `CorruptFileError`
and left untouched, and so is any SQLite error of a later read.

The cache's zoo (`build_zoo`) is immutable: built completely in a temporary directory beside its final path and
renamed into place, under the cache lock, then never appended to. Each use opens it through `open_zoo`, which checks
that it holds exactly the configured number of heads and that every blob passes its sha256 check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import struct
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import safetensors.numpy

from fedtina.config import ZooConfig
from fedtina.errors import CorruptFileError, FedtinaError, LabelSetError
from fedtina.zoo.heads import Head, accuracy, finetune_heads, generic_rows, generic_scale, mixed_head, oracle_heads
from fedtina.io import FILE_MODE, cache_lock
from fedtina.data.split import sample_tasks

INDEX_NAME = "index.sqlite"
BLOB_DIR = "blobs"
BLOB_SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
SCHEMA_VERSION = 1
FORMAT = "fedtina.zoo.store.v1"

_SCHEMA = (
    """CREATE TABLE entries (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        blob        TEXT    NOT NULL UNIQUE,
        sha256      TEXT    NOT NULL,
        k           INTEGER NOT NULL,
        class_names TEXT    NOT NULL,
        source      TEXT    NOT NULL,
        metrics     TEXT    NOT NULL,
        created_at  TEXT    NOT NULL)""",
    """CREATE TABLE entry_classes (
        entry_id    INTEGER NOT NULL REFERENCES entries(id),
        position    INTEGER NOT NULL,
        class_name  TEXT    NOT NULL,
        PRIMARY KEY (entry_id, position))""",
    "CREATE INDEX entry_classes_by_name ON entry_classes(class_name)",
    "CREATE INDEX entries_by_source_k ON entries(source, k)",
    *(f"CREATE TRIGGER {table}_no_{op} BEFORE {op.upper()} ON {table} "
      f"BEGIN SELECT RAISE(ABORT, 'the zoo is append-only'); END"
      for table in ("entries", "entry_classes") for op in ("update", "delete")),
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_COLUMNS = {
    "entries": ["id", "blob", "sha256", "k", "class_names", "source", "metrics", "created_at"],
    "entry_classes": ["entry_id", "position", "class_name"],
}
_ROW = "id, blob, sha256, k, class_names, source, metrics"


@dataclass(frozen=True, eq=False)
class ZooEntry:
    """One zoo head: class names (logit order), parameters (at least head.weight [k, d] and head.bias [k]; more,
    e.g. adapter tensors, are stored as they are), metrics and where it came from. entry_id is set by the store."""

    class_names: tuple[str, ...]
    params: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    source: str = "zoo"
    entry_id: int | None = None

    @property
    def k(self) -> int:
        return len(self.class_names)

    @property
    def head(self) -> Head:
        return Head(tuple(self.class_names), self.params["head.weight"], self.params["head.bias"])

    def __repr__(self) -> str:
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        return (f"ZooEntry(id={self.entry_id}, source={self.source!r}, class_names={list(self.class_names)}, "
                f"params={shapes}, metrics={self.metrics})")

    @classmethod
    def from_head(cls, head: Head, metrics: dict[str, float] | None = None, source: str = "zoo") -> ZooEntry:
        return cls(tuple(head.class_names), head.params(), dict(metrics or {}), source)


@dataclass(frozen=True)
class VerifyReport:
    """What `ZooStore.verify()` found: entries whose blob is missing/unreadable/altered, and blob-folder files no
    entry refers to (left by a crash between a blob write and its index commit; harmless)."""

    num_entries: int
    corrupt: dict[int, str]   # entry id -> reason
    orphans: list[str]        # file names under blobs/

    @property
    def ok(self) -> bool:
        return not self.corrupt


@dataclass(frozen=True)
class _Prepared:
    """A validated entry, serialised: what append writes."""

    class_names: tuple[str, ...]
    metrics: dict[str, float]
    source: str
    data: bytes
    sha256: str


# ----------------------------------------------------------------------------------------------------------------
# validation and (de)serialisation


def _prepare(entry: ZooEntry, where: str) -> _Prepared:
    """Check an entry (LabelSetError for bad names, FedtinaError for bad params) and serialise it to blob bytes."""
    if isinstance(entry.class_names, str):
        raise LabelSetError(f"{where}: class_names must be a sequence of names, not the string {entry.class_names!r}")
    names = tuple(entry.class_names)
    if not names:
        raise LabelSetError(f"{where}: empty label set")
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise LabelSetError(f"{where}: class names must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise LabelSetError(f"{where}: duplicated class names {dup}")
    if not isinstance(entry.source, str) or not entry.source:
        raise FedtinaError(f"{where}: source must be a non-empty string, got {entry.source!r}")
    params = {}
    for key, value in entry.params.items():
        arr = np.asarray(value, order="C")
        if not isinstance(key, str) or not key or arr.dtype.kind not in "fiub":
            raise FedtinaError(f"{where}: parameter {key!r} must be a named numeric array, got dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise FedtinaError(f"{where}: parameter {key!r} contains NaN or inf")
        params[key] = arr
    k = len(names)
    w, b = params.get("head.weight"), params.get("head.bias")
    if w is None or b is None:
        raise FedtinaError(f"{where}: params need 'head.weight' and 'head.bias', got {sorted(params)}")
    if w.ndim != 2 or w.shape[0] != k or b.shape != (k,):
        raise FedtinaError(f"{where}: k={k} classes need head.weight [k, d] and head.bias [k], "
                           f"got {w.shape} and {b.shape}")
    try:
        metrics = {str(m): float(v) for m, v in entry.metrics.items()}
    except (TypeError, ValueError) as e:
        raise FedtinaError(f"{where}: metrics must map names to numbers: {e}") from None
    meta = {"format": FORMAT, "class_names": json.dumps(list(names)), "metrics": json.dumps(metrics),
            "source": entry.source}
    data = safetensors.numpy.save(params, metadata=meta)
    return _Prepared(names, metrics, entry.source, data, hashlib.sha256(data).hexdigest())


def _decode(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, header metadata) of safetensors bytes; raises on anything malformed."""
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return safetensors.numpy.load(data), meta


# ----------------------------------------------------------------------------------------------------------------
# the store


def _fsync_dir(path: Path) -> None:
    """Make renames in `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_blob(blob_dir: Path, p: _Prepared) -> str:
    """Write bytes under a fresh name (tmp file, fsync, rename). Never replaces an existing file."""
    while True:
        name = f"{p.sha256[:16]}-{secrets.token_hex(4)}{BLOB_SUFFIX}"
        if not (blob_dir / name).exists():
            break
    tmp = blob_dir / f"{TMP_PREFIX}{name}"
    with open(tmp, "xb") as f:
        f.write(p.data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, blob_dir / name)
    return name


def _insert_row(conn: sqlite3.Connection, p: _Prepared, blob: str, created_at: str) -> int:
    """Insert one entry's index rows (inside the caller's transaction); returns its id."""
    cur = conn.execute(
        "INSERT INTO entries (blob, sha256, k, class_names, source, metrics, created_at) VALUES (?,?,?,?,?,?,?)",
        (blob, p.sha256, len(p.class_names), json.dumps(list(p.class_names)), p.source, json.dumps(p.metrics),
         created_at))
    entry_id = int(cur.lastrowid)
    conn.executemany("INSERT INTO entry_classes (entry_id, position, class_name) VALUES (?,?,?)",
                     [(entry_id, j, n) for j, n in enumerate(p.class_names)])
    return entry_id


def _open_index(path: Path) -> sqlite3.Connection:
    """Open (or create) the SQLite index. A file that is not SQLite, a database with another schema, or an existing
    index that fails SQLite's quick check raises CorruptFileError before anything is written to it."""
    existed = path.exists() and path.stat().st_size > 0
    if existed:
        with open(path, "rb") as f:
            header = f.read(16)
        if header != b"SQLite format 3\x00":
            raise CorruptFileError(f"zoo index {path} is not a SQLite database; it was left untouched: move it away "
                                   f"or open the zoo in another directory")
    conn = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    try:
        if not _tables(conn) and _user_version(conn) == 0:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if not _tables(conn) and _user_version(conn) == 0:  # another process may have created it meanwhile
                    os.chmod(path, FILE_MODE)  # SQLite creates it 0644 whatever the umask; its -wal/-shm copy this
                    for statement in _SCHEMA:
                        conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        _check_schema(conn, path)
        if existed:
            _quick_check(conn, path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn
    except sqlite3.OperationalError as e:   # locked, unwritable, ...: not the file's fault
        conn.close()
        raise FedtinaError(f"cannot open zoo index {path}: {e}") from None
    except sqlite3.DatabaseError as e:
        conn.close()
        raise CorruptFileError(f"zoo index {path} cannot be read as SQLite ({e}); it was left untouched") from None
    except BaseException:
        conn.close()
        raise


def _quick_check(conn: sqlite3.Connection, path: Path) -> None:
    """SQLite's quick check (every page and record well formed; ~1.5 ms for a 600-entry zoo): damage inside the file
    is caught when it is opened, not by whichever later query first reads the damaged page."""
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError):  # locked, unreadable: not the file's fault
            raise
        problems = [str(e)]
    if problems != ["ok"]:
        detail = " ".join(" ".join(problems).split())  # one line: SQLite reports one problem per line
        raise CorruptFileError(f"zoo index {path} fails SQLite's integrity check "
                               f"({detail[:200]}{'...' if len(detail) > 200 else ''}); it was left untouched")


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")} - {"sqlite_sequence"}


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    version, tables = _user_version(conn), _tables(conn)
    columns = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in _COLUMNS if t in tables}
    if version != SCHEMA_VERSION or columns != _COLUMNS:
        raise CorruptFileError(f"{path} is a SQLite database but not a fedtina zoo index of schema version "
                               f"{SCHEMA_VERSION} (user_version={version}, tables={sorted(tables)}); "
                               f"it was left untouched")


class ZooStore:
    """An append-only store of `ZooEntry`s under `root` (see the module docstring for the layout and guarantees).

    Several ZooStore objects (threads or processes) may open the same root: readers never block, writers queue.
    Use one object per thread. Ids start at 1 and are never reused.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.index_path = self.root / INDEX_NAME
        self.blob_dir = self.root / BLOB_DIR
        if self.root.exists() and not self.root.is_dir():
            raise FedtinaError(f"zoo root {self.root} exists and is not a directory")
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._conn = _open_index(self.index_path)

    def __repr__(self) -> str:
        return f"ZooStore({str(self.root)!r}, {len(self)} entries)"

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ZooStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _index_errors(self) -> Iterator[None]:
        """SQLite errors of a query as fedtina errors naming the index: damage the open-time check did not see (or
        that came later) is a CorruptFileError, a locked or unreadable file a FedtinaError."""
        try:
            yield
        except sqlite3.OperationalError as e:
            raise FedtinaError(f"cannot use zoo index {self.index_path}: {e}") from None
        except sqlite3.DatabaseError as e:
            raise CorruptFileError(f"zoo index {self.index_path} is damaged ({type(e).__name__}: {e}); it was left "
                                   f"untouched") from None

    def _rows(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._index_errors():
            return self._conn.execute(sql, args).fetchall()

    # -- writing -------------------------------------------------------------------------------------------------

    def append(self, entry: ZooEntry) -> int:
        """Store one entry; returns its id. (entry.entry_id is ignored.)"""
        return self.append_many([entry])[0]

    def append_many(self, entries: Iterable[ZooEntry]) -> list[int]:
        """Store entries atomically: every entry is validated first (a bad one stores nothing and its index is in
        the error), then all blobs are written and synced, then all index rows go in one transaction."""
        prepared = [_prepare(e, f"zoo entry #{i} of this append") for i, e in enumerate(entries)]
        if not prepared:
            return []
        blobs = [_write_blob(self.blob_dir, p) for p in prepared]
        _fsync_dir(self.blob_dir)
        created_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._index_errors():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [_insert_row(self._conn, p, blob, created_at) for p, blob in zip(prepared, blobs)]
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return ids

    # -- reading -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM entries")[0][0])

    def ids(self) -> list[int]:
        return [r[0] for r in self._rows("SELECT id FROM entries ORDER BY id")]

    def get(self, entry_id: int) -> ZooEntry:
        """Load one entry, checking its blob's sha256 (CorruptFileError naming the entry and file on mismatch)."""
        rows = self._rows(f"SELECT {_ROW} FROM entries WHERE id = ?", (int(entry_id),))
        if not rows:
            raise FedtinaError(f"no zoo entry with id {entry_id} in {self.root} ({len(self)} entries)")
        return self._load(rows[0])

    def entries(self, ids: Sequence[int] | None = None, *, skip_corrupt: bool = False) -> list[ZooEntry]:
        """Load many entries (all, in id order, when ids is None) from one consistent snapshot of the index.
        A corrupt blob raises CorruptFileError unless skip_corrupt, which leaves it out."""
        rows = {r[0]: r for r in self._rows(f"SELECT {_ROW} FROM entries ORDER BY id")}
        if ids is None:
            ids = list(rows)
        missing = [i for i in ids if int(i) not in rows]
        if missing:
            raise FedtinaError(f"no zoo entries with ids {missing[:10]} in {self.root} ({len(rows)} entries)")
        out = []
        for i in ids:
            try:
                out.append(self._load(rows[int(i)]))
            except CorruptFileError:
                if not skip_corrupt:
                    raise
        return out

    def query(self, class_name: str | None = None, k: int | None = None, source: str | None = None) -> list[int]:
        """Ids (ascending) of entries that contain `class_name`, have `k` classes and come from `source`
        (each filter optional)."""
        where, args = [], []
        if class_name is not None:
            where.append("id IN (SELECT entry_id FROM entry_classes WHERE class_name = ?)")
            args.append(class_name)
        if k is not None:
            where.append("k = ?")
            args.append(int(k))
        if source is not None:
            where.append("source = ?")
            args.append(source)
        sql = "SELECT id FROM entries" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [r[0] for r in self._rows(sql, args)]

    def verify(self) -> VerifyReport:
        """Check every entry's blob (exists, sha256, parses, matches its index row) and list orphan files."""
        rows = self._rows(f"SELECT {_ROW} FROM entries ORDER BY id")
        corrupt = {}
        for row in rows:
            try:
                self._load(row)
            except CorruptFileError as e:
                corrupt[row[0]] = str(e)
        known = {row[1] for row in rows}
        orphans = sorted(p.name for p in self.blob_dir.iterdir() if p.name not in known)
        return VerifyReport(len(rows), corrupt, orphans)

    def _load(self, row) -> ZooEntry:
        entry_id, blob, sha, k, names_json, source, _ = row
        path = self.blob_dir / blob
        where = f"zoo entry {entry_id} (blob {path})"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CorruptFileError(f"{where} cannot be read: {e}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha:
            raise CorruptFileError(f"{where} fails its sha256 check (index {sha[:16]}..., file {digest[:16]}...)")
        try:
            params, meta = _decode(data)
            names = tuple(json.loads(meta["class_names"]))
            metrics = {m: float(v) for m, v in json.loads(meta["metrics"]).items()}
        except Exception as e:  # noqa: BLE001 - any parse failure of a hashed blob is corruption
            raise CorruptFileError(f"{where} cannot be parsed: {e}") from None
        if names != tuple(json.loads(names_json)) or len(names) != k or meta.get("source") != source:
            raise CorruptFileError(f"{where} disagrees with its index row (class names / k / source)")
        return ZooEntry(names, params, metrics, source, entry_id)


# ----------------------------------------------------------------------------------------------------------------
# building the zoo


def _images_by_class(idx: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    idx = np.asarray(idx)
    lab = labels[idx]
    return {int(c): idx[lab == c] for c in np.unique(lab)}


def _task_data(task: Sequence[int], by_class: dict[int, np.ndarray], features: np.ndarray):
    """(features, positions 0..k-1) of the task's classes' images."""
    empty = np.zeros(0, np.int64)
    parts = [by_class.get(c, empty) for c in task]
    idx = np.concatenate(parts)
    return features[idx], np.repeat(np.arange(len(task)), [len(p) for p in parts])


def build_zoo(root: str | os.PathLike, bank, split, class_names: Sequence[str], labels: np.ndarray, cfg: ZooConfig,
              log: Callable[[str], None] = print) -> ZooStore:
    """The zoo of cfg.num_tasks heads (source "zoo") at `root`, built once: an existing `root` is only opened and
    checked (`open_zoo`), never topped up. Otherwise it is built under the cache lock (a second process waits, then
    opens the first one's zoo) in a temporary directory beside `root`, which is renamed into place when complete, so
    `root` holds a whole zoo or nothing; a temporary directory left by a killed build is replaced.

    Tasks: cfg.num_tasks distinct subsets of split.seen, k uniform in [cfg.k_min, cfg.k_max], seeded by cfg.seed.
    Each head starts from the generic rows of its classes (bank.generic_weight/bias, row i = class bank.seen[i]);
    a novel class (split.novel: no generic row) starts from its row imprinted from the task's zoo images
    (`heads.mixed_head`). It is fine-tuned (cfg.finetune; with cfg.finetune.select, per-task hyper-parameters from
    `oracle_heads`) on the zoo-part images (split.zoo_idx) of its classes. Metrics: zoo_acc (train), test_acc and
    generic_test_acc (the un-tuned initial head) on the task's split.test_idx images, n_zoo, n_test.
    """
    root = Path(root)
    if not root.exists():
        with cache_lock(root):
            if not root.exists():  # another process may have built it while we waited
                tmp = root.with_name(f".{root.name}.building")
                if tmp.exists():
                    log(f"zoo: replacing {tmp}, an unfinished build left by a killed process")
                    shutil.rmtree(tmp)
                try:
                    with ZooStore(tmp) as store:  # closing checkpoints the WAL: the index is one file
                        _fill(store, bank, split, class_names, labels, cfg, log)
                    _fsync_dir(tmp)
                    os.rename(tmp, root)
                    _fsync_dir(root.parent)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return open_zoo(root, cfg.num_tasks)


def open_zoo(root: str | os.PathLike, num_tasks: int) -> ZooStore:
    """A zoo that `build_zoo` built, checked before use: its index passes SQLite's quick check, it holds exactly
    `num_tasks` entries and every blob passes its sha256 check (~40 ms for 600 heads). Anything else is a
    CorruptFileError naming the damage and the directory to delete; nothing is repaired or rebuilt over."""
    root = Path(root)
    fix = f"delete {root} to rebuild it"
    if not (root / INDEX_NAME).is_file():
        raise CorruptFileError(f"zoo {root} has no index {INDEX_NAME}; {fix}")
    try:
        store = ZooStore(root)
    except CorruptFileError as e:
        raise CorruptFileError(f"{e}; {fix}") from None
    try:
        problem = None
        if len(store) != num_tasks:
            problem = (f"zoo {root} holds {len(store)} entries, but it is the zoo of zoo.num_tasks={num_tasks} "
                       f"(a cached zoo is never topped up or partly used)")
        elif not (report := store.verify()).ok:
            problem = (f"zoo {root}: {len(report.corrupt)} of {report.num_entries} entries are damaged, e.g. "
                       f"{next(iter(report.corrupt.values()))}")
    except CorruptFileError as e:  # an index page the quick check passed but a query cannot read
        problem = str(e)
    if problem is not None:
        store.close()
        raise CorruptFileError(f"{problem}; {fix}")
    return store


def _fill(store: ZooStore, bank, split, class_names: Sequence[str], labels: np.ndarray, cfg: ZooConfig,
          log: Callable[[str], None]) -> None:
    """Fine-tune the cfg.num_tasks heads of `build_zoo` and append them to the empty `store`."""
    labels = np.asarray(labels)
    if not np.array_equal(np.asarray(bank.seen), split.backbone_classes):
        raise FedtinaError(f"the feature bank's generic head covers {len(bank.seen)} classes, not the split's "
                           f"{len(split.backbone_classes)} backbone classes: a bank of another split")
    rows, scale = generic_rows(bank, class_names), generic_scale(bank, split.backbone_idx)
    tasks = sample_tasks(np.asarray(split.seen), cfg.num_tasks, cfg.k_min, cfg.k_max, np.random.default_rng(cfg.seed))
    features = np.asarray(bank.features, np.float32)
    zoo_by, test_by = _images_by_class(split.zoo_idx, labels), _images_by_class(split.test_idx, labels)
    names = [tuple(class_names[c] for c in t) for t in tasks]
    train = [_task_data(t, zoo_by, features) for t in tasks]
    test = [_task_data(t, test_by, features) for t in tasks]
    for t, (x, _), (xt, _) in zip(names, train, test):
        if len(x) == 0 or len(xt) == 0:
            raise FedtinaError(f"zoo task {list(t)} has {len(x)} zoo images and {len(xt)} test images; need both")
    inits = [mixed_head(n, x, y, rows, scale) for n, (x, y) in zip(names, train)]
    t0 = time.perf_counter()
    # select: per-task steps/lr/l2 chosen on hold-outs of the task's own zoo images (heads.oracle_heads); a fixed
    # recipe over-fits the few images per class of small datasets and makes zoo heads worse than the generic rows
    # (one hold-out split per task, not three: 600 tasks stay around a minute on a CPU)
    if cfg.finetune.select:
        heads = oracle_heads(inits, train, cfg.finetune, repeats=1, seed=cfg.seed)
    else:
        heads = finetune_heads(inits, train, cfg.finetune)
    log(f"zoo: fine-tuned {len(heads)} heads (k {cfg.k_min}..{cfg.k_max}) in {time.perf_counter() - t0:.1f}s")
    entries = [ZooEntry.from_head(h, {"zoo_acc": accuracy(h, *tr), "test_acc": accuracy(h, *te),
                                      "generic_test_acc": accuracy(g, *te), "n_zoo": float(len(tr[1])),
                                      "n_test": float(len(te[1]))}, source="zoo")
               for h, g, tr, te in zip(heads, inits, train, test)]
    store.append_many(entries)
    mean = lambda key: np.mean([e.metrics[key] for e in entries])  # noqa: E731
    log(f"zoo: {len(entries)} entries: test acc {mean('test_acc'):.3f} vs generic rows "
        f"{mean('generic_test_acc'):.3f}, train acc {mean('zoo_acc'):.3f}")
