"""Ditto (Li et al., 2021): FedAvg of a global ResNet-20 plus, on each client, a personal model trained on its labels
with lam/2 * ||v - w_global||^2 pulling it toward the global one. The personal model lives in `Context.state`; it is
what the client is scored with. New clients personalise the final global model the same way (needs labels)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp.strategy import FedAvg

from fedtina.config import NON_NEGATIVE, POSITIVE, bounded
from fedtina.client import image_model as body
from fedtina.client.call import ClientCall, pack, scored, update
from fedtina.server.federation import Federation
from fedtina.runtime.spec import arrays_record
from fedtina.server.strategy import start
from fedtina.methods.fedavg_full import full_model_state
from fedtina.methods.registry import Method, register

ZERO = "personalises the global model on the client's labels; this client has none"


@dataclass
class DittoOptions(body.LocalTraining):
    lam: float = bounded(0.1, NON_NEGATIVE)  # pull of the personal model toward the global one
    personal_epochs: int = bounded(1, POSITIVE)  # local epochs of the personal model per round


def run(fed: Federation, state: None) -> None:
    opts = fed.options("ditto", DittoOptions)
    fed.out.rounds["ditto"] = fed.spec.rounds
    result = start(fed, "ditto", FedAvg, arrays_record(full_model_state(fed)), train_type="train.ditto",
                   evaluate_type="evaluate.ditto", train_config=pack(opts), evaluate_config=pack(opts))
    fed.serve_new("ditto", result.arrays, "evaluate.ditto", zero=ZERO, **pack(opts))


def _restricted(call: ClientCall, state: dict) -> dict:
    """The global model with its classifier cut to the client's classes (the personal model's shape)."""
    spec = call.spec
    b, head = body.split(state)
    return body.join(b, body.rows(head, spec.class_ids, spec.class_names))


def _personalise(call: ClientCall, global_state: dict, imgs, epochs: int) -> dict:
    """`epochs` of the personal objective, from the client's personal model (or the global one the first time)."""
    anchor = _restricted(call, global_state)
    start_from = call.load_state("ditto") or anchor
    opts = call.options
    return body.train(start_from, imgs.train_x, imgs.train_y, mu=opts.lam, anchor=anchor, device=call.device,
                      **{**opts.kwargs(), "epochs": epochs})


def client_train(call: ClientCall):
    """The global model's local epochs (returned for FedAvg), then the personal model's (kept in the state)."""
    received, imgs = call.arrays(), call.images()
    new_global = body.train(received, imgs.train_x, imgs.train_global_y, device=call.device, **call.options.kwargs())
    call.save_state("ditto", _personalise(call, received, imgs, call.options.personal_epochs))
    return update(new_global, len(imgs.train_y))


def client_evaluate(call: ClientCall):
    """The personal model (a new client first personalises the received global model)."""
    received, imgs = call.arrays(), call.images()
    if call.cfg.get("new", False):
        personal = _personalise(call, received, imgs, call.options.personal_epochs)
    else:
        personal = call.load_state("ditto") or _restricted(call, received)
    return scored(body.accuracy(personal, imgs.test_x, imgs.test_y, device=call.device), len(imgs.test_y))


register(Method("ditto", run, DittoOptions, needs_images=True, zero_labels=ZERO,
                client_steps={"train.ditto": ("train", client_train), "evaluate.ditto": ("evaluate", client_evaluate)},
                order=100, summary="FedAvg global model + a personal model pulled toward it"))
