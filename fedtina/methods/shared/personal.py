"""What FedPer, FedRep and FedBABU share: a body averaged by the server (strategy.BodyOnly) and a k-way head per
client over it. The global record holds the body and a fixed C-way starting head (the generic rows, as FedAvg's
global head): a client takes its classes' rows of it the first time and keeps its own head in `Context.state` after
that (FedPer, FedRep). New clients get the final body and fit a head on their labels; without labels they are
reported `unserved`.
"""

from __future__ import annotations

import numpy as np

from fedtina.config import HeadTrainConfig
from fedtina.client import image_model as body
from fedtina.client import ops as client_ops
from fedtina.client.call import ClientCall, pack, scored
from fedtina.server.federation import Federation
from fedtina.runtime.spec import arrays_record
from fedtina.server.strategy import BodyOnly, start
from fedtina.zoo.heads import Head
from fedtina.methods.fedavg_full import full_model_state

ZERO = "fits a head on the client's labels over the shared body; this client has none"


def run_body_method(fed: Federation, name: str, opts: body.LocalTraining) -> None:
    """`rounds` of FedAvg of the body on the old clients, then the new clients (head fitted on their labels)."""
    fed.out.rounds[name] = fed.spec.rounds
    ft = fed.finetune_config(upload=False)
    result = start(fed, name, BodyOnly, arrays_record(full_model_state(fed)), train_type=f"train.{name}",
                   evaluate_type=f"evaluate.{name}", train_config={**pack(opts), **ft}, evaluate_config=ft)
    fed.serve_new(name, result.arrays, f"evaluate.{name}", zero=ZERO, **ft)


def start_head(call: ClientCall, received: dict[str, np.ndarray], key: str | None) -> Head:
    """The client's head: its own from `Context.state[key]`, else its classes' rows of the received head."""
    spec = call.spec
    own = call.load_state(key) if key else None
    if own is not None:
        return Head(spec.class_names, own["weight"], own["bias"])
    _, full = body.split(received)
    return body.rows(full, spec.class_ids, spec.class_names)


def feature_data(call: ClientCall, body_state: dict[str, np.ndarray], imgs, train: bool = True,
                 test: bool = True) -> client_ops.ClientData:
    """The client's images as features of `body_state`, in the layout of fedtina.client.ops (only the
    parts asked for: a forward pass over the images is most of an evaluation's cost)."""
    spec = call.spec
    feats = lambda x, on: body.features(body_state, x if on else x[:0], call.device)  # noqa: E731
    return client_ops.ClientData(spec.class_ids, spec.class_names, feats(imgs.train_x, train),
                                 imgs.train_y if train else imgs.train_y[:0], feats(imgs.test_x, test),
                                 imgs.test_y if test else imgs.test_y[:0], imgs.train_global_y)


def fit_head(call: ClientCall, head: Head, data: client_ops.ClientData, cfg: HeadTrainConfig | None = None) -> Head:
    return client_ops.finetune_local(head, data, cfg or call.head_ft)


def score(head: Head, data: client_ops.ClientData):
    res = client_ops.evaluate_head(head, data)
    return scored(res["acc"], res["num-examples"])


def evaluate_step(key: str | None, finetune: bool):
    """The evaluate step of a personal-head method: the received body with the client's head (`key` in its state,
    or its rows of the received head), fine-tuned on its labels first when `finetune` (FedBABU) or when the client
    is new (it never trained a head)."""
    def step(call: ClientCall):
        received = call.arrays()
        body_state, _ = body.split(received)
        fit = finetune or bool(call.cfg.get("new", False))
        data = feature_data(call, body_state, call.images(), train=fit)
        head = start_head(call, received, None if call.cfg.get("new", False) else key)
        if fit:
            head = fit_head(call, head, data)
        return score(head, data)
    return step
