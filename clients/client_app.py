"""fedtina's ClientApp (Flower Message API). The handlers every head-serving method shares are here (`describe`,
`evaluate.head`, `train.finetune`); each method's own steps come from its module (fedtina.methods registry) and are
registered below by message type. Handlers are thin: the work lives in the library.

A client knows only its partition id (`node_config["partition-id"]`). Its data (frozen features of its images, or the
images themselves for the methods that train the body) is loaded lazily from the run dir, whose paths arrive in every
message's `config` ConfigRecord, and cached per actor process by client_ops. Personal models live in the node's
`Context.state`. Every reply carries a `prof` ConfigRecord (wall, CPU, peak memory) next to its payload; strategy
replies keep exactly one ArrayRecord and one MetricRecord.

Fault injection (tests, attack experiments), from the message config: client ids in `crash_clients` (work handlers
raise), `poison_clients` (their training replies are poisoned by `attack_mod`, `poison_kind` from
fedtina/adversary/attacks.py; the client's own score is that of its honest model), `unknown_class_clients`
(describe adds a class the dataset lacks) and `slow_clients` (work handlers sleep `slow_s`, to hit the timeout).
"""

from __future__ import annotations

import time
from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtina import methods
from fedtina.config import HeadTrainConfig
from fedtina.client import ops as client_ops
from fedtina.adversary.attacks import mislabel
from fedtina.adversary.mods import attack_mod, fedavg_clip_mod, upload_privacy_mod
from fedtina.data.partition import client_spec
from fedtina.report.profiling import PhaseTimer, to_config
from fedtina.client.call import HEAD_FT, ClientCall, unpack
from fedtina.runtime.spec import arrays_record, head_record, record_head

# outermost first: an attacker replaces what it sends after any clipping (fedtina/adversary/mods.py)
app = ClientApp(mods=[attack_mod, upload_privacy_mod, fedavg_clip_mod])

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


def _prof(cfg: ConfigRecord, cid: int, phase: str, t: PhaseTimer, acc: float | None = None,
          detail: str = "") -> ConfigRecord:
    rnd = int(cfg.get("round", cfg.get("server-round", 0)))
    return ConfigRecord(to_config(t.record(str(cfg.get("method", "")), rnd, cid, phase, acc=acc, detail=detail)))


def _reply(msg: Message, cfg: ConfigRecord, cid: int, phase: str, t: PhaseTimer, records: dict,
           acc: float | None = None, detail: str = "") -> Message:
    return Message(RecordDict({**records, "prof": _prof(cfg, cid, phase, t, acc, detail)}), reply_to=msg)


def _metrics(acc: float, n: int) -> MetricRecord:
    return MetricRecord({"acc": float(acc), "num-examples": int(n)})


def _data(cfg: ConfigRecord, cid: int) -> client_ops.ClientData:
    return client_ops.load_client_data(str(cfg["features"]), str(cfg["partition"]), cid)


@app.query("describe")
def describe(msg: Message, ctx: Context) -> Message:
    """The client's description of its label set, as text (the server parses it), and its id; with
    `prompt` images or both, also `shots`: the mean feature of its labelled training images of each class (in the
    description's class order; count 0 where it has none)."""
    cfg, cid = _setup(msg, ctx, work=False)
    records: dict = {}
    with PhaseTimer() as t:
        text = client_spec(str(cfg["partition"]), cid).description
        if cid in list(cfg.get("unknown_class_clients", [])):
            text = f"{text.rstrip(' .')}, {UNKNOWN_CLASS}"
        if str(cfg.get("prompt", "text")) != "text":
            mean, count = client_ops.class_means(_data(cfg, cid))
            records["shots"] = arrays_record({"mean": mean, "count": count})
    return _reply(msg, cfg, cid, "describe", t, {"desc": ConfigRecord({"text": text, "client_id": cid}), **records})


@app.evaluate("head")
def evaluate_head(msg: Message, ctx: Context) -> Message:
    """k-way accuracy of the received head over the client's own classes, on its local test images."""
    cfg, cid = _setup(msg, ctx)
    with PhaseTimer() as t:
        res = client_ops.evaluate_head(record_head(msg.content["head"], cfg["class_names"]), _data(cfg, cid))
    return _reply(msg, cfg, cid, "evaluate", t, {"metrics": _metrics(res["acc"], res["num-examples"])}, res["acc"])


@app.train("finetune")
def finetune(msg: Message, ctx: Context) -> Message:
    """Fine-tune the received head on the client's training images; reply its accuracy and (if asked) the head.
    With `evaluate_received`, first the received head's accuracy (`received`, profiled as its own evaluate phase)."""
    cfg, cid = _setup(msg, ctx)
    records: dict = {}
    received = record_head(msg.content["head"], cfg["class_names"])
    if bool(cfg.get("evaluate_received", False)):   # one message instead of evaluate.head + train.finetune
        with PhaseTimer() as t_eval:
            res = client_ops.evaluate_head(received, _data(cfg, cid))
        records["received"] = _metrics(res["acc"], res["num-examples"])
        records["prof_received"] = _prof(cfg, cid, "evaluate", t_eval, res["acc"])
    with PhaseTimer() as t:
        data = _data(cfg, cid)
        ft = unpack(HeadTrainConfig, cfg, HEAD_FT)
        tuned = client_ops.finetune_local(received, data, ft)
        res = client_ops.evaluate_head(tuned, data)
    records["metrics"] = _metrics(res["acc"], res["num-examples"])
    if bool(cfg.get("upload", False)) and len(data.train_y):   # without labels it has nothing to teach the zoo
        if cid in list(cfg.get("poison_clients", [])) and str(cfg.get("poison_kind")) == "mislabeled":
            # a second fine-tune, outside the timer: the fault's cost is not the client's (the other attacks are
            # played by attack_mod on the reply)
            wrong = replace(data, train_y=mislabel(data.train_y, data.k, float(cfg["mislabel_share"]), cid))
            tuned = client_ops.finetune_local(received, wrong, ft)
        records["head"] = head_record(tuned)
    return _reply(msg, cfg, cid, "finetune", t, records, res["acc"])


def _handler(message_type: str, phase: str, step, options: type | None):
    """A registered method's client step as a ClientApp handler: faults, timer, reply; the step gets the method's
    `options` dataclass as `call.options`."""
    def handler(msg: Message, ctx: Context) -> Message:
        cfg, cid = _setup(msg, ctx)
        call = ClientCall(msg.content, cfg, cid, ctx.state, options_cls=options)
        with PhaseTimer() as t:
            records, acc = step(call)
        return _reply(msg, cfg, cid, phase, t, records, acc, call.note)
    handler.__name__ = handler.__qualname__ = message_type.replace(".", "_")
    return handler


for _method in methods.REGISTRY.values():
    for _type, (_phase, _step) in _method.client_steps.items():
        _category, _action = _type.split(".", 1)
        _fn = _handler(_type, _phase, _step, _method.options)
        # a module attribute, so the ClientApp (pickled with every message) refers to it by name instead of pickling
        # the closure by value
        globals()[_fn.__name__] = _fn
        getattr(app, _category)(_action)(_fn)
