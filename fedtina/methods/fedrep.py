"""FedRep (Collins et al., 2021): each round the client first fits its personal head with the body frozen, then
trains the body with that head frozen; the server averages the body only. The head fit runs on body features
(fedtina.zoo.heads, `head_steps` full-batch steps)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedtina.config import POSITIVE, bounded
from fedtina.client import image_model as body
from fedtina.client.call import ClientCall, update
from fedtina.server.federation import Federation
from fedtina.methods.shared import personal
from fedtina.methods.registry import Method, register


@dataclass
class FedRepOptions(body.LocalTraining):
    head_steps: int = bounded(30, POSITIVE)  # head updates before the body epochs (body frozen)


def run(fed: Federation, state: None) -> None:
    opts = fed.options("fedrep", FedRepOptions)
    personal.run_body_method(fed, "fedrep", opts)


def client_train(call: ClientCall):
    received, imgs = call.arrays(), call.images()
    body_state, _ = body.split(received)
    head = personal.start_head(call, received, "fedrep")
    cfg = replace(call.head_ft, steps=call.options.head_steps, select=False)
    head = personal.fit_head(call, head, personal.feature_data(call, body_state, imgs, test=False), cfg)
    state = body.train(body.join(body_state, head), imgs.train_x, imgs.train_y, train_head=False,
                       device=call.device, **call.options.kwargs())
    call.save_state("fedrep", {"weight": head.weight, "bias": head.bias})
    return update(body.split(state)[0], len(imgs.train_y))


register(Method("fedrep", run, FedRepOptions, needs_images=True, zero_labels=personal.ZERO,
                client_steps={"train.fedrep": ("train", client_train),
                              "evaluate.fedrep": ("evaluate", personal.evaluate_step("fedrep", finetune=False))},
                order=80, summary="shared body (FedAvg), personal head fitted first each round"))
