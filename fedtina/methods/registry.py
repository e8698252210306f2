"""The method registry: what the server plays, in which order, and which ClientApp handler serves which message.

A method is one module under `fedtina/methods/` that calls `register(Method(...))`: its options dataclass (defaults
and ranges; Hydra's ConfigStore gets them as `fedtina/method/<name>`, which `configs/method/<name>.yaml` places at
`method.<name>`), its server step and its client steps (they get the options as `call.options`, fedtina.client.call).
Every module of the package is imported (fedtina/methods/__init__.py), the ServerApp plays the requested methods by
`order`, and the ClientApp registers every client step by its message type (`"<train|evaluate|query>.<action>"`).
Nothing else needs an edit to add a method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from fedtina.errors import FedtinaError

if TYPE_CHECKING:
    from fedtina.client.call import ClientCall
    from fedtina.server.federation import Federation, Progress

# A client step: (call) -> (records for the reply, the accuracy it measured or None). The ClientApp wraps it with
# the fault injection, the phase timer and the reply.
ClientStep = Callable[["ClientCall"], "tuple[dict[str, Any], float | None]"]


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[["Federation", "Progress"], None]   # the server loop, on every client (old and new ones)
    options: type | None = None                       # dataclass of its options (None: it has none)
    check: Callable[[Any, dict], None] | None = None  # (its options, the whole plain config) -> raise FedtinaError
    client_steps: dict[str, tuple[str, ClientStep]] = field(default_factory=dict)  # message type -> (phase, step)
    results: tuple[str, ...] = ()                     # the result rows it writes (default: its name)
    requires: tuple[str, ...] = ()                    # methods whose steps it builds on (played too, unrecorded)
    needs_images: bool = False                        # its clients train on raw images (the driver writes them)
    zero_labels: str = ""                             # why it cannot serve a new client without labels ("": it can)
    order: int = 1000                                 # where it plays and is reported (lower: earlier)
    summary: str = ""                                 # what it is, in a line (logged when it starts)

    @property
    def rows(self) -> tuple[str, ...]:
        return self.results or (self.name,)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise FedtinaError(f"method {method.name!r} is registered twice")
    steps = {t for m in REGISTRY.values() for t in m.client_steps}
    clash = steps & set(method.client_steps)
    if clash:
        raise FedtinaError(f"method {method.name!r} registers message type(s) {sorted(clash)} already taken")
    REGISTRY[method.name] = method
    if method.options is not None:
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().store(group="fedtina/method", name=method.name, node=asdict(method.options()))
    for name in sorted(REGISTRY, key=lambda n: (REGISTRY[n].order, n)):   # keep REGISTRY in play order
        REGISTRY[name] = REGISTRY.pop(name)
    return method


def plan(names: list[str]) -> list[Method]:
    """The requested methods and those they require, in registration order."""
    wanted = set(names) | {r for n in names if n in REGISTRY for r in REGISTRY[n].requires}
    return [m for m in REGISTRY.values() if m.name in wanted]
