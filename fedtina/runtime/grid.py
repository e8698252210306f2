"""The ServerApp's view of the Grid: sends that can be stopped, and timeouts that count from when a client could
start working.

Flower's `Grid.send_and_receive` gives a whole batch of messages one deadline. Under the simulation engine the
ClientApps run on a pool of `concurrency` Ray actors that take the queued messages in order, so with one deadline for
the batch, healthy clients queued behind slow ones time out without ever having run, and are blamed for it.
`GuardedGrid` pushes the batch at once (no throughput is lost) but models that queue: a message counts as started
once fewer than `concurrency` messages pushed before it are still unanswered (messages that timed out earlier keep
their actor busy until their late reply arrives), and its own `timeout` runs from then. A message that never gets
an actor (every actor still held by timed-out work `timeout` seconds after the last one timed out) is reported as
`not_started`, not as timed out.

Every wait also watches a `StopFlag` (Ctrl-C, SIGTERM, a dead backend): it raises `Interrupted` within one poll.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable

from fedtina.errors import FedtinaError
from fedtina.progress import Meter


class Interrupted(FedtinaError):
    """The run was asked to stop (signal or a failed backend); what finished before is still reported."""


class StopFlag:
    """A thread-safe 'please stop' with the reason of the first request."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Interrupted(f"run stopped: {self.reason}")

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


@dataclass
class Delivery:
    """What became of one message: `ok` (reply in time; it may still be an error reply), `timed_out` (it had an
    actor for `timeout` seconds without answering) or `not_started` (it never got an actor)."""

    status: str
    reply: Any = None            # flwr Message, or None
    waited_s: float = 0.0        # seconds since it could start (timed_out) or since it was pushed (not_started)

    @property
    def detail(self) -> str:
        if self.status == "timed_out":
            return f"no reply within timeout_s={self.waited_s:g} of starting work"
        if self.status == "not_started":
            return (f"never started: every client actor was still busy with timed-out work after "
                    f"{self.waited_s:.0f} s")
        return ""


FULL_PULL_S = 2.0        # the whole queue is asked at least this far apart...
FULL_PULL_PER_ID = 2e-4  # ...and this much per queued message: at ~95,000 queued a full pull cost over 1 s of driver
PROGRESS_MIN = 1000   # batches this large get a progress bar / progress lines


class GuardedGrid:
    """Wraps a Flower Grid (everything else is delegated). `exchange` returns a Delivery per node; the Flower
    strategies' `send_and_receive` goes through it too, and `last` keeps the Deliveries of the latest call.

    `concurrency()` is the size of the actor pool (None: unknown, e.g. under a deployment runtime where every node
    works on its own; then each message starts when pushed). `order` sorts a batch into the engine's queue order
    (the simulation engine enqueues by partition id)."""

    def __init__(self, grid, stop: StopFlag, concurrency: Callable[[], int | None] = lambda: None,
                 order: Callable[[int], int] | None = None, poll_s: float = 0.02) -> None:
        self._grid, self.stop = grid, stop
        self.concurrency, self.order, self.poll_s = concurrency, order, poll_s
        self._stale: list[str] = []         # pushed earlier, no reply yet: they hold actors ahead of new work
        self.last: dict[int, Delivery] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        return [d.reply for d in self.exchange(messages, timeout).values() if d.status == "ok"]

    def exchange(self, messages: Iterable, timeout: float | None) -> dict[int, Delivery]:
        """Push `messages` (one per node), wait as the module docstring says; a Delivery per destination node."""
        msgs = list(messages)
        if self.order is not None:
            msgs.sort(key=lambda m: self.order(m.metadata.dst_node_id))
        timeout = float("inf") if timeout is None else float(timeout)
        self.stop.check()
        ids = list(self._grid.push_messages(msgs))
        node_of = dict(zip(ids, (m.metadata.dst_node_id for m in msgs)))
        # Kept so that a poll costs the front of the queue, not the whole batch (100,000 messages at a time):
        queued = dict.fromkeys([*self._stale, *ids])   # no reply yet, in the engine's order (timed-out ones too)
        started: dict[str, float] = {}   # when each message got an actor
        running: dict[str, float] = {}   # started, no Delivery yet
        out: dict[str, Delivery] = {}
        pushed_at = last_event = last_full = time.monotonic()
        # Asking the state for replies costs per asked id, so each poll asks only the front of the queue (where
        # replies can be: the engine works through it in order), a window wider than the replies one poll interval
        # brings, and all of it rarely (a safety net). Polls stay frequent: one costs the window, not the batch
        # (a poll interval that grew with the batch capped 100,000-message batches at ~320 replies/s).
        window = max(64, 8 * (self.concurrency() or len(ids)))
        big = len(ids) >= PROGRESS_MIN
        desc = f"[{msgs[0].metadata.group_id}] {msgs[0].metadata.message_type}" if big else ""
        meter = Meter(len(ids), desc, unit="replies", enabled=big)
        try:
            while True:
                n_out = len(out)
                if time.monotonic() - last_full >= max(FULL_PULL_S, FULL_PULL_PER_ID * len(queued)):
                    ask, last_full = list(queued), time.monotonic()
                else:
                    ask = list(islice(queued, window))
                for rep in self._grid.pull_messages(ask) if ask else ():
                    mid = rep.metadata.reply_to_message_id
                    if queued.pop(mid, False) is None:
                        if mid in node_of and mid not in out:   # else the late reply of a timed-out message
                            out[mid] = Delivery("ok", rep, time.monotonic() - started.get(mid, pushed_at))
                            running.pop(mid, None)
                        last_event = time.monotonic()
                now = time.monotonic()
                p = self.concurrency() or len(queued)
                for mid in islice(queued, p):
                    if mid in node_of and mid not in started:
                        started[mid] = running[mid] = last_event = now
                for mid in [m for m, t0 in running.items() if now - t0 > timeout]:
                    out[mid] = Delivery("timed_out", None, timeout)
                    del running[mid]
                    last_event = now   # the queue behind it now waits for timed-out work: give it `timeout`
                meter.update(len(out) - n_out)
                if len(out) == len(ids):
                    break
                if not running and now - last_event > timeout:
                    for mid in ids:
                        if mid not in out:
                            out[mid] = Delivery("not_started", None, now - pushed_at)
                    break
                if self.stop.wait(self.poll_s):
                    self._stale = list(queued)
                    self.stop.check()
        finally:
            meter.close()
        self._stale = list(queued)   # no reply yet: they keep their actors busy, later work queues behind them
        self.last = {node_of[i]: d for i, d in out.items()}
        return self.last
