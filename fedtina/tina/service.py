"""Tina's service, without Flower: generate heads for described clients, gate what they upload, admit the accepted
heads to the zoo, refresh Tina on the grown zoo, and restore a run's zoo for a resume.

The Flower method (fedtina/methods/tina.py: its cohort loop, messages and bookkeeping) and the experiments that replay
the loop under control (uploads, attacks, privacy; their clients in fedtina/tina/offline.py) both call it, so the
serving loop exists once.

* Generation: one sampler call per `GENERATE_BATCH` label sets, batched by label-set size (a batch pads to its
  largest set, and the sampler's cost is in the padded tokens). A head does not depend on the other sets of its
  batch: its noise is keyed by its label set.
* The gate: `fedtina.server.gate.check_head`, against the selection head and the head the server sent, on the
  server's held-out images (`fedtina.server.reference`); a malformed upload is refused, never fatal.
* Admission: accepted heads are appended to the zoo (the run's ZooStore, or an experiment's in-memory `ZooList`) and,
  with a row bank (method.tina.bank), to its rows.
* Echoes: an upload that did not move from the head the server sent carries nothing Tina does not already know;
  it is not appended (the caller counts it). Refreshing a generator on its own samples is the self-consuming loop
  that drifts (fedtina/tina/probe.py).
* Refresh: `tina.train.refresh`, warm-started from the current Tina, on the zoo (plus uploads not admitted, for an
  experiment's what-if). With a probe set, the refreshed Tina replaces the current one only when its probe accuracy
  is not lower; otherwise it is dropped (rolled back). An adopted Tina is saved atomically when asked (a resumed
  run restarts from that file).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from fedtina.errors import FedtinaError
from fedtina.server.gate import CheckResult, HeadCheckConfig, check_head
from fedtina.server.reference import ServerReference
from fedtina.tina.probe import ProbeSet
from fedtina.zoo.heads import Head, RowBank
from fedtina.zoo.store import ZooEntry

log = logging.getLogger("fedtina.federation")
GENERATE_BATCH = 2048   # heads per sampler call: bounds the sampler's memory, and a stop request waits for one batch
ECHO_MOVE = 1e-6        # relative parameter change below which an upload is the sent head itself (float32 is exact
                        # through the transport, so an unchanged head moves 0; this only absorbs rounding)


@dataclass(frozen=True)
class Upload:
    """A head a client sends back for the zoo, with what the server knows about it."""

    client: int                  # the client's id
    names: tuple[str, ...]       # the label set it described (its head's classes)
    class_ids: tuple[int, ...]
    sent: Head                   # what Tina generated for it
    head: Head                   # what it uploads
    bad: bool = False            # an experiment's attacker
    images: float = float("nan")  # labelled images per class it was fitted on (the server's partition says so)

    @property
    def moved(self) -> float:
        """How far the head moved from the one the server sent: ||head - sent|| / ||sent|| over weights and biases."""
        a = np.concatenate([np.ravel(self.head.weight), np.ravel(self.head.bias)]).astype(np.float64)
        b = np.concatenate([np.ravel(self.sent.weight), np.ravel(self.sent.bias)]).astype(np.float64)
        if a.shape != b.shape:
            return float("inf")
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))

    @property
    def echo(self) -> bool:
        """The sent head came back unchanged: nothing to learn from it."""
        return self.moved < ECHO_MOVE

    def entry(self, metrics: dict[str, float] | None = None) -> ZooEntry:
        """The zoo entry, with its evidence (images per class, how far it moved) beside the caller's metrics."""
        evidence = {"images_per_class": float(self.images), "moved": self.moved}
        return ZooEntry(class_names=self.names, params=self.head.params(), metrics={**evidence, **(metrics or {})},
                        source=f"client:{self.client}")


@dataclass(frozen=True)
class RefreshDecision:
    """A refresh's outcome: adopted or rolled back, with Tina's probe accuracy before and after (NaN: no probe)."""

    adopted: bool
    before: float
    after: float


class ZooList:
    """An in-memory zoo (the prepared zoo's entries, then the admitted uploads): an experiment never writes the
    cached zoo."""

    def __init__(self, entries: Iterable[ZooEntry]) -> None:
        self._entries = list(entries)

    def entries(self) -> list[ZooEntry]:
        return list(self._entries)

    def append_many(self, entries: Iterable[ZooEntry]) -> None:
        self._entries.extend(entries)

    def __len__(self) -> int:
        return len(self._entries)


def uploaded_rows(zoo) -> RowBank:
    """The row bank of the uploads in a zoo (its `client:` entries: a resumed run rebuilds it from there), for the
    classes no prepared zoo head holds: a class Tina was trained on keeps Tina's row (banking those measured worse:
    a row fine-tuned against one client's other classes, averaged, is a worse row for the next)."""
    entries = zoo.entries()
    bank = RowBank(skip=frozenset(n for e in entries if not e.source.startswith("client:") for n in e.class_names))
    for entry in entries:
        if entry.source.startswith("client:"):
            bank.add(entry.head)
    return bank


def malformed(exc: Exception) -> CheckResult:
    """The gate's verdict on an upload that cannot even be read or checked."""
    return CheckResult(False, f"malformed upload: {type(exc).__name__}: {exc}", None, None)


@dataclass
class TinaService:
    """Tina behind the server. `zoo`: entries() / append_many() / len() (a ZooStore or a ZooList); `norm_scale`: the
    gate's plausible row norm, fixed for a run (the gate does not drift with what it admits)."""

    tina: Any                    # TinaGenerator
    assets: Any                  # build_assets' result: features (the gate), shots and descriptions (refresh)
    reference: ServerReference
    zoo: Any
    check_cfg: HeadCheckConfig
    norm_scale: float
    prompt: str = "text"         # text | images | both: what a client's classes are described by (method.tina)
    sample_steps: int = 0        # DDIM steps; 0: the Tina's own
    gen_seed: int = 0
    bank: RowBank | None = None  # method.tina.bank: served rows of uploaded classes
    probe: ProbeSet | None = None  # a refresh is adopted only if it does not lower this score (None: always)
    probe_now: float | None = field(default=None, repr=False)  # the current Tina's probe score, once computed

    # ---------------------------------------------------------------- generation
    def generate(self, label_sets: Sequence[Sequence[str]], shots: Sequence | None = None, seed: int | None = None,
                 stop: Callable[[], None] | None = None, meter=None) -> list[Head]:
        """Tina's head for each label set, in the given order (`shots[i]`: set i's image prompts, used unless the
        prompt is text). `stop()` runs before each sampler call (it raises to interrupt), `meter.update(n)` after."""
        order = sorted(range(len(label_sets)), key=lambda i: len(label_sets[i]))
        seed = self.gen_seed if seed is None else seed
        heads: dict[int, Head] = {}
        for start in range(0, len(order), GENERATE_BATCH):
            if stop is not None:
                stop()
            batch = order[start : start + GENERATE_BATCH]
            prompts = [shots[i] for i in batch] if shots is not None and self.prompt != "text" else None
            made = self.tina.generate([list(label_sets[i]) for i in batch], steps=self.sample_steps or None,
                                      seed=seed, shots=prompts, use_names=self.prompt != "images")
            heads.update(zip(batch, made))
            if meter is not None:
                meter.update(len(batch))
        return [heads[i] for i in range(len(label_sets))]

    def serve(self, label_sets: Sequence[Sequence[str]], **kwargs) -> list[Head]:
        """What the server sends: `generate`'s heads, with the row bank's rows over them when there is one."""
        heads = self.generate(label_sets, **kwargs)
        return [self.bank.over(h) for h in heads] if self.bank is not None else heads

    # ---------------------------------------------------------------- the gate and the zoo
    def check(self, upload: Upload) -> CheckResult:
        """The gate's verdict on one upload (see fedtina/server/gate.py)."""
        try:
            d = int(self.assets.bank.features.shape[1])
            return check_head(upload.head, upload.names, d, self.reference.selection(upload.names),
                              *self.reference.val_data(upload.class_ids), self.norm_scale, self.check_cfg,
                              sent=upload.sent)
        except Exception as e:  # noqa: BLE001 - as the server does: a malformed upload is refused, never fatal
            return malformed(e)

    def gate(self, uploads: Iterable[Upload]) -> list[CheckResult]:
        return [self.check(u) for u in uploads]

    def admit(self, entries: Sequence[ZooEntry]) -> None:
        """Accepted heads join the zoo (and the row bank), in the given order: a refresh trains on that order."""
        self.zoo.append_many(entries)
        if self.bank is not None:
            for e in entries:
                self.bank.add(e.head)

    # ---------------------------------------------------------------- refresh
    def refreshed(self, steps: int, uploads: Iterable[Upload] = (), seed: int | None = None) -> "TinaService":
        """This service with Tina refreshed for `steps` steps on the zoo plus `uploads` (not admitted: an
        experiment's what-if); `seed`: the refresh's batches and noise, default Tina's own."""
        from fedtina.tina.train import refresh

        entries = self.zoo.entries() + [u.entry() for u in uploads]
        new = refresh(self.tina, entries, steps, shots=self.assets.shots, descriptions=self.assets.descriptions,
                      seed=seed)
        return dataclasses.replace(self, tina=new)

    def probe_score(self, tina: Any = None) -> float:
        """`tina`'s (default: the current Tina's) accuracy on the probe set, generating as the server serves."""
        tina = self.tina if tina is None else tina
        return self.probe.score(lambda sets: tina.generate(sets, steps=self.sample_steps or None, seed=self.gen_seed,
                                                           use_names=True))

    def refresh(self, steps: int, save: Iterable[Path] = ()) -> RefreshDecision:
        """Refresh Tina on the zoo; with a probe set, adopt the refreshed Tina only when its probe accuracy is not
        below the current one's (a tie adopts: the zoo it learnt from is the newer). An adopted Tina is written
        atomically to each of `save` (temp file + os.replace); a rolled-back one is dropped."""
        from fedtina.tina.train import save_checkpoint

        candidate = self.refreshed(steps).tina
        before = after = float("nan")
        if self.probe is not None and len(self.probe):
            if self.probe_now is None:
                self.probe_now = self.probe_score()
            before, after = self.probe_now, self.probe_score(candidate)
        decision = RefreshDecision(not after < before, before, after)
        if decision.adopted:
            self.tina, self.probe_now = candidate, (after if self.probe is not None else None)
            for path in save:
                save_checkpoint(path, self.tina)
        return decision


def restore_zoo(zoo_dir: Path, size: int) -> None:
    """Back to a checkpoint's zoo: a kill between a cohort's zoo append and its checkpoint leaves heads that the
    resumed cohort will upload again. The append-only store is rebuilt from its first `size` entries (same ids); the
    longer one is kept beside it, renamed."""
    from fedtina.zoo.store import ZooStore

    with ZooStore(zoo_dir) as zoo:
        n = len(zoo)
        if n < size:
            raise FedtinaError(f"the run's zoo {zoo_dir} has {n} entries, fewer than the checkpoint's {size}: it was "
                               f"modified outside the run; the run cannot be resumed")
        keep = zoo.entries(zoo.ids()[:size]) if n > size else None
    if keep is None:
        return
    aside = zoo_dir.with_name(f"{zoo_dir.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
    zoo_dir.rename(aside)
    with ZooStore(zoo_dir) as zoo:
        zoo.append_many(keep)
    log.info("[tina] resume: the run's zoo had %d heads, %d from an unfinished cohort; continuing from the "
             "checkpoint's %d (the longer zoo is kept in %s)", n, n - size, size, aside)
