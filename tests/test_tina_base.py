"""A Tina that corrects a baseline row (TinaConfig.base=auto, fedtina/tina/base.py), its fake-novel training
episodes, and the Gidaris & Komodakis rival trained on the same episodes (fedtina/tina/rival.py), on toy data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedtina.assets import tina_key
from fedtina.config import TinaConfig
from fedtina.errors import FedtinaError
from fedtina.tina import TinaTrainer
from fedtina.tina.base import KnownRows
from fedtina.tina.rival import train_rival
from fedtina.tina.train import ZooTensors, check_objective, load_checkpoint, refresh, save_checkpoint
from test_prompts import SEEN, _cos, _world
from test_tina import D, FakeEncoder, FakeEntry, tiny_cfg


@pytest.fixture(scope="module")
def world():
    names, rows, shots, entries = _world()
    return names, rows, {n: shots[n] for n in names[:SEEN]}, shots, entries


def _softmax(z: np.ndarray) -> np.ndarray:
    w = np.exp(z - z.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


def test_zero_correction_gives_exactly_the_baseline_row(world):
    names, _, seen_shots, shots, entries = world
    trainer = TinaTrainer(entries, FakeEncoder(), tiny_cfg(base="auto"), log=None, shots=seen_shots)
    gen = trainer.generator()   # untrained: the zero-initialised output layer predicts a zero correction
    sets = [(names[0], names[SEEN], names[5]), (names[SEEN + 1], names[2])]
    few = [[None, shots[names[SEEN]][:3], shots[names[5]][:2]], None]
    heads = gen.generate(sets, shots=few)
    base, _ = gen.baselines(sets, few)
    for h, b, s in zip(heads, base, sets):
        np.testing.assert_array_equal(h.weight, b[:len(s), :D])
        np.testing.assert_array_equal(h.bias, b[:len(s), D])

    # the baselines, recomputed from the zoo by hand: the imprinted shots, else the name mix of the mean zoo rows
    known = sorted({n for e in entries for n in e.class_names})
    per = {n: [] for n in known}
    for e in entries:
        for j, n in enumerate(e.class_names):
            per[n].append(np.append(e.params["head.weight"][j], e.params["head.bias"][j]))
    mean_rows = np.stack([np.mean(per[n], 0) for n in known])
    scale = np.mean([np.linalg.norm(r[:D]) for n in known for r in per[n]])
    emb = FakeEncoder().embed_names(known)
    mixed = lambda n: _softmax(FakeEncoder().embed_names([n])[0] @ emb.T / gen.known.temperature) @ mean_rows  # noqa
    m = shots[names[SEEN]][:3].mean(0)
    np.testing.assert_allclose(heads[0].weight[1], scale * m / np.linalg.norm(m), rtol=1e-4)
    assert heads[0].bias[1] == 0.0
    np.testing.assert_allclose(heads[0].weight[0], mixed(names[0])[:D], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(heads[1].bias, [mixed(names[SEEN + 1])[D], mixed(names[2])[D]], atol=1e-5)

    with torch.no_grad():   # any correction moves the rows off the baseline
        gen.model.final_layer.linear.bias.fill_(0.1)
    moved = gen.generate(sets, shots=few)
    assert not np.allclose(moved[0].weight, heads[0].weight)


def _episode(data: ZooTensors, seed: int):
    return data.episode(64, 8, 0.5, torch.Generator().manual_seed(seed), (0.5, 0.25, 0.25))


def test_fake_novel_episodes_never_read_a_hidden_class_row(world):
    names, _, seen_shots, _, entries = world
    trainer = TinaTrainer(entries, FakeEncoder(), tiny_cfg(base="auto", hidden_share=0.5), log=None,
                          shots=seen_shots)
    data = trainer.data
    ep = _episode(data, 0)
    assert ep.hidden.any() and not (ep.hidden & ~ep.mask).any()
    before = data.batch(ep)
    rows, emb = data.known.rows.clone(), data.known.emb.clone()
    checked = 0
    for c in range(len(data.names)):
        hidden_in = (ep.hidden & (ep.names == c)).any(1)          # episodes where class c is fake-novel
        read_in = ((ep.names == c) & ep.mask & ~ep.hidden & ~ep.use_images).any(1)   # named, its own row mixed
        if not hidden_in.any() or not read_in.any():
            continue
        data.known.rows[c] += 1e3   # every zoo row of class c, as the mix reads them, and its name
        data.known.emb[c] = -data.known.emb[c]
        after = data.batch(ep)
        data.known.rows.copy_(rows)
        data.known.emb.copy_(emb)
        for t_before, t_after in ((before.x0, after.x0), (before.prompt, after.prompt)):
            torch.testing.assert_close(t_after[hidden_in], t_before[hidden_in], rtol=0, atol=0)
            assert not torch.equal(t_after[read_in], t_before[read_in])    # the check can see a leak
        checked += 1
    assert checked >= 5


def test_a_novel_pool_chooses_the_fake_novel_classes(world):
    names, _, seen_shots, _, entries = world
    enc = FakeEncoder()
    layout = TinaTrainer(entries, enc, tiny_cfg(), log=None).layout
    pool = set(names[:6])
    data = ZooTensors(entries, enc, layout, seen_shots, known=KnownRows.fit(entries, enc), hidden_share=1.0,
                      novel=pool, image_dim=D)
    ep = _episode(data, 1)
    hidden = {data.names[i] for i in ep.names[ep.hidden].tolist()}
    present = {data.names[i] for i in ep.names[ep.mask].tolist()}
    assert hidden == pool & present                              # share 1: every pool class present is hidden
    with pytest.raises(FedtinaError, match="novel pool: classes"):
        ZooTensors(entries, enc, layout, known=KnownRows.fit(entries, enc), novel={"class 99"})


def test_base_option_checkpoint_and_cache_key(world, tmp_path):
    names, _, seen_shots, shots, entries = world
    gen = TinaTrainer(entries, FakeEncoder(), tiny_cfg(base="auto", train_steps=20), log=None,
                      shots=seen_shots).fit()
    sets = [names[SEEN:SEEN + 3]]
    few = [[shots[names[SEEN]][:2], None, None]]
    path = save_checkpoint(tmp_path / "base.safetensors", gen)
    again = load_checkpoint(path, FakeEncoder())
    assert again.known.names == gen.known.names and again.known.temperature == gen.known.temperature
    np.testing.assert_allclose(again.generate(sets, shots=few)[0].weight, gen.generate(sets, shots=few)[0].weight,
                               atol=1e-6)

    enc = FakeEncoder()
    # base off: the key Tina had before the option existed (its cached checkpoints stay valid)
    assert tina_key(TinaConfig(), enc, 600) == "fake-encoder-n600-671ea944c5cf"
    assert tina_key(TinaConfig(hidden_share=0.1), enc, 600, novel=["a"]) == tina_key(TinaConfig(), enc, 600)
    on = tina_key(TinaConfig(base="auto"), enc, 600)
    assert on != tina_key(TinaConfig(), enc, 600)
    assert on != tina_key(TinaConfig(base="auto", hidden_share=0.1), enc, 600)
    assert on != tina_key(TinaConfig(base="auto"), enc, 600, novel=["a"])


def test_bad_base_options_are_errors(world):
    names, _, seen_shots, _, entries = world
    with pytest.raises(FedtinaError, match="base must be one of"):
        check_objective(TinaConfig(base="selection"))
    wide = {n: np.hstack([x, x]) for n, x in seen_shots.items()}   # image prompts wider than the head's features
    with pytest.raises(FedtinaError, match="imprints image prompts as rows"):
        TinaTrainer(entries, FakeEncoder(), tiny_cfg(base="auto"), log=None, shots=wide)


def test_the_gidaris_rival_trains_and_generates_on_toy_data(world):
    names, rows, seen_shots, shots, entries = world
    cfg = tiny_cfg(train_steps=300, lr=1e-2)
    untrained = train_rival(entries, FakeEncoder(), dataclasses.replace(cfg, train_steps=0), shots=seen_shots)
    rival = train_rival(entries, FakeEncoder(), cfg, shots=seen_shots)
    known = [names[:4], names[4:8]]
    true = [3 * rows[[names.index(n) for n in s]] for s in known]
    err = {k: np.mean([((h.weight - t) ** 2).mean() for h, t in zip(r.generate(known), true)])
           for k, r in (("before", untrained), ("after", rival))}
    assert err["after"] < 0.5 * err["before"], err    # training sharpens the name attention onto the own row
    unseen = [names[SEEN:SEEN + 4]]
    (h,) = rival.generate(unseen, shots=[[shots[n][:5] for n in unseen[0]]])
    assert h.weight.shape == (4, D) and h.class_names == tuple(unseen[0])
    assert _cos(h.weight, rows[SEEN:SEEN + 4]).mean() > 0.8     # images carry the rows of classes it never saw
    with pytest.raises(FedtinaError, match="shots of label set 0"):
        rival.generate(unseen, shots=[[None]])


def test_a_refresh_knows_the_classes_the_grown_zoo_brought(world):
    names, rows, seen_shots, _, entries = world
    gen = TinaTrainer(entries, FakeEncoder(), tiny_cfg(base="auto", train_steps=20), log=None,
                      shots=seen_shots).fit()
    new = names[SEEN]                                      # a class no zoo head held
    upload = FakeEntry((new, names[0]), {"head.weight": 3 * rows[[SEEN, 0]], "head.bias": np.zeros(2, np.float32)})
    assert new not in gen.known.names
    grown = refresh(gen, entries + [upload], steps=2, shots=seen_shots)
    assert new in grown.known.names and grown.cfg.base == "auto"
    (before,), _ = gen.baselines([(new,)], None)
    (after,), _ = grown.baselines([(new,)], None)
    cos = [float(_cos(b[:, :D], rows[[SEEN]])[0]) for b in (before, after)]
    assert cos[1] > cos[0] + 0.4, cos   # its own row now weighs in its name mix
