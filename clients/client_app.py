"""fedtina's ClientApp (Flower Message API). Each handler is thin: the work lives in `fedtina.federation.client_ops`.

A client knows only its partition id (`node_config["partition-id"]`). Its data (frozen features of its images, or the
images themselves for fedavg_full) is loaded lazily from the run dir, whose paths arrive in every message's `config`
ConfigRecord, and cached per actor process by client_ops. Every reply carries a `prof` ConfigRecord (wall, CPU, peak
memory) next to its payload; FedAvg replies keep exactly one ArrayRecord and one MetricRecord.

Fault injection (tests), from the message config: client ids in `crash_clients` (work handlers raise),
`poison_clients` (train.finetune uploads a NaN / huge / wrongly shaped head, `poison_kind`), `unknown_class_clients`
(describe adds a class the dataset lacks) and `slow_clients` (work handlers sleep `slow_s`, to hit the timeout).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtina.config import HeadTrainConfig
from fedtina.federation import client_ops
from fedtina.federation.partition import client_spec
from fedtina.federation.profiling import PhaseTimer, to_config
from fedtina.federation.runtime import arrays_record, head_record, record_arrays, record_head
from fedtina.heads import Head

app = ClientApp()

UNKNOWN_CLASS = "no such class"


def _setup(msg: Message, ctx: Context, work: bool = True) -> tuple[ConfigRecord, int]:
    """The message's config and this client's id; work handlers first play the injected faults."""
    cfg, cid = msg.content["config"], int(ctx.node_config["partition-id"])
    if work:
        if cid in list(cfg.get("slow_clients", [])):
            time.sleep(float(cfg.get("slow_s", 0.0)))
        if cid in list(cfg.get("crash_clients", [])):
            raise RuntimeError(f"injected crash on client {cid}")
    return cfg, cid


def _reply(msg: Message, cfg: ConfigRecord, cid: int, phase: str, t: PhaseTimer, records: dict,
           acc: float | None = None) -> Message:
    rnd = int(cfg.get("round", cfg.get("server-round", 0)))
    prof = t.record(str(cfg.get("method", "")), rnd, cid, phase, acc=acc)
    return Message(RecordDict({**records, "prof": ConfigRecord(to_config(prof))}), reply_to=msg)


def _metrics(acc: float, n: int) -> MetricRecord:
    return MetricRecord({"acc": float(acc), "num-examples": int(n)})


def _data(cfg: ConfigRecord, cid: int) -> client_ops.ClientData:
    return client_ops.load_client_data(str(cfg["features"]), str(cfg["partition"]), cid)


@app.query("describe")
def describe(msg: Message, ctx: Context) -> Message:
    """The client's description of its label set, as text (the server parses it), and its id."""
    cfg, cid = _setup(msg, ctx, work=False)
    with PhaseTimer() as t:
        text = client_spec(str(cfg["partition"]), cid).description
        if cid in list(cfg.get("unknown_class_clients", [])):
            text = f"{text.rstrip(' .')}, {UNKNOWN_CLASS}"
    return _reply(msg, cfg, cid, "describe", t, {"desc": ConfigRecord({"text": text, "client_id": cid})})


@app.evaluate("head")
def evaluate_head(msg: Message, ctx: Context) -> Message:
    """k-way accuracy of the received head over the client's own classes, on its local test images."""
    cfg, cid = _setup(msg, ctx)
    with PhaseTimer() as t:
        res = client_ops.evaluate_head(record_head(msg.content["head"], cfg["class_names"]), _data(cfg, cid))
    return _reply(msg, cfg, cid, "evaluate", t, {"metrics": _metrics(res["acc"], res["num-examples"])}, res["acc"])


@app.train("finetune")
def finetune(msg: Message, ctx: Context) -> Message:
    """Fine-tune the received head on the client's training images; reply its accuracy and (if asked) the head."""
    cfg, cid = _setup(msg, ctx)
    with PhaseTimer() as t:
        data = _data(cfg, cid)
        ft = HeadTrainConfig(steps=int(cfg["steps"]), lr=float(cfg["lr"]), l2_to_init=float(cfg["l2_to_init"]),
                             weight_decay=float(cfg["weight_decay"]), select=bool(cfg.get("select", False)))
        tuned = client_ops.finetune_local(record_head(msg.content["head"], cfg["class_names"]), data, ft)
        res = client_ops.evaluate_head(tuned, data)
    records: dict = {"metrics": _metrics(res["acc"], res["num-examples"])}
    if bool(cfg.get("upload", False)):
        if cid in list(cfg.get("poison_clients", [])):
            tuned = _poison(tuned, str(cfg.get("poison_kind", "nan")))
        records["head"] = head_record(tuned)
    return _reply(msg, cfg, cid, "finetune", t, records, res["acc"])


def _poison(head: Head, kind: str) -> Head:
    w = np.array(head.weight, np.float32)
    if kind == "nan":
        w[0, 0] = np.nan
    elif kind == "huge":
        w *= 1e4
    elif kind == "shape":
        w = np.concatenate([w, np.ones((len(w), 1), np.float32)], axis=1)
    else:
        raise ValueError(f"unknown poison_kind {kind!r}; valid: nan, huge, shape")
    return Head(head.class_names, w, head.bias)


@app.train()
def fedavg_train(msg: Message, ctx: Context) -> Message:
    """FedAvg's local step on the global head (row c = dataset class c) over the client's frozen features."""
    cfg, cid = _setup(msg, ctx)
    arrays = msg.content["arrays"]
    with PhaseTimer() as t:
        data = _data(cfg, cid)
        w, b = client_ops.fedavg_local_train(arrays["weight"].numpy(), arrays["bias"].numpy(), data,
                                             int(cfg["epochs"]), float(cfg["lr"]), int(cfg["batch_size"]))
    out = arrays_record({"weight": w, "bias": b})
    metrics = MetricRecord({"num-examples": int(len(data.train_y))})
    return _reply(msg, cfg, cid, "train", t, {"arrays": out, "metrics": metrics})


@app.evaluate()
def fedavg_evaluate(msg: Message, ctx: Context) -> Message:
    """FedAvg's evaluation: the global head's rows for the client's classes, k-way accuracy on its test images."""
    cfg, cid = _setup(msg, ctx)
    arrays = msg.content["arrays"]
    with PhaseTimer() as t:
        data = _data(cfg, cid)
        head = client_ops.restrict_head(arrays["weight"].numpy(), arrays["bias"].numpy(), data.class_ids,
                                        data.class_names)
        res = client_ops.evaluate_head(head, data)
    return _reply(msg, cfg, cid, "evaluate", t, {"metrics": _metrics(res["acc"], res["num-examples"])}, res["acc"])


def _device(cfg: ConfigRecord) -> str:
    from fedtina.device import pick_device

    return str(pick_device(str(cfg.get("device", "auto"))))


@app.train("full")
def full_train(msg: Message, ctx: Context) -> Message:
    """fedavg_full: local epochs of the whole ResNet-20 (classifier over all classes) on the client's raw images."""
    cfg, cid = _setup(msg, ctx)
    with PhaseTimer() as t:
        imgs, global_y, _, _ = client_ops.load_client_images(str(cfg["images"]), str(cfg["partition"]), cid)
        state = client_ops.fedavg_full_local_train(record_arrays(msg.content["arrays"]), imgs, global_y,
                                                   int(cfg["epochs"]), float(cfg["lr"]), int(cfg["batch_size"]),
                                                   device=_device(cfg))
    return _reply(msg, cfg, cid, "train", t, {"arrays": arrays_record(state),
                                              "metrics": MetricRecord({"num-examples": int(len(global_y))})})


@app.evaluate("full")
def full_evaluate(msg: Message, ctx: Context) -> Message:
    """fedavg_full: k-way accuracy of the global model over the client's own classes on its test images."""
    cfg, cid = _setup(msg, ctx)
    with PhaseTimer() as t:
        _, _, test_imgs, test_y = client_ops.load_client_images(str(cfg["images"]), str(cfg["partition"]), cid)
        class_ids = client_spec(str(cfg["partition"]), cid).class_ids
        acc = client_ops.evaluate_full_model(record_arrays(msg.content["arrays"]), test_imgs, test_y, class_ids,
                                             device=_device(cfg))
    return _reply(msg, cfg, cid, "evaluate", t, {"metrics": _metrics(acc, len(test_y))}, acc)
