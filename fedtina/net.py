"""A fast reachability probe, so that no code path waits minutes on a download that cannot happen."""

from __future__ import annotations

import os
import socket
from functools import lru_cache


@lru_cache(maxsize=None)
def can_reach(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    """True when a TCP connection to host:port opens within `timeout_s`. FEDTINA_OFFLINE=1 forces False."""
    if os.environ.get("FEDTINA_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
