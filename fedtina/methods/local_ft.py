"""Local fine-tuning: the selection head fine-tuned on the client's own labelled features, nothing shared. The
per-client oracle of what a client's labels alone can buy."""

from __future__ import annotations

from fedtina.server.federation import Federation
from fedtina.methods.registry import Method, register

ZERO = "fits the head on the client's labels; this client has none"


def run(fed: Federation, state: None) -> None:
    fed.out.rounds["local_ft"] = 1
    clients = fed.labelled("local_ft", fed.usable(fed.nodes, ["local_ft"], 1), 1, ZERO)
    heads = {c.node_id: fed.selection(c.names) for c in clients}
    ok = fed.send_heads("finetune", heads, "local_ft", 1, fail=["local_ft"], **fed.finetune_config(upload=False))
    fed.score(ok, "local_ft", 1)
    fed.progress("local_ft", None, 1, fed.acc_line("local_ft", 1))


register(Method("local_ft", run, zero_labels=ZERO, order=30,
                summary="the selection head fine-tuned on the client's labels"))
