"""FedPer (Arivazhagan et al., 2019): body and personal head trained together each round; the server averages the
body only, the head stays with the client (`Context.state`)."""

from __future__ import annotations

from fedtina.client import image_model as body
from fedtina.client.call import ClientCall, update
from fedtina.server.federation import Federation
from fedtina.methods.shared import personal
from fedtina.methods.registry import Method, register


def run(fed: Federation, state: None) -> None:
    personal.run_body_method(fed, "fedper", fed.options("fedper", body.LocalTraining))


def client_train(call: ClientCall):
    received, imgs = call.arrays(), call.images()
    head = personal.start_head(call, received, "fedper")
    body_state, _ = body.split(received)
    state = body.train(body.join(body_state, head), imgs.train_x, imgs.train_y, device=call.device,
                       **call.options.kwargs())
    new_body, new_head = body.split(state)
    call.save_state("fedper", {"weight": new_head.weight, "bias": new_head.bias})
    return update(new_body, len(imgs.train_y))


register(Method("fedper", run, body.LocalTraining, needs_images=True,
                zero_labels=personal.ZERO,
                client_steps={"train.fedper": ("train", client_train),
                              "evaluate.fedper": ("evaluate", personal.evaluate_step("fedper", finetune=False))},
                order=70, summary="shared body (FedAvg), personal head trained with it"))
