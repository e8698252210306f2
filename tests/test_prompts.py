"""Class prompts: names, example images, or both (fedtina/tina/prompt.py), in training and in one generation batch.

A fake world where images carry what names cannot: each class has a true head row, its images' features scatter
around that row, and its name embedding is a random vector. Tina trains on seen classes; for unseen classes only an
image prompt can tell it the row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtina.errors import FedtinaError
from fedtina.tina import TinaTrainer
from fedtina.tina.generator import TinaGenerator
from fedtina.tina.train import load_checkpoint, save_checkpoint
from fedtina.zoo.heads import centered_rows
from fedtina.tina.prompt import ShotBank, compose, image_embedding, prompt_dim, sample_kinds
from test_tina import D, FakeEncoder, FakeEntry, tiny_cfg

SEEN, UNSEEN = 24, 8


def _world(seed: int = 0):
    rng = np.random.default_rng(seed)
    names = [f"class {i}" for i in range(SEEN + UNSEEN)]
    rows = rng.standard_normal((len(names), D)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    shots = {n: (rows[i] + 0.3 * rng.standard_normal((20, D))).astype(np.float32) for i, n in enumerate(names)}
    entries = []
    for _ in range(300):
        idx = rng.choice(SEEN, size=int(rng.integers(3, 7)), replace=False)
        entries.append(FakeEntry(tuple(names[i] for i in idx), {
            "head.weight": 3 * rows[idx] + 0.05 * rng.standard_normal((len(idx), D)).astype(np.float32),
            "head.bias": np.zeros(len(idx), np.float32)}))
    return names, rows, shots, entries


@pytest.fixture(scope="module")
def world():
    names, rows, shots, entries = _world()
    seen_shots = {n: shots[n] for n in names[:SEEN]}   # training sees seen classes' images only
    gen = TinaTrainer(entries, FakeEncoder(), tiny_cfg(train_steps=400), log=None, shots=seen_shots).fit()
    return names, rows, shots, gen


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _generating(gen: TinaGenerator) -> TinaGenerator:
    """`gen` without its imprinted rows: every row generated."""
    return TinaGenerator(gen.model, gen.layout, gen.encoder, gen.cfg, image_dim=gen.image_dim, known=gen.known)


def test_image_prompts_tell_tina_the_rows_of_classes_it_never_saw(world):
    names, rows, shots, gen = world
    gen = _generating(gen)
    unseen = [names[SEEN + i: SEEN + i + 4] for i in (0, 4)]
    few = [[shots[n][:5] for n in s] for s in unseen]
    text = gen.generate(unseen)
    images = gen.generate(unseen, shots=few, use_names=False)
    both = gen.generate(unseen, shots=few)
    true = [rows[[names.index(n) for n in s]] for s in unseen]
    cos = {k: np.mean([_cos(h.weight, t).mean() for h, t in zip(heads, true)])
           for k, heads in (("text", text), ("images", images), ("both", both))}
    # measured (400 steps): text -0.04, images 0.57, both 0.37 (an unknown name pulls toward memorised rows)
    assert cos["text"] < 0.3, cos   # a random name says nothing about an unseen class
    assert cos["images"] > 0.45 and cos["both"] > cos["text"] + 0.2, cos


def test_one_batch_mixes_prompt_kinds_per_class_and_stays_order_invariant(world):
    names, _, shots, gen = world
    s = names[SEEN - 2: SEEN + 2]                       # two seen, two unseen
    mixed = [None, shots[s[1]][:3], None, shots[s[3]][:2]]
    (h,) = gen.generate([s], shots=[mixed])
    # in one batch with other sets of other kinds, the same set gets the same head (no leak across sets)
    h2, _, _ = gen.generate([s, names[:3], names[3:5]], shots=[mixed, None, [shots[n][:4] for n in names[3:5]]])
    np.testing.assert_allclose(h2.weight, h.weight, atol=2e-4)
    order = [3, 1, 0, 2]
    (p,) = gen.generate([[s[i] for i in order]], shots=[[mixed[i] for i in order]])
    np.testing.assert_allclose(p.weight, h.weight[order], atol=2e-4)
    np.testing.assert_allclose(p.bias, h.bias[order], atol=2e-4)


def test_a_class_no_zoo_head_holds_gets_its_imprinted_row_on_the_zoo_scale(world, tmp_path):
    """With images, a class Tina never trained on gets the imprinted row centred and scaled on the zoo's rows
    (heads.centered_rows); a zoo class, or a class named only, keeps its generated row. A checkpoint keeps both."""
    names, _, shots, gen = world
    seen_x = np.concatenate([shots[n] for n in names[:SEEN]])
    assert gen.known == frozenset(names[:SEEN])
    np.testing.assert_allclose(gen.row_scale.center, seen_x.mean(0), rtol=1e-4, atol=1e-6)
    s = [names[0], names[SEEN], names[SEEN + 1]]              # a zoo class, an unseen one with images, one without
    prompts = [[shots[s[0]][:3], shots[s[1]][:5], None]]
    (h,) = gen.generate([s], shots=prompts)
    (r,) = _generating(gen).generate([s], shots=prompts)
    np.testing.assert_array_equal(h.weight[[0, 2]], r.weight[[0, 2]])
    np.testing.assert_array_equal(h.bias[[0, 2]], r.bias[[0, 2]])
    w, b = centered_rows(shots[s[1]][:5], np.zeros(5, int), 1, gen.row_scale)
    np.testing.assert_allclose(h.weight[1], w[0], rtol=1e-5)
    assert h.bias[1] == pytest.approx(b[0], rel=1e-5)
    assert not np.allclose(h.weight[1], r.weight[1], atol=1e-2)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "t.safetensors", gen), gen.encoder)
    assert loaded.known == gen.known and loaded.row_scale.norm == gen.row_scale.norm
    (l,) = loaded.generate([s], shots=prompts)
    np.testing.assert_allclose(l.weight, h.weight, atol=1e-5)


def test_a_refresh_on_uploads_of_new_classes_keeps_imprinting_them(world):
    """A warm start (the federation's refresh) on a zoo grown by heads over unseen classes keeps the classes and row
    scale it started with: a class a few uploads brought still gets its imprinted row when it comes with images."""
    names, rows, shots, gen = world
    new = FakeEntry((names[SEEN], names[0]), {"head.weight": 3 * rows[[SEEN, 0]],
                                              "head.bias": np.zeros(2, np.float32)})
    seen_shots = {n: shots[n] for n in names[:SEEN]}
    grown = TinaTrainer([new] * 20, FakeEncoder(), tiny_cfg(train_steps=2), log=None, shots=seen_shots)
    assert names[SEEN] in grown.known                               # trained from scratch, it would know it
    warm = TinaTrainer([new] * 20, FakeEncoder(), gen.cfg, log=None, init=gen, shots=seen_shots)
    assert warm.known == gen.known and warm.row_scale is gen.row_scale
    refreshed = warm.fit(steps=2)
    (h,) = refreshed.generate([[names[SEEN]]], shots=[[shots[names[SEEN]][:5]]])
    w, _ = centered_rows(shots[names[SEEN]][:5], np.zeros(5, int), 1, gen.row_scale)
    np.testing.assert_allclose(h.weight[0], w[0], rtol=1e-5)


def test_no_imprinted_rows_from_image_prompts_in_another_space():
    """Image prompts of another width than the heads' features (CLIP's image tower) cannot be imprinted as rows."""
    names, _, shots, entries = _world(1)
    wide = {n: np.hstack([x, x[:, :4]]) for n, x in shots.items() if n in names[:SEEN]}
    gen = TinaTrainer(entries, FakeEncoder(), tiny_cfg(train_steps=2), log=None, shots=wide).fit()
    assert gen.image_dim == D + 4 and gen.row_scale is None and gen.known == frozenset(names[:SEEN])
    assert TinaTrainer(entries, FakeEncoder(), tiny_cfg(train_steps=2), log=None).fit().row_scale is None


def test_image_prompt_errors_name_the_class(world):
    names, _, shots, gen = world
    s = names[:2]
    with pytest.raises(FedtinaError, match=r"image prompt of 'class 1'.*\[n, 16\]"):
        gen.generate([s], shots=[[None, np.ones((3, D + 1), np.float32)]])
    with pytest.raises(FedtinaError, match="image prompt of 'class 0'.*zero shots"):
        gen.generate([s], shots=[[np.zeros((0, D), np.float32), None]])
    with pytest.raises(FedtinaError, match="2 entries for 1 label sets"):
        gen.generate([s], shots=[None, None])
    with pytest.raises(FedtinaError, match="1 entries for 2 classes"):
        gen.generate([s], shots=[[None]])
    with pytest.raises(FedtinaError, match="NaN"):
        gen.generate([s], shots=[[np.full((2, D), np.nan, np.float32), None]])


def test_prompt_vectors_and_training_draws():
    assert prompt_dim(32, 16) == 50
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    e = image_embedding(x, 4)
    np.testing.assert_allclose(e, x.mean(0) / np.linalg.norm(x.mean(0)), rtol=1e-6)
    p = compose(torch.ones(1, 2, 3), torch.full((1, 2, 4), 2.0), torch.tensor([[True, False]]),
                torch.tensor([[False, True]]))
    assert p.shape == (1, 2, 9)
    assert p[0, 0].tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 0] and p[0, 1].tolist() == [0, 0, 0, 2, 2, 2, 2, 0, 1]

    gen = torch.Generator().manual_seed(0)
    use_text, use_images = sample_kinds(torch.Size([20000]), (0.5, 0.25, 0.25), gen, torch.device("cpu"))
    assert bool((use_text | use_images).all())                       # every prompt says something
    assert abs(float((use_text & ~use_images).float().mean()) - 0.5) < 0.02
    assert abs(float((use_images & ~use_text).float().mean()) - 0.25) < 0.02

    # a class with 3 images: every draw averages 1..3 of them; a class without images is flagged unavailable
    feats = {"a": np.eye(4, dtype=np.float32)[:3], "b": np.zeros((0, 4), np.float32)}
    bank = ShotBank(feats, ["a", "b"], 4, max_shots=16)
    emb, available = bank.sample(torch.zeros(500, 1, dtype=torch.long), gen)
    assert bool(available.all())
    support = (emb[:, 0, :3] > 0).sum(1)
    assert set(support.tolist()) == {1, 2, 3} and bool((emb[:, 0, 3] == 0).all())
    _, available = bank.sample(torch.ones(2, 1, dtype=torch.long), gen)
    assert not bool(available.any())
