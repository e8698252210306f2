"""FedBABU (Oh et al., 2022): the head is shared and frozen during federated training (here the generic rows,
FedAvg's starting head), only the body learns and is averaged; each client personalises by fine-tuning the head on
its labels before it is scored (every round, for the curve, and as new client)."""

from __future__ import annotations

from fedtina.client import image_model as body
from fedtina.client.call import ClientCall, update
from fedtina.server.federation import Federation
from fedtina.methods.shared import personal
from fedtina.methods.registry import Method, register


def run(fed: Federation, state: None) -> None:
    personal.run_body_method(fed, "fedbabu", fed.options("fedbabu", body.LocalTraining))


def client_train(call: ClientCall):
    received, imgs = call.arrays(), call.images()
    head = personal.start_head(call, received, None)   # the shared frozen head's rows, never a personal one
    body_state, _ = body.split(received)
    state = body.train(body.join(body_state, head), imgs.train_x, imgs.train_y, train_head=False,
                       device=call.device, **call.options.kwargs())
    return update(body.split(state)[0], len(imgs.train_y))


register(Method("fedbabu", run, body.LocalTraining, needs_images=True,
                zero_labels=personal.ZERO,
                client_steps={"train.fedbabu": ("train", client_train),
                              "evaluate.fedbabu": ("evaluate", personal.evaluate_step(None, finetune=True))},
                order=90, summary="shared body trained under a frozen head; the head fine-tuned per client"))
