"""The method registry: what the server plays, in which order, and which ClientApp handler serves which message.

A method is one module under `fedtina/methods/` that calls `register(Method(...))`: its options dataclass (defaults
and ranges; Hydra's ConfigStore gets them as `fedtina/method/<name>`, which `configs/method/<name>.yaml` places at
`method.<name>`), its server step, its resume state and its client steps (they get the options as `call.options`,
fedtina.client.call). Every module of the package is imported (fedtina/methods/__init__.py), the ServerApp hands the
requested methods (`run_plan`) to the engine (fedtina.server.loop.run_all), which plays them by `order` and keeps
each one's `state` in the run's checkpoint, and the ClientApp registers every client step by its message type
(`"<train|evaluate|query>.<action>"`). Nothing else needs an edit to add a method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import TYPE_CHECKING, Any, Callable

from fedtina.errors import FedtinaError

if TYPE_CHECKING:
    from fedtina.client.call import ClientCall
    from fedtina.runtime.spec import RunSpec
    from fedtina.server.federation import Federation

# A client step: (call) -> (records for the reply, the accuracy it measured or None). The ClientApp wraps it with
# the fault injection, the phase timer and the reply.
ClientStep = Callable[["ClientCall"], "tuple[dict[str, Any], float | None]"]


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[["Federation", Any], None]          # the server loop (fed, its state), on every client (old
                                                      # and new ones)
    options: type | None = None                       # dataclass of its options (None: it has none)
    check: Callable[[Any, dict], None] | None = None  # (its options, the whole plain config) -> raise FedtinaError
    client_steps: dict[str, tuple[str, ClientStep]] = field(default_factory=dict)  # message type -> (phase, step)
    results: tuple[str, ...] = ()                     # the result rows it writes (default: its name)
    requires: tuple[str, ...] = ()                    # methods whose steps it builds on (played too, unrecorded;
                                                      # it may read their state: `fed.state(name)`)
    state: type | None = None                         # dataclass of what it needs to resume where it stopped (saved
                                                      # in the checkpoint under its name; None: it restarts)
    describe: Callable[["Federation"], dict[str, Any]] | None = None   # config entries its played run adds to
                                                      # every client's `query.describe` message
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
    if method.state is not None and not (is_dataclass(method.state) and isinstance(method.state, type)):
        raise FedtinaError(f"method {method.name!r}: its state must be a dataclass (the checkpoint keeps its fields)")
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
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise FedtinaError(f"unknown method(s) {unknown}; valid: {list(REGISTRY)}")
    wanted = set(names) | {r for n in names for r in REGISTRY[n].requires}
    return [m for m in REGISTRY.values() if m.name in wanted]


def run_plan(spec: "RunSpec") -> list[Method]:
    """What a run plays (`plan` of its methods), once its methods that train on images are known to have them."""
    methods = plan(spec.methods)
    images = [n for n in spec.methods if REGISTRY[n].needs_images]
    if images and not spec.images_path:
        raise FedtinaError(f"method(s) {images} train on images and need images_path (the driver writes images.npy)")
    return methods
