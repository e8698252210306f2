"""Progress of a long stage: a tqdm bar on a terminal, a plain log line every `every_s` seconds elsewhere (CI, nohup,
Hydra's log file), so a 10,000-client run can be followed either way."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

log = logging.getLogger("fedtina")


class Meter:
    """Counts `total` units of work. `update(n)` as they finish; `close()` (or the `with` block's end) at the end.
    With `lines=False` nothing is logged off a terminal (for stages that log their own lines already); with
    `enabled=False` nothing is shown at all (work too small to watch)."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", lines: bool = True, every_s: float = 15.0,
                 emit: Callable[[str], None] | None = None, tty: bool | None = None, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.every_s = int(total), desc, unit, every_s
        self.done, self.t0 = 0, time.monotonic()
        self._last = self.t0
        self._emit = emit or log.info
        tty = enabled and (sys.stderr.isatty() if tty is None else tty)
        self._bar = None
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        self._lines = enabled and lines and not tty

    def update(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self._emit(self.line())

    def line(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        return f"{self.desc}: {self.done}/{self.total} {self.unit} ({self.done / dt:.1f} {self.unit}/s)"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
