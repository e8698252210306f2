"""FedAvg (Flower's strategy) of one global head over every class, on the clients' frozen features; and fedavg_ft,
that head's rows fine-tuned by each client at the end.

Each round every old client evaluates the aggregate k-way over its own classes (its rows of the global head), so
the method has an accuracy curve; the last round's scores are its result. New clients get the final global head
(fedavg) or fine-tune its rows on their labels (fedavg_ft).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.serverapp.strategy import FedAvg

from fedtina.config import POSITIVE, bounded
from fedtina.client import ops as client_ops
from fedtina.client.call import ClientCall, pack, scored, update
from fedtina.server.federation import Federation
from fedtina.server.ledger import MethodFailed
from fedtina.runtime.spec import head_record, record_head
from fedtina.server.strategy import start
from fedtina.zoo.heads import Head
from fedtina.methods.registry import Method, register


@dataclass
class FedAvgOptions:
    epochs: int = bounded(5, POSITIVE)  # local epochs per round (SGD on frozen features)
    lr: float = bounded(0.1, POSITIVE)
    batch_size: int = bounded(32, POSITIVE)


@dataclass
class FedAvgState:
    head: dict | None = None   # {"class_names", "weight", "bias"} of the final global head (fedavg_ft starts there)


def global_head(fed: Federation) -> Head:
    """The FedAvg starting point: a head over every class of the dataset (row i = class id i): the generic row of a
    seen class, the nearest-name seen row for an unseen one (the selection baseline's rule)."""
    return fed.reference.global_head()


def restricted(head: Head, clients) -> dict[int, Head]:
    """Each client's rows of a global head, by node."""
    return {c.node_id: client_ops.restrict_head(head.weight, head.bias, c.class_ids, c.names) for c in clients}


def run_fedavg(fed: Federation, state: FedAvgState) -> None:
    opts = fed.options("fedavg", FedAvgOptions)
    init = global_head(fed)
    record = "fedavg" in fed.spec.methods
    if record:
        fed.out.rounds["fedavg"] = fed.spec.rounds
    # with fedavg_ft alone, the FedAvg rounds are part of fedavg_ft's cost (and progress lines)
    result = start(fed, "fedavg" if record else "fedavg_ft", FedAvg, head_record(init), train_type="train.fedavg",
                   evaluate_type="evaluate.fedavg", record_results=record,
                   train_config=pack(opts))
    if "weight" not in result.arrays:  # Flower keeps the initial arrays out of its Result until a round aggregates
        raise MethodFailed(f"no FedAvg round had a client update to aggregate (every client failed in all "
                           f"{fed.spec.rounds} rounds)")
    head = record_head(result.arrays, init.class_names)
    state.head = {"class_names": list(head.class_names), "weight": head.weight.tolist(), "bias": head.bias.tolist()}
    if record:
        rnd = fed.spec.rounds
        clients = fed.usable(fed.new, ["fedavg"], rnd)
        fed.score(fed.send_heads("evaluate", restricted(head, clients), "fedavg", rnd, fail=["fedavg"]), "fedavg", rnd)
        if clients:
            fed.progress("fedavg", None, rnd, f"new clients: {fed.acc_line('fedavg', rnd, new=True)}")


ZERO_FT = "fine-tunes the global head's rows on the client's labels; this client has none"


def run_fedavg_ft(fed: Federation, state: None) -> None:
    """The final FedAvg head's rows for each client's classes (from its description), fine-tuned locally: old and
    new clients alike."""
    h = fed.state("fedavg").head
    if h is None:
        why = fed.out.method_status.get("fedavg", "see the log").removeprefix("failed: ")
        raise MethodFailed(f"its FedAvg rounds failed ({why})")
    head = Head(tuple(h["class_names"]), np.asarray(h["weight"], np.float32), np.asarray(h["bias"], np.float32))
    rnd = fed.spec.rounds
    fed.out.rounds["fedavg_ft"] = rnd
    clients = fed.labelled("fedavg_ft", fed.usable(fed.nodes, ["fedavg_ft"], rnd), rnd, ZERO_FT)
    ok = fed.send_heads("finetune", restricted(head, clients), "fedavg_ft", rnd, fail=["fedavg_ft"],
                        **fed.finetune_config(upload=False))
    fed.score(ok, "fedavg_ft", rnd)
    fed.progress("fedavg_ft", None, 1, fed.acc_line("fedavg_ft", rnd))


def client_train(call: ClientCall):
    """FedAvg's local step on the global head (row c = dataset class c) over the client's frozen features."""
    arrays, data, opts = call.content["arrays"], call.data, call.options
    w, b = client_ops.fedavg_local_train(arrays["weight"].numpy(), arrays["bias"].numpy(), data, opts.epochs, opts.lr,
                                         opts.batch_size)
    return update({"weight": w, "bias": b}, len(data.train_y))


def client_evaluate(call: ClientCall):
    """The global head's rows for the client's classes, k-way accuracy on its test images."""
    arrays, data = call.content["arrays"], call.data
    head = client_ops.restrict_head(arrays["weight"].numpy(), arrays["bias"].numpy(), data.class_ids,
                                    data.class_names)
    res = client_ops.evaluate_head(head, data)
    return scored(res["acc"], res["num-examples"])


register(Method("fedavg", run_fedavg, FedAvgOptions,
                client_steps={"train.fedavg": ("train", client_train), "evaluate.fedavg": ("evaluate",
                                                                                          client_evaluate)},
                state=FedAvgState, order=40, summary="Flower's FedAvg of one global head on frozen features"))
register(Method("fedavg_ft", run_fedavg_ft, requires=("fedavg",), zero_labels=ZERO_FT,
                order=41, summary="the final FedAvg head's rows fine-tuned on the client's labels"))
