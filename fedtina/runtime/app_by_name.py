"""The ClientApp goes to the Ray actors by name, not by value.

Flower 1.42's Ray backend submits every message as `actor.run.remote(app_fn, message, cid, context)`, where `app_fn`
is a closure over the ClientApp object, so cloudpickle serialises the ClientApp by value with every message,
handler wrappers (closures over the mods) included, and every actor unpickles it again. At 10,000 clients that was
about 40% of the driver's busy time in the describe phase (py-spy). `install(ref)` makes the backend send
`functools.partial(load_app, ref)` instead: a module function and a string, pickled by reference; the actor imports
the module once and gets the same ClientApp object from then on.

Applied by the launcher before the engine starts; flwr is pinned to 1.42.0.
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Any

_ORIGINAL: dict[str, Any] = {}
_REF: list[str] = []


def load_app(ref: str) -> Any:
    """`"module:attr"` -> that object (the module imported once per process)."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def install(ref: str) -> None:
    """Backends built from now on send `partial(load_app, ref)` as their ClientApp loader (idempotent)."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    _REF[:] = [ref]
    if _ORIGINAL:
        return
    _ORIGINAL["build"] = RayBackend.build

    def build(self, app_fn) -> None:
        _ORIGINAL["build"](self, app_fn)
        self.app_fn = partial(load_app, _REF[0])

    RayBackend.build = build
