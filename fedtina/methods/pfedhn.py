"""pFedHN (Shamsian et al., 2021) on the frozen body: a server hypernetwork maps a learned embedding per client to
that client's linear head (the nearest rival to a server-side generator, but conditioned on an id, not on a
description). Each round the sampled clients fine-tune the generated head for `inner_steps` and send it back; the
server moves the hypernetwork and the client's embedding along (generated - returned), pFedHN's update. Every old
client is scored with its generated head after each round.

New clients: the hypernetwork is frozen and sent to the client, which fits a new embedding on its labels (from the
mean of the learned ones). Without labels there is nothing to fit: `unserved`.

Not pFedHN-PC: its "personal classifier" variant generates the feature extractor and keeps a local head; on a frozen
backbone the head is the whole personal model, so here the hypernetwork generates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedtina.config import NON_NEGATIVE, POSITIVE, HeadTrainConfig, bounded
from fedtina.client import ops as client_ops
from fedtina.client.call import HEAD_FT, ClientCall, pack, scored
from fedtina.server.federation import Federation
from fedtina.report.profiling import PhaseTimer
from fedtina.runtime.spec import arrays_record, record_head
from fedtina.zoo.heads import Head
from fedtina.methods.fedavg import global_head, restricted
from fedtina.methods.registry import Method, register

ZERO = "fits a new client embedding on the client's labels; this client has none"


@dataclass
class PFedHNOptions:
    embed_dim: int = bounded(32, POSITIVE)
    hidden: int = bounded(128, POSITIVE)
    lr: float = bounded(0.01, POSITIVE)  # Adam on the hypernetwork and the embeddings (server)
    inner_steps: int = bounded(30, POSITIVE)  # the client's fine-tuning of the generated head (full-batch Adam on
                                              # features)
    inner_lr: float = bounded(0.05, POSITIVE)
    embed_steps: int = bounded(100, POSITIVE)  # a new client's fit of its embedding
    embed_lr: float = bounded(0.05, POSITIVE)
    seed: int = bounded(0, NON_NEGATIVE)


class HyperNet(nn.Module):
    """embedding [e] -> MLP -> a C-way head [C, d] + [C]. The output layer starts at zero weights with the generic
    head as its bias, so every client starts from the generic rows (selection)."""

    def __init__(self, n_classes: int, dim: int, embed_dim: int, hidden: int, init: Head | None = None) -> None:
        super().__init__()
        self.n_classes, self.dim = n_classes, dim
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, n_classes * (dim + 1))
        if init is not None:
            nn.init.zeros_(self.out.weight)
            with torch.no_grad():
                self.out.bias.copy_(torch.as_tensor(np.concatenate([init.weight, init.bias[:, None]], 1).ravel()))

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.out(self.mlp(e)).view(self.n_classes, self.dim + 1)
        return flat[:, :-1], flat[:, -1]


def _head(net: HyperNet, e: torch.Tensor, names=None) -> Head:
    w, b = net(e)
    return Head(tuple(names or ()), w.detach().numpy().copy(), b.detach().numpy().copy())


def run(fed: Federation, state: None) -> None:
    opts = fed.options("pfedhn", PFedHNOptions)
    spec = fed.spec
    fed.out.rounds["pfedhn"] = spec.rounds
    init = global_head(fed)
    torch.manual_seed(opts.seed)
    net = HyperNet(len(fed.class_names), init.weight.shape[1], opts.embed_dim, opts.hidden, init)
    old = fed.usable(fed.old, ["pfedhn"], 1)
    index = {c.node_id: i for i, c in enumerate(old)}
    emb = nn.Parameter(torch.randn(max(len(old), 1), opts.embed_dim) * 0.1)
    optim = torch.optim.Adam([*net.parameters(), emb], lr=opts.lr)
    inner = {**pack(HeadTrainConfig(steps=opts.inner_steps, lr=opts.inner_lr, l2_to_init=0.0, weight_decay=0.0,
                                    select=False), HEAD_FT), "upload": True}

    def heads_for(clients) -> dict[int, Head]:
        with torch.no_grad():
            full = {c.node_id: _head(net, emb[index[c.node_id]], init.class_names) for c in clients}
        return {c.node_id: restricted(full[c.node_id], [c])[c.node_id] for c in clients}

    for rnd in range(1, spec.rounds + 1):
        sampled = [c for c in old if c.node_id in set(fed.sample([c.node_id for c in old], rnd, opts.seed))]
        sent = heads_for(sampled)
        ok = fed.send_heads("finetune", sent, "pfedhn", rnd, **inner)
        with PhaseTimer() as t:
            for node, rep in ok.items():
                if "head" not in rep.content.array_records:
                    continue   # a client without labels returns nothing to learn from
                c = fed.clients[node]
                back = record_head(rep.content["head"], c.names)
                w, b = net(emb[index[node]])
                ids = torch.as_tensor(c.class_ids)
                dw = torch.as_tensor(sent[node].weight - back.weight)
                db = torch.as_tensor(sent[node].bias - back.bias)
                optim.zero_grad()
                # pFedHN's step: the gradient of <theta, theta_sent - theta_returned> moves theta toward the return
                ((w[ids] * dw).sum() + (b[ids] * db).sum()).backward()
                optim.step()
        fed.server_record("pfedhn", rnd, "aggregate", t, detail=f"{len(ok)} hypernetwork steps")
        fed.score(fed.send_heads("evaluate", heads_for(old), "pfedhn", rnd, fail=["pfedhn"]), "pfedhn", rnd)
        fed.progress("pfedhn", rnd, spec.rounds, fed.acc_line("pfedhn", rnd))

    rnd = spec.rounds
    clients = fed.labelled("pfedhn", fed.usable(fed.new, ["pfedhn"], rnd), rnd, ZERO)
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    state["init_embedding"] = emb.detach().mean(0).numpy()
    ok = fed.send("train.pfedhn_embed", {c.node_id: {"arrays": arrays_record(state)} for c in clients}, "pfedhn",
                  rnd, "finetune", fail=["pfedhn"], **pack(opts))
    fed.score(ok, "pfedhn", rnd)
    if fed.new:
        fed.progress("pfedhn", None, rnd, f"new clients: {fed.acc_line('pfedhn', rnd, new=True)}")


def fit_embedding(state: dict[str, np.ndarray], data: client_ops.ClientData, embed_dim: int, hidden: int,
                  steps: int, lr: float) -> Head:
    """A new client's head: its embedding fitted by Adam on cross-entropy of its labelled features, through the
    frozen hypernetwork (rows of its classes only)."""
    n_classes = int(state["out.bias"].shape[0]) // (data.feature_dim + 1)
    net = HyperNet(n_classes, data.feature_dim, embed_dim, hidden)
    net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items() if k != "init_embedding"})
    net.requires_grad_(False)
    e = nn.Parameter(torch.as_tensor(state["init_embedding"]).clone())
    optim = torch.optim.Adam([e], lr=lr)
    x, y = torch.as_tensor(data.train_x), torch.as_tensor(data.train_y)
    ids = torch.as_tensor(data.class_ids)
    for _ in range(int(steps)):
        w, b = net(e)
        loss = nn.functional.cross_entropy(x @ w[ids].T + b[ids], y)
        optim.zero_grad()
        loss.backward()
        optim.step()
    w, b = net(e)
    return Head(data.class_names, w[ids].detach().numpy(), b[ids].detach().numpy())


def client_embed(call: ClientCall):
    data, opts = call.data, call.options
    head = fit_embedding(call.arrays(), data, opts.embed_dim, opts.hidden, opts.embed_steps, opts.embed_lr)
    res = client_ops.evaluate_head(head, data)
    return scored(res["acc"], res["num-examples"])


register(Method("pfedhn", run, PFedHNOptions, zero_labels=ZERO,
                client_steps={"train.pfedhn_embed": ("finetune", client_embed)},
                order=120, summary="a server hypernetwork maps a learned client embedding to its head"))
