"""Selection: each client gets the generic model's rows for its classes (for an unseen class, the row of the seen
class with the nearest name). No training, no label: the cheap baseline every generated head must beat."""

from __future__ import annotations

from fedtina.server.federation import Federation
from fedtina.report.profiling import PhaseTimer
from fedtina.methods.registry import Method, register


def run(fed: Federation, state: None) -> None:
    fed.out.rounds["selection"] = 1
    clients = fed.usable(fed.nodes, ["selection"], 1)
    with PhaseTimer() as t:
        heads = {c.node_id: fed.selection(c.names) for c in clients}
    fed.server_record("selection", 1, "generate", t, detail=f"{len(heads)} selection heads")
    fed.score(fed.send_heads("evaluate", heads, "selection", 1, fail=["selection"]), "selection", 1)
    fed.progress("selection", None, 1, fed.acc_line("selection", 1))


register(Method("selection", run, order=20,
                summary="the generic model's rows for the client's classes (nearest name if unseen)"))
