"""A hostile stand-in for fedtina's ClientApp (tests only): every handler of the real ClientApp
(clients/client_app.py), whose reply is then corrupted for the partitions a plan names.

The plan is `hostile.json` beside the run's partition (the test writes it into the run dir before the run):
{"<partition id>": "<kind>"}. Every reply of that client is corrupted by its kind where the reply holds what the
kind corrupts:

* `abc`: its description says `client_id: "abc"`;
* `liar`: it says it is client 0 (description and profiles) while holding its own partition;
* `no_metrics`: its MetricRecords are gone;
* `numbers`: it reports acc 1e9 and 1e9 examples;
* `profile`: its profiles are a ConfigRecord without a single field of one;
* `shape`: the arrays it sends back (an update, an uploaded head) have the wrong shape.

The engine runs it in place of the real one by `launch.APPS["clientapp"] = "hostile_app:app"`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from clients.client_app import app as honest

PLAN = "hostile.json"
KINDS = ("abc", "liar", "no_metrics", "numbers", "profile", "shape")


def plan(msg: Message) -> dict[int, str]:
    cfg = msg.content["config"] if "config" in msg.content.config_records else {}
    path = Path(str(cfg.get("partition", ""))).parent / PLAN
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def corrupt(reply: Message, kind: str) -> Message:
    """The reply with what `kind` corrupts corrupted (in place)."""
    c = reply.content
    if kind in ("abc", "liar") and "desc" in c.config_records:
        c["desc"] = ConfigRecord({**dict(c["desc"]), "client_id": "abc" if kind == "abc" else 0})
    if kind == "liar":
        for key in [k for k in c.config_records if k.startswith("prof")]:
            c[key] = ConfigRecord({**dict(c[key]), "client_id": 0})
    if kind == "no_metrics":
        for key in list(c.metric_records):
            del c[key]
    if kind == "numbers":
        for key in list(c.metric_records):
            c[key] = MetricRecord({**dict(c[key]), "num-examples": int(1e9),
                                   **({"acc": 1e9} if "acc" in c[key] else {})})
    if kind == "profile":
        for key in [k for k in c.config_records if k.startswith("prof")]:
            c[key] = ConfigRecord({"junk": 1})
    if kind == "shape":
        for key in list(c.array_records):
            c[key] = ArrayRecord({name: Array(np.zeros(7, np.float32)) for name in c[key]})
    return reply


def _hostile(fn):
    def handler(msg: Message, ctx: Context) -> Message:
        reply = fn(msg, ctx)
        kind = plan(msg).get(int(ctx.node_config["partition-id"]))
        return corrupt(reply, kind) if kind and not reply.has_error() else reply
    return handler


app = ClientApp()
for _name, _fn in honest._registered_funcs.items():
    _category, _action = _name.split(".", 1)
    getattr(app, _category)(_action)(_hostile(_fn))
