"""FedRoD (Chen & Chao, 2022): a shared body and a generic head trained with the balanced softmax (logits shifted by
the log of the client's class prior, so the global head learns class-balanced scores from skewed clients), both
averaged; plus a personal head on top. Here the personal head is the generic rows fine-tuned on the client's labels
with an L2 pull toward them (a personal offset added to the generic logits, in one linear layer). New clients
without labels are served by the generic head alone."""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedAvg

from fedtina.client import image_model as body
from fedtina.client.call import ClientCall, pack, update
from fedtina.server.federation import Federation
from fedtina.runtime.spec import arrays_record
from fedtina.server.strategy import start
from fedtina.methods.shared import personal
from fedtina.methods.fedavg_full import full_model_state
from fedtina.methods.registry import Method, register


def run(fed: Federation, state: None) -> None:
    opts = fed.options("fedrod", body.LocalTraining)
    fed.out.rounds["fedrod"] = fed.spec.rounds
    ft = fed.finetune_config(upload=False)
    result = start(fed, "fedrod", FedAvg, arrays_record(full_model_state(fed)), train_type="train.fedrod",
                   evaluate_type="evaluate.fedrod", train_config=pack(opts), evaluate_config=ft)
    fed.serve_new("fedrod", result.arrays, "evaluate.fedrod", **ft)


def client_train(call: ClientCall):
    received, imgs = call.arrays(), call.images()
    count = np.bincount(imgs.train_global_y, minlength=len(received["fc.bias"]))
    adjust = np.where(count > 0, np.log(np.maximum(count, 1)), -1e4).astype(np.float32)   # balanced softmax
    new = body.train(received, imgs.train_x, imgs.train_global_y, logit_adjust=adjust, device=call.device,
                     **call.options.kwargs())
    return update(new, len(imgs.train_y))


def client_evaluate(call: ClientCall):
    """The generic rows plus the personal offset fitted on the client's labels (none without labels)."""
    received, imgs = call.arrays(), call.images()
    body_state, _ = body.split(received)
    data = personal.feature_data(call, body_state, imgs)
    head = personal.fit_head(call, personal.start_head(call, received, None), data)
    return personal.score(head, data)


register(Method("fedrod", run, body.LocalTraining, needs_images=True,
                client_steps={"train.fedrod": ("train", client_train),
                              "evaluate.fedrod": ("evaluate", client_evaluate)},
                order=110, summary="shared body + balanced-softmax generic head, personal offset per client"))
