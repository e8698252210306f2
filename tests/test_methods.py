"""The method registry and every personalized-FL method: through the real Ray engine on tiny assets (old clients
over two rounds, new clients with and without labels), and the pieces without Ray (registry rules, Context.state,
the hypernetwork, bad options)."""

from __future__ import annotations

import numpy as np
import pytest

from fedtina.errors import FedtinaError
from fedtina.validate import validate_simulate_config
from simkit import by_client, compose, summary


@pytest.mark.slow
def test_every_method_serves_old_and_new_clients(tiny, tmp_path):
    from fedtina.data.partition import load_partition
    from fedtina.methods import REGISTRY
    from fedtina.simulate import run

    cache, assets = tiny
    # 6 clients: 4 old ones train for 2 rounds (half of them sampled per round), 2 new ones arrive after, one with
    # every label and one with none
    cfg = compose(cache, "clients=6", "rounds=2", "method=pfl", "fraction_train=0.5", "partition.new_share=0.34",
                  "partition.new_labels_per_class=[0,-1]", "method.tina.refresh_every=0", "checks.max_acc_drop=1.0")
    out = tmp_path / "run"
    outcome = run(cfg, out, assets=assets)
    part = load_partition(out / "partition.json")
    old = [c.client_id for c in part.clients if not c.is_new]
    new = {c.label_budget: c.client_id for c in part.clients if c.is_new}
    assert len(old) == 4 and sorted(new) == [-1, 0]
    doc = summary(out)
    methods = doc["summary"]["methods"]
    assert outcome.summary["method_status"] == {m: "ok" for m in cfg.method.names}
    for name in cfg.method.names:
        for row in REGISTRY[name].rows:
            per = by_client(doc, row)
            assert sorted(per) == sorted(old + list(new.values())), (row, per)
            assert all(per[c]["status"] == "ok" and 0 <= per[c]["acc"] <= 1 for c in old), (row, per)
            assert per[new[-1]]["status"] == "ok" and per[new[-1]]["is_new"], (row, per[new[-1]])
            zero = REGISTRY[name].zero_labels if row == name else "none"   # tina_ft fine-tunes on labels
            if zero:
                assert per[new[0]]["status"] == "unserved" and "has none" in per[new[0]]["detail"], (row, per)
                assert methods[row]["new_clients"]["n_unserved"] == 1
            else:
                assert per[new[0]]["status"] == "ok", (row, per[new[0]])
            for group in ("old_clients", "new_clients"):
                assert set(methods[row][group]) >= {"acc_mean", "acc_std", "acc_worst10", "acc_min"}, row
    for name in ("fedavg", "fedavg_full", "fedprox", "fedper", "fedrep", "fedbabu", "ditto", "fedrod", "pfedhn"):
        assert [p["round"] for p in methods[name]["curve"]] == [1, 2], name
        trained = [p for p in doc["phases"] if p["method"] == name and p["phase"] in ("train", "finetune")
                   and p["round"] <= 2 and p["client_id"] in old]
        assert sorted(p["round"] for p in trained) == [1, 1, 2, 2], (name, trained)   # fraction_train=0.5 of 4
    # personal state lives in Context.state across rounds: a client scored after it trained starts from its own
    # head / model, saved in the round it last trained; one that never trained has none
    for name in ("fedper", "fedrep", "ditto"):
        rounds = {}
        for p in doc["phases"]:
            if p["method"] == name and p["phase"] == "train":
                rounds.setdefault(p["client_id"], []).append(p["round"])
        for p in doc["phases"]:
            if p["method"] == name and p["phase"] == "evaluate" and p["client_id"] in old:
                before = [r for r in rounds.get(p["client_id"], []) if r <= p["round"]]
                want = f"saved in round {max(before)}" if before else ""
                assert (want in p["detail"]) if before else "Context.state" not in p["detail"], (name, p, rounds)
        assert any("Context.state" in p["detail"] for p in doc["phases"] if p["method"] == name)
    for png in ("acc_by_round.png", "acc_vs_compute.png", "acc_by_method.png"):
        assert (out / png).stat().st_size > 0, png
    assert (out / "images.npy").exists()


def test_registry_order_requirements_clashes_and_states():
    import dataclasses
    import json

    from fedtina.methods import REGISTRY, Method, plan, register

    assert [m.name for m in plan(["fedrep", "tina", "fedavg_ft"])] == ["tina", "fedavg", "fedavg_ft", "fedrep"]
    with pytest.raises(FedtinaError, match="registered twice"):
        register(Method("fedrep", lambda fed, prog: None))
    with pytest.raises(FedtinaError, match=r"message type\(s\) \['train.fedrep'\] already taken"):
        register(Method("fedrep2", lambda fed, prog: None, client_steps={"train.fedrep": ("train", None)}))
    assert "fedrep2" not in REGISTRY
    with pytest.raises(FedtinaError, match=r"unknown method\(s\) \['foo'\]"):
        plan(["tina", "foo"])
    with pytest.raises(FedtinaError, match="its state must be a dataclass"):
        register(Method("stateful", lambda fed, state: None, state=dict))
    for m in (m for m in REGISTRY.values() if m.state is not None):   # from its defaults, through the JSON checkpoint
        assert m.state(**json.loads(json.dumps(dataclasses.asdict(m.state())))) == m.state(), m.name
    assert REGISTRY["fedavg"].state is not None and "fedavg" in REGISTRY["fedavg_ft"].requires
    for m in REGISTRY.values():   # every registered message type is "<train|evaluate|query>.<action>"
        assert all(t.split(".", 1)[0] in ("train", "evaluate", "query") for t in m.client_steps), m.name


def test_options_travel_to_the_client_step_as_the_same_dataclass():
    """pack (server) -> the message's one ConfigRecord -> unpack (client): every method's options, changed from their
    defaults, arrive equal, beside the head fine-tuning and the message's other entries (no key clash: the body's
    `lr` and head_ft's `lr` both travel)."""
    import dataclasses

    from flwr.app import ConfigRecord, RecordDict

    from fedtina.client.call import HEAD_FT, ClientCall, pack, unpack
    from fedtina.config import HeadTrainConfig
    from fedtina.methods import REGISTRY

    ft = HeadTrainConfig(steps=7, lr=0.2, l2_to_init=0.5, weight_decay=0.01, select=False)
    for m in REGISTRY.values():
        if m.options is None:
            continue
        changed = {f.name: (not f.default if isinstance(f.default, bool) else f.default + 1
                            if isinstance(f.default, (int, float)) else f.default) for f in dataclasses.fields(m.options)}
        opts = m.options(**changed)
        assert opts != m.options(), m.name
        record = ConfigRecord({**pack(opts), **pack(ft, HEAD_FT), "features": "/x.npy", "lr": 99.0})
        call = ClientCall(RecordDict(), record, 0, RecordDict(), options_cls=m.options)
        assert call.options == opts and call.head_ft == ft, m.name
        assert unpack(m.options, record) == opts
    with pytest.raises(FedtinaError, match=r"^options.lr=-1.0 is invalid: must be a finite number > 0$"):
        unpack(REGISTRY["fedavg"].options, ConfigRecord({"options.lr": -1.0}))


def test_context_state_round_trip_and_note():
    from flwr.app import ConfigRecord, RecordDict

    from fedtina.client.call import ClientCall

    state = RecordDict()
    first = ClientCall(RecordDict(), ConfigRecord({"server-round": 3}), 0, state)
    assert first.load_state("fedper") is None and first.note == ""
    first.save_state("fedper", {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)})
    later = ClientCall(RecordDict(), ConfigRecord({"server-round": 5}), 0, state)
    got = later.load_state("fedper")
    np.testing.assert_array_equal(got["weight"], np.ones((2, 3)))
    assert later.note == "fedper from Context.state, saved in round 3"


def test_pfedhn_starts_at_the_generic_head_and_fits_a_new_embedding():
    import torch

    from fedtina.client.ops import ClientData, evaluate_head
    from fedtina.zoo.heads import Head
    from fedtina.methods.pfedhn import HyperNet, fit_embedding

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    C, d = 6, 4
    init = Head(tuple(map(str, range(C))), rng.normal(size=(C, d)).astype(np.float32), np.zeros(C, np.float32))
    net = HyperNet(C, d, 8, 16, init)
    w, b = net(torch.randn(8))
    np.testing.assert_allclose(w.detach().numpy(), init.weight, atol=1e-6)
    # a client whose classes 1, 4 sit where the generic rows point the other way: the fitted embedding fixes it
    net.out.weight.data.normal_(0, 0.5)   # a hypernetwork that learned to move heads
    centers = -3 * init.weight[[1, 4]]
    y = np.repeat([0, 1], 40)
    x = (centers[y] + 0.3 * rng.normal(size=(80, d))).astype(np.float32)
    data = ClientData((1, 4), ("1", "4"), x, y, x, y, np.asarray([1, 4])[y])
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    state["init_embedding"] = np.zeros(8, np.float32)
    with torch.no_grad():
        w0, b0 = net(torch.zeros(8))
    before = evaluate_head(Head(("1", "4"), w0.numpy()[[1, 4]], b0.numpy()[[1, 4]]), data)["acc"]
    after = evaluate_head(fit_embedding(state, data, 8, 16, steps=200, lr=0.1), data)["acc"]
    assert after >= before + 0.5   # measured 0.03 -> 1.00 (seeded)


@pytest.mark.parametrize("overrides, match", [
    (("method.names=[fedrep,foo]",), r"unknown method\(s\) \['foo'\]"),
    (("fraction_train=0",), r"^fraction_train=0 is invalid: must be a finite number in \(0, 1\]"),
    (("fraction_train=1.5",), r"^fraction_train=1.5 is invalid"),
    (("clients=2", "partition.new_share=0.8"), r"partition.new_share=0.8 makes all 2 clients new: no client would "
                                                r"train"),
    (("partition.new_share=1.0",), r"^partition.new_share=1.0 is invalid: must be a finite number in \[0, 1\)"),
    (("method=fedrep", "method.fedrep.epochs=0"), r"^method.fedrep.epochs=0 is invalid: must be an integer > 0"),
    (("method=ditto", "+method.ditto.lambda=1"), r"unknown method.ditto option\(s\) \['lambda'\]"),
    (("+method.foo.x=1",), r"unknown method option block\(s\) \['foo'\]"),
    (("method=pfl", "method.tina.prompt=pixels"), r"method.tina.prompt='pixels' is invalid"),
    (("partition.new_labels_per_class=[-2]",), r"partition.new_labels_per_class=\[-2\]"),
])
def test_bad_method_options_fail_with_one_line(tmp_path, overrides, match):
    from omegaconf import OmegaConf

    with pytest.raises(FedtinaError, match=match):
        validate_simulate_config(OmegaConf.to_container(compose(tmp_path, *overrides), resolve=True))


def test_tina_bank_serves_uploaded_rows_over_generated_ones(tiny, tmp_path):
    """method.tina.bank: a class that no prepared zoo head holds but some accepted upload did is served by the
    uploads' mean row, every other class by Tina's generated row; the bank is rebuilt from the run zoo's `client:`
    entries (what a resumed run has)."""
    from fedtina.zoo.heads import Head
    from fedtina.server.gate import HeadCheckConfig
    from fedtina.tina.service import TinaService, uploaded_rows
    from fedtina.zoo.store import ZooEntry, ZooStore

    _, assets = tiny
    names = list(assets.dataset.class_names)
    a, b, c = names[:3]
    d = int(assets.bank.features.shape[1])
    rng = np.random.default_rng(0)
    up1, up2 = (Head((a, x), rng.normal(size=(2, d)).astype(np.float32), rng.normal(size=2).astype(np.float32))
                for x in (b, c))
    prepared = Head((b,), np.ones((1, d), np.float32), np.ones(1, np.float32))   # b: Tina was trained on it
    with ZooStore(tmp_path / "zoo") as zoo:
        zoo.append_many([ZooEntry(h.class_names, h.params(), source=s)
                         for h, s in ((prepared, "zoo"), (up1, "client:1"), (up2, "client:2"))])
        bank = uploaded_rows(zoo)
    assert (bank.count(a), bank.count(b), bank.count(c)) == (2, 0, 1)

    def service(bank):
        return TinaService(assets.tina, assets, None, None, HeadCheckConfig(), 1.0, bank=bank)

    plain = dict(zip((7, 3), service(None).serve([(b, a), (b,)])))
    banked = dict(zip((7, 3), service(bank).serve([(b, a), (b,)])))
    assert [h.class_names for h in banked.values()] == [(b, a), (b,)]             # the clients' order
    np.testing.assert_allclose(banked[7].weight[1], (up1.weight[0] + up2.weight[0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(banked[7].bias[1], (up1.bias[0] + up2.bias[0]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(banked[7].weight[0], plain[7].weight[0])          # b: in the prepared zoo
    np.testing.assert_array_equal(banked[3].weight, plain[3].weight)
    assert not np.allclose(plain[7].weight[1], banked[7].weight[1])
