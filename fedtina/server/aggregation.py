"""The server rule of every method that runs a Flower strategy (fedtina.server.strategy.start): Flower's own
strategies, chosen by `aggregation.name`, and Flower's DP wrapper when `privacy.fedavg_clip` is set.

A method's strategy class (FedAvg, FedProx, BodyOnly) is combined with the rule's class by inheritance: the method
keeps what it configures (FedProx's proximal term, BodyOnly's carried head) and the rule decides `aggregate_train`.
The rule's own settings (Krum's f, the trimmed share) are set on the instance, since a combined class's constructor
is the method's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from fedtina.config import NON_NEGATIVE, Range, bounded
from fedtina.errors import FedtinaError

RULES = {"fedavg": FedAvg, "median": FedMedian, "trimmed_mean": FedTrimmedAvg, "krum": Krum,
         "multikrum": MultiKrum, "bulyan": Bulyan}


@dataclass
class AggregationConfig:
    name: str = "fedavg"        # fedavg | median | trimmed_mean | krum | multikrum | bulyan (Flower's strategies)
    num_malicious: int = bounded(0, NON_NEGATIVE)  # krum, multikrum, bulyan: the number of bad updates f they are built
                                                   # to withstand
    beta: float = bounded(0.2, Range(0, 0.5, open_hi=True))  # trimmed_mean: share of the values cut at each end, per
                                                             # coordinate
    select: int = bounded(0, NON_NEGATIVE)  # multikrum: updates averaged (0: m - f, m = updates per round)


def check(cfg: AggregationConfig, sampled: int) -> None:
    """One line naming the problem: an unknown rule, or too few updates per round (`sampled`) for its f."""
    if cfg.name not in RULES:
        raise FedtinaError(f"aggregation.name={cfg.name!r} is unknown; valid: {', '.join(RULES)}")
    f = int(cfg.num_malicious)
    if f < 0:
        raise FedtinaError(f"aggregation.num_malicious={f}: must be >= 0")
    if not 0.0 <= cfg.beta < 0.5:
        raise FedtinaError(f"aggregation.beta={cfg.beta}: must be in [0, 0.5)")
    need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(cfg.name, 1)
    if sampled < need:
        raise FedtinaError(f"aggregation.name={cfg.name} with num_malicious={f} needs at least {need} updates per "
                           f"round; the old clients sampled per round are {sampled}")
    if cfg.name == "multikrum" and not 0 <= cfg.select <= sampled:
        raise FedtinaError(f"aggregation.select={cfg.select}: must be in [0, {sampled}] (0: m - f)")


@lru_cache(maxsize=None)
def _combined(base: type, rule: type) -> type:
    return type(f"{base.__name__}With{rule.__name__}", (base, rule), {})


def with_rule(base: type, cfg: AggregationConfig) -> type:
    """`base` (a FedAvg subclass) whose `aggregate_train` is the configured rule's."""
    rule = RULES[cfg.name]
    if rule is FedAvg or issubclass(base, rule):
        return base
    return rule if base is FedAvg else _combined(base, rule)


def configure(strategy, cfg: AggregationConfig, sampled: int) -> None:
    """Set the rule's own settings on a strategy built by `with_rule`."""
    f = int(cfg.num_malicious)
    if cfg.name in ("krum", "multikrum", "bulyan"):
        strategy.num_malicious_nodes = f
    if cfg.name == "multikrum":
        strategy.num_nodes_to_select = int(cfg.select) or sampled - f
    if cfg.name == "trimmed_mean":
        strategy.beta = float(cfg.beta)
