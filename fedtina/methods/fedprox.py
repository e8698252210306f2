"""FedProx (Li et al., 2020) with Flower's strategy: FedAvg of the whole ResNet-20 whose local objective adds
mu/2 * ||w - w_global||^2 (Flower sends `proximal-mu`; fedavg_full's client steps read it). New clients: the
final global model."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp.strategy import FedProx

from fedtina.config import NON_NEGATIVE, bounded
from fedtina.client import image_model as body
from fedtina.server.federation import Federation
from fedtina.methods import fedavg_full
from fedtina.methods.registry import Method, register


@dataclass
class FedProxOptions(body.LocalTraining):
    mu: float = bounded(0.01, NON_NEGATIVE)  # proximal weight


def run(fed: Federation, state: None) -> None:
    opts = fed.options("fedprox", FedProxOptions)
    fedavg_full.run_image_fedavg(fed, "fedprox", FedProx, opts, proximal_mu=float(opts.mu))


register(Method("fedprox", run, FedProxOptions, needs_images=True,
                client_steps={"train.fedprox": ("train", fedavg_full.client_train),
                              "evaluate.fedprox": ("evaluate", fedavg_full.client_evaluate)},
                order=60, summary="Flower's FedProx: FedAvg of the whole model with a proximal term"))
