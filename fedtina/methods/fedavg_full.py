"""FedAvg of the whole ResNet-20 on the clients' raw images (Flower's FedAvg), starting from the generic backbone
with a classifier over every class (the selection rows). Costly: every client trains the whole network. New clients
get the final global model, scored k-way over their classes."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedtina.errors import FedtinaError
from fedtina.client import image_model as body
from fedtina.client.call import ClientCall, pack, scored, update
from fedtina.server.federation import Federation
from fedtina.runtime.spec import arrays_record
from fedtina.server.strategy import start
from fedtina.methods.fedavg import global_head
from fedtina.methods.registry import Method, register


def full_model_state(fed: Federation) -> dict:
    """The generic ResNet-20 (all but its classifier) with a classifier over every class of the dataset, initialised
    like FedAvg's global head: where every image method starts."""
    state = body.init_state(len(fed.class_names), fed.assets.cfg.backbone, seed=0,
                            backbone_path=str(fed.assets.bank.backbone_path))
    head = global_head(fed)
    if state["fc.weight"].shape != head.weight.shape:
        raise FedtinaError(f"full model fc {state['fc.weight'].shape} does not match the head {head.weight.shape}")
    state["fc.weight"], state["fc.bias"] = head.weight.copy(), head.bias.copy()
    return state


def run_image_fedavg(fed: Federation, name: str, base: type, opts, **strategy_kwargs) -> None:
    """Flower strategy `base` over the full model for `rounds` rounds on the old clients, then the new clients."""
    fed.out.rounds[name] = fed.spec.rounds
    result = start(fed, name, base, arrays_record(full_model_state(fed)), train_type=f"train.{name}",
                   evaluate_type=f"evaluate.{name}", train_config=pack(opts), **strategy_kwargs)
    fed.serve_new(name, result.arrays, f"evaluate.{name}")


def run(fed: Federation, state: None) -> None:
    run_image_fedavg(fed, "fedavg_full", FedAvg, fed.options("fedavg_full", body.LocalTraining))


def client_train(call: ClientCall):
    """Local epochs of the whole model (classifier over all classes) on the client's images; with Flower FedProx's
    `proximal-mu` in the config, pulled toward the received global model."""
    state, imgs = call.arrays(), call.images()
    mu = float(call.cfg.get("proximal-mu", 0.0))
    new = body.train(state, imgs.train_x, imgs.train_global_y, mu=mu, anchor=state if mu > 0 else None,
                     device=call.device, **call.options.kwargs())
    return update(new, len(imgs.train_y))


def client_evaluate(call: ClientCall):
    """k-way accuracy of the global model over the client's own classes on its test images."""
    imgs = call.images()
    return scored(body.accuracy(call.arrays(), imgs.test_x, imgs.test_y, imgs.class_ids, device=call.device),
                  len(imgs.test_y))


register(Method("fedavg_full", run, body.LocalTraining, needs_images=True,
                client_steps={"train.fedavg_full": ("train", client_train),
                              "evaluate.fedavg_full": ("evaluate", client_evaluate)},
                order=50, summary="Flower's FedAvg of the whole ResNet-20 on images"))

