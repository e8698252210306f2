"""The Gidaris & Komodakis rival (fedtina/tina/rival.py) on toy data: its fake-novel training episodes hide a class's
known row from every attention, a novel pool chooses those classes, and it trains and generates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedtina.errors import FedtinaError
from fedtina.tina.layout import ParamLayout
from fedtina.tina.rival import GidarisNet, KnownRows, hide, mean_features, novel_pool, train_rival, visible
from fedtina.tina.train import ZooTensors
from test_prompts import SEEN, _cos, _world
from test_tina import D, FakeEncoder, tiny_cfg


@pytest.fixture(scope="module")
def world():
    names, rows, shots, entries = _world()
    return names, rows, {n: shots[n] for n in names[:SEEN]}, shots, entries


def _data(entries, enc, seen_shots) -> ZooTensors:
    return ZooTensors(entries, enc, ParamLayout(D).fit(e.params for e in entries), seen_shots, image_dim=D)


def _episode(data: ZooTensors, seed: int):
    return data.episode(64, 8, 0.5, torch.Generator().manual_seed(seed), (0.5, 0.25, 0.25))


def test_fake_novel_episodes_never_let_a_hidden_class_row_reach_the_attention(world):
    names, _, seen_shots, _, entries = world
    enc = FakeEncoder()
    data, known = _data(entries, enc, seen_shots), KnownRows.fit(entries, enc)
    feats, has_feats = mean_features(known.names, seen_shots, D)
    ep = _episode(data, 0)
    hidden = hide(ep, novel_pool(known.names, None), 0.5, torch.Generator().manual_seed(1))
    assert hidden.any() and not (hidden & ~ep.mask).any()
    readable = visible(ep.names, hidden, len(known.names))
    net = GidarisNet(enc.dim, D, known.temperature)
    with torch.no_grad():
        net.phi_img.fill_(1.0)   # the image attention counts too (it starts switched off)
    run = lambda: net(known, feats, has_feats, data.text[ep.names], ep.images, ep.use_images, readable)  # noqa
    with torch.no_grad():
        before = run()
        checked = 0
        for c in range(len(known.names)):
            hidden_in = (hidden & (ep.names == c)).any(1)     # tasks where class c is fake-novel
            if not hidden_in.any():
                continue
            assert not readable[hidden_in, c].any() and readable[~hidden_in, c].all()
            saved = known.rows.clone(), known.emb.clone(), feats.clone()
            for leak in ("row", "keys"):   # its known row; its name and mean features, the attentions' keys
                if leak == "row":
                    known.rows[c] += 1e3
                else:
                    known.emb[c], feats[c] = -known.emb[c], -feats[c]
                after = run()
                known.rows.copy_(saved[0])
                known.emb.copy_(saved[1])
                feats.copy_(saved[2])
                torch.testing.assert_close(after[hidden_in], before[hidden_in], rtol=0, atol=0)
                assert not torch.equal(after[~hidden_in], before[~hidden_in]), leak   # the check can see a leak
            checked += 1
    assert checked >= 5


def test_a_novel_pool_chooses_the_fake_novel_classes(world):
    names, _, seen_shots, _, entries = world
    data = _data(entries, FakeEncoder(), seen_shots)
    pool = set(names[:6])
    ep = _episode(data, 1)
    hidden = hide(ep, novel_pool(data.names, pool), 1.0, torch.Generator().manual_seed(2))
    chosen = {data.names[i] for i in ep.names[hidden].tolist()}
    present = {data.names[i] for i in ep.names[ep.mask].tolist()}
    assert chosen == pool & present                              # share 1: every pool class present is hidden
    assert not hide(ep, novel_pool(data.names, pool), 0.0, torch.Generator()).any()
    with pytest.raises(FedtinaError, match="novel pool: classes"):
        novel_pool(data.names, {"class 99"})


def test_the_gidaris_rival_trains_and_generates_on_toy_data(world):
    names, rows, seen_shots, shots, entries = world
    cfg = tiny_cfg(train_steps=300, lr=1e-2)
    untrained = train_rival(entries, FakeEncoder(), dataclasses.replace(cfg, train_steps=0), hidden_share=0.5,
                            shots=seen_shots)
    rival = train_rival(entries, FakeEncoder(), cfg, hidden_share=0.5, shots=seen_shots)
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
