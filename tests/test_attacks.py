"""Attacks, the mods that play them, private uploads and the upload loop the attack bench runs.

The bench's table (README) is measured on the default assets; here each attack kind meets the gate on the tiny
assets, and the property behind each admitted kind's bounded damage is checked directly."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtina.errors import FedtinaError
from fedtina.adversary.attacks import (HEAD_ATTACKS, Attack, mislabel, poison_head, poison_update,
                                        targeted_pair)
from fedtina.adversary.privacy import PrivacyConfig, clip_and_noise, fedavg_epsilon, upload_epsilon
from fedtina.runtime.spec import arrays_record, head_record, record_arrays, record_head
from fedtina.zoo.heads import Head

NAMES = ("a", "b", "c", "d")


def _head(seed: int = 0) -> Head:
    rng = np.random.default_rng(seed)
    return Head(NAMES, rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=4).astype(np.float32))


def test_head_attacks_keep_names_and_corrupt_what_they_say():
    h = _head()
    for kind in HEAD_ATTACKS:
        if kind == "mislabeled":
            with pytest.raises(FedtinaError, match="mislabel"):
                poison_head(h, Attack(kind), 0)
            continue
        bad = poison_head(h, Attack(kind), 5)
        assert bad.class_names == NAMES and bad.weight.dtype == np.float32, kind
        assert not np.array_equal(bad.weight, h.weight) or not np.array_equal(bad.bias, h.bias), kind
    np.testing.assert_array_equal(poison_head(h, Attack("permute"), 0).weight, h.weight[[3, 0, 1, 2]])
    np.testing.assert_array_equal(poison_head(h, Attack("sign_flip"), 0).bias, -h.bias)
    np.testing.assert_allclose(poison_head(h, Attack("scale", factor=0.1), 0).weight, h.weight * 0.1, rtol=1e-6)
    rand = poison_head(h, Attack("random"), 3)
    np.testing.assert_allclose(np.linalg.norm(rand.weight, axis=1), np.linalg.norm(h.weight, axis=1), rtol=1e-5)
    assert not np.allclose(rand.weight, poison_head(h, Attack("random"), 4).weight)   # own draw per client
    np.testing.assert_array_equal(poison_head(h, Attack("random", collude=True), 3).weight,
                                  poison_head(h, Attack("random", collude=True), 4).weight)   # one shared draw
    t, src = targeted_pair(4, 2)
    tgt = poison_head(h, Attack("targeted", target=2), 0)
    np.testing.assert_array_equal(tgt.weight[t], h.weight[src])
    np.testing.assert_array_equal(np.delete(tgt.weight, t, 0), np.delete(h.weight, t, 0))
    with pytest.raises(FedtinaError, match="unknown attack kind 'x'"):
        poison_head(h, Attack("x"), 0)


def test_scaling_a_head_by_a_positive_factor_keeps_every_prediction():
    """Why scale x0.1 / x3 pass the gate and cost the probes nothing in the table: a positive factor on weight and
    bias keeps each image's argmax (only the softmax temperature, which Tina's zoo normalisation removes)."""
    h, x = _head(), np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
    for factor in (0.1, 3.0):
        assert np.array_equal(poison_head(h, Attack("scale", factor=factor), 0).predict(x), h.predict(x))


def test_update_attacks_act_on_the_step():
    g = {"weight": np.ones((3, 2), np.float32), "bias": np.zeros(3, np.float32), "steps": np.array([4])}
    u = {"weight": g["weight"] + 0.5, "bias": g["bias"] - 0.25, "steps": np.array([9])}
    flip = poison_update(g, u, Attack("sign_flip", factor=3.0), 0)
    np.testing.assert_allclose(flip["weight"], g["weight"] - 1.5)
    np.testing.assert_allclose(flip["bias"], 0.75)
    np.testing.assert_array_equal(flip["steps"], g["steps"])   # integer arrays are sent as received
    scaled = poison_update(g, u, Attack("scale", factor=10.0), 0)
    np.testing.assert_allclose(scaled["weight"] - g["weight"], 5.0)
    rand = poison_update(g, u, Attack("random", factor=10.0), 0)
    step = np.linalg.norm(u["weight"] - g["weight"])
    assert np.linalg.norm(rand["weight"] - g["weight"]) == pytest.approx(10 * step, rel=1e-5)
    same = [poison_update(g, u, Attack("random", collude=True), s)["weight"] for s in (1, 2)]
    np.testing.assert_array_equal(*same)
    with pytest.raises(FedtinaError, match="valid: sign_flip, scale, random"):
        poison_update(g, u, Attack("label_flip"), 0)


def test_mislabel_is_seeded_and_bounded():
    y = np.arange(40) % 4
    m = mislabel(y, 4, 0.2, 3)
    assert (m != y).sum() == 8 and np.array_equal(m, mislabel(y, 4, 0.2, 3))
    np.testing.assert_array_equal(m[m != y], (y[m != y] + 1) % 4)


# --------------------------------------------------------------------------------------------------------------------
# mods


def _ctx(cid: int) -> Context:
    return Context(run_id=1, node_id=cid + 10, node_config={"partition-id": cid}, state=RecordDict(), run_config={})


def _finetune_msg(sent: Head, cfg: dict) -> Message:
    return Message(RecordDict({"head": head_record(sent), "config": ConfigRecord(
        {"class_names": list(sent.class_names), **cfg})}), dst_node_id=1, message_type="train.finetune")


def _reply_with(head: Head):
    def call_next(msg, ctx):
        return Message(RecordDict({"head": head_record(head), "metrics": MetricRecord({"acc": 0.5})}), reply_to=msg)
    return call_next


def test_attack_mod_poisons_only_the_listed_clients_training_replies(task_identity):
    from fedtina.adversary.mods import attack_mod

    sent, tuned = _head(0), _head(1)
    msg = _finetune_msg(sent, {"poison_clients": [2], "poison_kind": "sign_flip"})
    out = record_head(attack_mod(msg, _ctx(2), _reply_with(tuned)).content["head"], NAMES)
    np.testing.assert_array_equal(out.weight, -tuned.weight)
    honest = record_head(attack_mod(msg, _ctx(1), _reply_with(tuned)).content["head"], NAMES)
    np.testing.assert_array_equal(honest.weight, tuned.weight)
    # an update: sent arrays in, the bad step out
    g, u = {"weight": np.zeros((2, 2), np.float32)}, {"weight": np.ones((2, 2), np.float32)}
    fmsg = Message(RecordDict({"arrays": arrays_record(g), "config": ConfigRecord(
        {"poison_clients": [0], "poison_kind": "scale", "poison_factor": 2.0})}), dst_node_id=1,
        message_type="train.fedavg")
    reply = attack_mod(fmsg, _ctx(0), lambda m, c: Message(RecordDict({"arrays": arrays_record(u)}), reply_to=m))
    np.testing.assert_allclose(record_arrays(reply.content["arrays"])["weight"], 2.0)


def test_upload_privacy_mod_clips_and_noises_the_change(task_identity):
    from fedtina.adversary.mods import upload_privacy_mod

    sent, tuned = _head(0), _head(1)
    msg = _finetune_msg(sent, {"upload_clip": 0.5, "upload_noise": 0.0, "round": 1})
    out = record_head(upload_privacy_mod(msg, _ctx(0), _reply_with(tuned)).content["head"], NAMES)
    change = np.concatenate([(out.weight - sent.weight).ravel(), out.bias - sent.bias])
    full = np.concatenate([(tuned.weight - sent.weight).ravel(), tuned.bias - sent.bias])
    assert np.linalg.norm(change) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(change / 0.5, full / np.linalg.norm(full), atol=1e-5)   # same direction
    off = _finetune_msg(sent, {"upload_clip": 0.0})
    np.testing.assert_array_equal(record_head(upload_privacy_mod(off, _ctx(0), _reply_with(tuned)).content["head"],
                                              NAMES).weight, tuned.weight)


def test_clip_and_noise_matches_rows_by_name_and_has_the_stated_noise():
    sent, tuned = _head(0), _head(1)
    shuffled = Head(tuple(reversed(NAMES)), tuned.weight[::-1].copy(), tuned.bias[::-1].copy())
    a = clip_and_noise(sent, tuned, 100.0, 0.0, np.random.default_rng(0))
    b = clip_and_noise(sent, shuffled, 100.0, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(b.weight[::-1], a.weight, atol=1e-6)   # a large clip keeps the head
    big = Head(NAMES, np.zeros((4, 5000), np.float32), np.zeros(4, np.float32))
    noisy = clip_and_noise(big, big, 2.0, 0.5, np.random.default_rng(0))
    assert np.std(noisy.weight) == pytest.approx(1.0, rel=0.03)


def test_epsilon_from_flowers_accountant():
    assert upload_epsilon(PrivacyConfig()) == float("inf")
    eps = [upload_epsilon(PrivacyConfig(upload_clip=1.0, upload_noise=s)) for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b > 0 for a, b in zip(eps, eps[1:]))
    # RDP of the Gaussian mechanism (alpha / 2 sigma^2) with the simple conversion: an upper bound on Flower's
    sigma, delta = 1.0, 1e-5
    simple = min(a / (2 * sigma**2) + np.log(1 / delta) / (a - 1) for a in np.linspace(1.5, 60, 400))
    assert eps[1] <= simple + 1e-6 and eps[1] > 0.5 * simple
    one = fedavg_epsilon(PrivacyConfig(fedavg_clip=1.0, fedavg_noise=1.0), 1, 10, 10)
    assert fedavg_epsilon(PrivacyConfig(fedavg_clip=1.0, fedavg_noise=1.0), 3, 10, 10) > one


# --------------------------------------------------------------------------------------------------------------------
# the upload loop and the gate, on the tiny assets


@pytest.fixture(scope="module")
def world(tiny):
    from fedtina.config import HeadTrainConfig
    from fedtina.server.gate import HeadCheckConfig
    from fedtina.data.partition import PartitionConfig
    from fedtina.tina.offline import finetune, make_world, serve

    _, assets = tiny
    w = make_world(assets, 12, PartitionConfig(k_min=3, k_max=5, unseen_per_client=1, new_share=0.25))
    service = w.service(HeadCheckConfig())
    sent = serve(service, w, w.contributors)
    return w, service, sent, finetune(w, sent, HeadTrainConfig(steps=10, select=True))


def test_world_splits_contributors_and_probes(world):
    w, _, sent, honest = world
    assert set(w.contributors).isdisjoint(w.probes) and len(w.probes) == 3 and len(w.contributors) == 9
    assert set(sent) == set(honest) == set(w.contributors)


def test_probe_scores_and_collusion(world):
    from fedtina.experiments.attacks import AttackRow, play
    from fedtina.config import HeadTrainConfig
    from fedtina.tina.offline import probe

    w, service, sent, honest = world
    scores = probe(service, w)
    assert 0 <= scores.acc <= 1 and scores.recall
    held = {n for p in w.probes for n in w.data[p].class_names}
    assert set(scores.recall) == held and np.isnan(scores.class_recall(["not a class"]))
    ups, attacked = play(w, AttackRow("targeted", share=0.3, collude=True), 0.2, sent, honest,
                         HeadTrainConfig(steps=5), np.random.default_rng(0))
    bad = [u for u in ups if u.bad]
    assert len(bad) == 3 and len({u.names for u in bad}) == 1 and len(attacked) == 1
    assert all(np.array_equal(u.head.weight, bad[0].head.weight) for u in bad)   # one head, uploaded 3 times
    assert len(ups) == len(w.contributors) and {u.client for u in ups} == set(w.contributors)


def test_the_service_generates_in_order_gates_admits_and_refreshes(world):
    """The Tina service the method and the experiments share: generation keeps the given order whatever its
    batching by size, a malformed upload is refused (never fatal), a what-if refresh admits nothing, `admit` grows
    the zoo (never the cached one) and `refresh` moves Tina."""
    import dataclasses

    from fedtina.server.gate import HeadCheckConfig

    w, service, sent, honest = world
    names = [w.data[i].class_names for i in w.contributors]
    heads = service.generate(names)
    assert [h.class_names for h in heads] == names
    for h, ref in zip(heads, service.tina.generate([list(n) for n in names])):   # one call, as given
        np.testing.assert_array_equal(h.weight, ref.weight)

    ups = [w.upload(i, sent[i], honest[i]) for i in w.contributors]
    verdicts = service.gate(ups)
    assert len(verdicts) == len(ups) and any(v.accepted for v in verdicts)
    good = next(u for u, v in zip(ups, verdicts) if v.accepted)
    wrong = Head(("x", "y"), np.zeros((2, good.head.weight.shape[1]), np.float32), np.zeros(2, np.float32))
    bad = service.check(dataclasses.replace(good, sent=wrong))   # the sent head cannot be aligned: an exception
    assert not bad.accepted and bad.reason.startswith("malformed upload: ") and bad.acc is None

    fresh = w.service(HeadCheckConfig())
    n = len(fresh.zoo)
    accepted = [u for u, v in zip(ups, verdicts) if v.accepted]
    what_if = fresh.refreshed(2, accepted)
    assert len(fresh.zoo) == n and what_if.tina is not fresh.tina and what_if.zoo is fresh.zoo
    fresh.admit([u.entry() for u in accepted])
    assert len(fresh.zoo) == n + len(accepted) and len(w.assets.zoo) == n
    assert fresh.zoo.entries()[-1].source == f"client:{accepted[-1].client}"
    before = fresh.tina
    fresh.refresh(2)
    assert fresh.tina is not before
    a, b = (s.generate(names[:1])[0].weight for s in (service, fresh))
    assert not np.array_equal(a, b)
