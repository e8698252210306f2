"""Every reply is untrusted input. One check per message type, run where replies enter the engine
(fedtina.server.ledger.Ledger.collect, fedtina.server.federation.Federation.describe), so method code only sees
replies that hold what it reads:

* a description (`query.describe`): its text (a bounded string) and, when asked for, its image prompts;
* a score (`evaluate.*`, and the scores of `train.finetune`): `acc` a finite number in [0, 1], `num-examples` an
  integer in [0, the client's test images] (the server knows the partition);
* an upload (`train.finetune`'s `head`): the arrays of the head it was sent, same names, shapes and dtypes; its
  values are the gate's business (fedtina.server.gate: a NaN head is a refused upload, not a failed client);
* an update (a Flower strategy's `train.*`): exactly the arrays it was sent (less those the method keeps local),
  finite, weighed by `num-examples` in [0, the client's training images];
* a profile (`prof`, `prof_received`): the client's measures (fedtina.report.profiling.from_reply).

Array sizes are read from the record's metadata and compared with what the server expects before anything is
decoded. A reply that fails raises BadReply; the ledger files that client as failed with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedtina.errors import FedtinaError
from fedtina.report.profiling import PhaseRecord, from_reply

NPY_HEADER = 4096   # bytes an .npy payload may hold beyond its array's (np.save writes a 128-byte header)
PROFILES = ("prof", "prof_received")


class BadReply(FedtinaError):
    """A reply the server refuses: its client is recorded failed with this reason."""


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def specs(rec: ArrayRecord) -> dict[str, ArraySpec]:
    """Names, shapes and dtypes of the arrays of a record (its metadata: nothing is decoded)."""
    return {k: ArraySpec(tuple(int(s) for s in a.shape), str(a.dtype)) for k, a in rec.items()}


@dataclass(frozen=True)
class Holds:
    """What the partition says a client holds (the bounds of the counts it reports)."""

    train: int   # labelled training images
    test: int    # local test images


@dataclass(frozen=True)
class Expect:
    """What a reply to one message must hold."""

    scores: tuple[str, ...] = ("metrics",)   # MetricRecords of an accuracy on the client's test images
    upload: str = ""            # the ArrayRecord it sends back: the arrays it was sent under that name ...
    required: bool = False      # ... always (an update), or only when it has something to send (a head upload)
    keep: tuple[str, ...] = ()  # arrays of the sent record that it keeps local (BodyOnly: the head)
    weight: str = ""            # MetricRecord whose `num-examples` weighs its update (<= its training images)
    finite: bool = False        # its upload's values must be finite (an update; a head's are the gate's to judge)


@dataclass
class Checked:
    """A reply that passed: its profiles by record name (who, what and when are the ledger's to fill in)."""

    profiles: dict[str, PhaseRecord]


def check(content: RecordDict, expect: Expect, holds: Holds, sent: dict[str, ArraySpec] | None = None) -> Checked:
    """`content` against `expect`; `sent`: the arrays of the record the client was sent under `expect.upload`.
    Raises BadReply naming the first problem."""
    wanted = set(expect.scores) | ({expect.weight} if expect.weight else set()) | (
        {expect.upload} if expect.upload else set()) | set(PROFILES)
    extra = sorted(set(content.keys()) - wanted)
    if extra:
        raise BadReply(f"unexpected record(s) {extra} in the reply")
    for key in expect.scores:
        score(content, key, holds.test)
    if expect.weight:
        count(metric_record(content, expect.weight, ("num-examples",)), "num-examples", holds.train, expect.weight)
    if expect.upload and (expect.required or expect.upload in content):
        want = {k: v for k, v in (sent or {}).items() if k not in expect.keep}
        arrays(content, expect.upload, want, expect.finite)
    return Checked(profiles(content))


def metric_record(content: RecordDict, key: str, keys: tuple[str, ...]):
    if key not in content.metric_records:
        raise BadReply(f"no MetricRecord {key!r} in the reply")
    rec = content.metric_records[key]
    if set(rec.keys()) != set(keys):
        raise BadReply(f"MetricRecord {key!r} holds {sorted(rec.keys())}, expected {sorted(keys)}")
    return rec


def count(rec, name: str, most: int, where: str) -> int:
    v = rec[name]
    if isinstance(v, float) and v.is_integer():   # Flower's MetricRecord keeps ints and floats alike
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= most:
        raise BadReply(f"{where}.{name}={v!r}: must be an integer in [0, {most}] (what the client's partition "
                       f"holds)")
    return v


def score(content: RecordDict, key: str, most: int) -> None:
    """An accuracy and the number of test images it was measured on."""
    rec = metric_record(content, key, ("acc", "num-examples"))
    acc = rec["acc"]
    if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not math.isfinite(acc) or not 0 <= acc <= 1:
        raise BadReply(f"{key}.acc={acc!r}: must be a finite number in [0, 1]")
    count(rec, "num-examples", most, key)


def arrays(content: RecordDict, key: str, want: dict[str, ArraySpec], finite: bool) -> None:
    """An ArrayRecord holding exactly the arrays `want` (names, shapes, dtypes), sized from its metadata before
    anything is decoded; decoded, each must be what its metadata says (and finite when asked)."""
    if key not in content.array_records:
        raise BadReply(f"no ArrayRecord {key!r} in the reply")
    rec = content.array_records[key]
    if set(rec.keys()) != set(want):
        raise BadReply(f"{key} holds arrays {sorted(rec.keys())}, expected {sorted(want)}")
    for name, arr in rec.items():
        spec, got = want[name], specs(ArrayRecord({name: arr}))[name]
        if got != spec or arr.stype != "numpy.ndarray" or len(arr.data) > spec.nbytes + NPY_HEADER:
            raise BadReply(f"{key}.{name} is {got.dtype}{list(got.shape)} in {len(arr.data)} bytes, expected "
                           f"{spec.dtype}{list(spec.shape)}")
    for name, arr in rec.items():
        try:
            a = arr.numpy()
        except Exception as e:  # noqa: BLE001 - any decoding failure is the reply's problem
            raise BadReply(f"{key}.{name} does not decode: {type(e).__name__}: {e}") from None
        if a.shape != want[name].shape or str(a.dtype) != want[name].dtype:
            raise BadReply(f"{key}.{name} decodes to {a.dtype}{list(a.shape)}, not what its metadata says")
        if finite and not np.isfinite(a).all():
            raise BadReply(f"{key}.{name} holds non-finite values")


def profiles(content: RecordDict) -> dict[str, PhaseRecord]:
    """The reply's profiles, by record name; who, what and when are left for the ledger to fill in."""
    out = {}
    for key in PROFILES:
        if key not in content:
            continue
        if key not in content.config_records:
            raise BadReply(f"{key} is not a ConfigRecord")
        try:
            out[key] = from_reply(dict(content.config_records[key]), "", 0, -1, "")
        except ValueError as e:
            raise BadReply(f"{key}: {e}") from None
    return out


@dataclass(frozen=True)
class Description:
    text: str
    client_id: Any                                # what the client says it is (read only without the engine's map)
    shots: tuple[np.ndarray, np.ndarray] | None   # image prompts: [k, d] class means, [k] counts


def description(content: RecordDict, max_chars: int, max_classes: int, feature_dim: int) -> Description:
    """A `query.describe` reply: its text (at most `max_chars`) and, if it sent them, its image prompts (at most
    `max_classes` rows of `feature_dim`; checked against its parsed classes by the roster)."""
    extra = sorted(set(content.keys()) - {"desc", "shots", *PROFILES})
    if extra:
        raise BadReply(f"unexpected record(s) {extra} in the reply")
    if "desc" not in content.config_records:
        raise BadReply("no ConfigRecord 'desc' in the reply")
    desc = content.config_records["desc"]
    text = desc.get("text")
    if not isinstance(text, str):
        raise BadReply(f"desc.text is a {type(text).__name__}, not text")
    if len(text) > max_chars:
        raise BadReply(f"desc.text has {len(text)} characters, more than limits.max_description_chars={max_chars}")
    shots = None
    if "shots" in content:
        if "shots" not in content.array_records:
            raise BadReply("shots is not an ArrayRecord")
        got = specs(content.array_records["shots"])
        mean, cnt = got.get("mean"), got.get("count")
        k = mean.shape[0] if mean is not None and len(mean.shape) == 2 else -1
        if (not 0 < k <= max_classes or cnt is None or mean.dtype not in ("float32", "float64")
                or cnt.dtype not in ("int32", "int64")):
            raise BadReply(f"shots hold {', '.join(f'{n} {s.dtype}{list(s.shape)}' for n, s in got.items())}, "
                           f"expected float mean [k, {feature_dim}] and integer count [k], 0 < k <= {max_classes}")
        want = {"mean": ArraySpec((k, feature_dim), mean.dtype), "count": ArraySpec((k,), cnt.dtype)}
        arrays(content, "shots", want, finite=True)
        rec = content.array_records["shots"]
        shots = (rec["mean"].numpy(), rec["count"].numpy())
    return Description(text, desc.get("client_id"), shots)
