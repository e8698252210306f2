"""Head training on frozen features: batched fine-tuning, scratch, oracle, selection, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedtina.zoo.heads as heads_mod
from fedtina.config import HeadTrainConfig
from fedtina.errors import FedtinaError, LabelSetError, UnknownClassError
from fedtina.zoo.heads import (Head, OracleGrid, RowScale, _check_tasks, _grad, _objective, _pack, _pull_terms,
                               accuracy, finetune_heads, generic_rows, generic_scale, imprint_missing, imprint_rows,
                               mixed_head, oracle_heads, oracle_search, selection_head, stratified_split,
                               train_scratch_heads)

D = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def make_world(num_classes=12, d=D, seed=0, spread=1.5, noise_init=1.0):
    """Gaussian class clusters ("features") and a noisy "generic" row per class."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=spread, size=(num_classes, d)).astype(np.float32)
    generic = (means + rng.normal(scale=noise_init, size=means.shape)).astype(np.float32)
    return rng, means, generic


def make_task(rng, means, generic, classes, n_per_class=20, noise=1.0):
    y = np.repeat(np.arange(len(classes)), n_per_class)
    x = (means[list(classes)][y] + rng.normal(scale=noise, size=(len(y), means.shape[1]))).astype(np.float32)
    init = Head(tuple(f"c{c}" for c in classes), generic[list(classes)].copy(), np.zeros(len(classes), np.float32))
    return init, (x, y)


def make_tasks(num_tasks=8, ks=(4,), n_per_class=20, seed=0, **world):
    rng, means, generic = make_world(seed=seed, **world)
    inits, data = [], []
    for t in range(num_tasks):
        k = ks[t % len(ks)]
        init, task = make_task(rng, means, generic, rng.choice(len(means), k, replace=False), n_per_class)
        inits.append(init)
        data.append(task)
    return inits, data


def mean_acc(heads, data):
    return float(np.mean([accuracy(h, x, y) for h, (x, y) in zip(heads, data)]))


def test_accuracy_counts_hits():
    head = Head(("a", "b"), np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.zeros(2, np.float32))
    x = np.array([[2, 0], [0, 2], [2, 0], [0, 2]], np.float32)
    assert accuracy(head, x, np.array([0, 1, 1, 1])) == 0.75


def test_finetune_improves_over_init_and_keeps_order():
    inits, data = make_tasks(num_tasks=6, ks=(5,), noise_init=3.0)
    heads = finetune_heads(inits, data, HeadTrainConfig(steps=100, lr=0.05))
    assert [h.class_names for h in heads] == [h.class_names for h in inits]
    assert all(h.weight.shape == i.weight.shape and h.weight.dtype == np.float32 for h, i in zip(heads, inits))
    assert mean_acc(heads, data) > mean_acc(inits, data) + 0.1
    assert mean_acc(heads, data) > 0.9


def test_zero_steps_returns_init():
    inits, data = make_tasks(num_tasks=2)
    heads = finetune_heads(inits, data, HeadTrainConfig(steps=0))
    for h, i in zip(heads, inits):
        np.testing.assert_array_equal(h.weight, i.weight)


def test_batched_equals_unbatched():
    inits, data = make_tasks(num_tasks=7, ks=(3, 6, 4), seed=1)
    # different sample counts per task as well
    data = [(x[: len(x) - 3 * t], y[: len(y) - 3 * t]) for t, (x, y) in enumerate(data)]
    cfg = HeadTrainConfig(steps=60, lr=0.05, l2_to_init=1e-2, weight_decay=1e-3)
    batched = finetune_heads(inits, data, cfg, device="cpu")
    for t in (0, 1, 5):
        alone = finetune_heads([inits[t]], [data[t]], cfg, device="cpu")[0]
        np.testing.assert_allclose(batched[t].weight, alone.weight, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(batched[t].bias, alone.bias, atol=1e-4, rtol=1e-4)


def test_matches_torch_adam_reference():
    """One task with autograd + torch.optim.Adam on the same objective gives the same rows."""
    inits, data = make_tasks(num_tasks=1, ks=(5,), seed=2)
    cfg = HeadTrainConfig(steps=30, lr=0.05, l2_to_init=0.1, weight_decay=0.01)
    ours = finetune_heads(inits, data, cfg, device="cpu")[0]
    x, y = (torch.from_numpy(a) for a in data[0])
    w0, b0 = torch.from_numpy(inits[0].weight), torch.from_numpy(inits[0].bias)
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = torch.optim.Adam([w, b], lr=cfg.lr)
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(x @ w.T + b, y)
                + cfg.l2_to_init * (((w - w0) ** 2).sum() + ((b - b0) ** 2).sum()) + cfg.weight_decay * (w ** 2).sum())
        loss.backward()
        opt.step()
    np.testing.assert_allclose(ours.weight, w.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(ours.bias, b.detach().numpy(), atol=1e-4)


def test_closed_form_gradient_matches_autograd_with_padding_and_replicas():
    inits, data = make_tasks(num_tasks=3, ks=(2, 5, 3), seed=3)
    data = [(x[: 25 + 5 * t], y[: 25 + 5 * t]) for t, (x, y) in enumerate(data)]
    ws, bs, checked = _check_tasks(inits, data)
    p = _pack(ws, bs, checked, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    w = p.w0[:, None].repeat(1, 2, 1, 1) + 0.1 * torch.randn(3, 2, *p.w0.shape[1:], generator=g)
    w = w * p.row_ok[:, None, :, None]
    b = (p.b0[:, None].repeat(1, 2, 1) + 0.1 * torch.randn(3, 2, p.b0.shape[1], generator=g)) * p.row_ok[:, None]
    l2 = torch.tensor([[0.1, 0.0], [1e-3, 0.5], [0.2, 0.2]])
    wd = torch.tensor([[0.0, 0.01], [0.0, 0.0], [0.1, 0.0]])
    wa, ba = w.clone().requires_grad_(), b.clone().requires_grad_()
    _objective(p, wa, ba, l2, wd).backward()
    gw, gb = _grad(p, w, b, _pull_terms(p, l2, wd))
    np.testing.assert_allclose(gw, wa.grad, atol=1e-5)
    np.testing.assert_allclose(gb, ba.grad, atol=1e-5)
    assert torch.all(gw[~p.row_ok[:, None].expand(-1, 2, -1)] == 0)  # padded rows never move


def test_variable_k_heads_have_their_own_shapes():
    inits, data = make_tasks(num_tasks=5, ks=(2, 7, 3, 10, 4), seed=4)
    heads = finetune_heads(inits, data, HeadTrainConfig(steps=50))
    assert [h.k for h in heads] == [2, 7, 3, 10, 4]
    assert all(h.weight.shape == (h.k, D) and h.bias.shape == (h.k,) for h in heads)
    assert all(np.isfinite(h.weight).all() and np.isfinite(h.bias).all() for h in heads)
    assert mean_acc(heads, data) >= mean_acc(inits, data)


def test_large_l2_pull_keeps_rows_close():
    inits, data = make_tasks(num_tasks=4, ks=(5,), noise_init=3.0, seed=5)
    free = finetune_heads(inits, data, HeadTrainConfig(steps=100, lr=0.05, l2_to_init=0.0))
    held = finetune_heads(inits, data, HeadTrainConfig(steps=100, lr=0.05, l2_to_init=100.0))
    dist = lambda hs: np.mean([np.linalg.norm(h.weight - i.weight) for h, i in zip(hs, inits)])  # noqa: E731
    assert dist(held) < 0.1 * dist(free)
    assert dist(held) < 0.1


def test_scratch_learns_from_zero():
    inits, data = make_tasks(num_tasks=3, ks=(4,), seed=6)
    heads = train_scratch_heads([i.class_names for i in inits], data, HeadTrainConfig(steps=100, lr=0.05), d=D)
    assert mean_acc(heads, data) > 0.8
    assert [h.class_names for h in heads] == [i.class_names for i in inits]


def test_selection_uses_generic_rows_and_nearest_name_for_unseen():
    rows = {"maple tree": (np.full(3, 1.0, np.float32), 0.5), "tractor": (np.full(3, 2.0, np.float32), -1.0)}
    emb = {"maple tree": np.array([1.0, 0.0]), "tractor": np.array([0.0, 1.0]),
           "oak tree": np.array([0.9, 0.2]), "bulldozer": np.array([0.1, 5.0])}
    head = selection_head(["tractor", "oak tree", "bulldozer"], rows, emb)
    assert head.class_names == ("tractor", "oak tree", "bulldozer")
    np.testing.assert_array_equal(head.weight, np.array([[2, 2, 2], [1, 1, 1], [2, 2, 2]], np.float32))
    np.testing.assert_array_equal(head.bias, np.array([-1.0, 0.5, -1.0], np.float32))
    # the same through an encoder-like callable
    head2 = selection_head(["oak tree"], rows, lambda names: np.stack([emb[n] for n in names]))
    np.testing.assert_array_equal(head2.weight, [[1, 1, 1]])
    with pytest.raises(UnknownClassError, match="oak tree"):
        selection_head(["oak tree"], rows)
    with pytest.raises(LabelSetError):
        selection_head(["tractor", "tractor"], rows)
    with pytest.raises(LabelSetError):
        selection_head([], rows)


def test_generic_rows_from_bank():
    class Bank:
        generic_weight = np.arange(6, dtype=np.float32).reshape(3, 2)
        generic_bias = np.array([0.1, 0.2, 0.3], np.float32)
        seen = np.array([4, 0, 2])
    rows = generic_rows(Bank, ["a", "b", "c", "d", "e"])
    assert list(rows) == ["e", "a", "c"]
    np.testing.assert_array_equal(rows["a"][0], [2, 3])
    assert rows["c"][1] == np.float32(0.3)


def test_mixed_head_keeps_generic_rows_and_imprints_the_others_centred_on_their_scale():
    """Toy world: 4 classes have generic rows of norm 6, 2 (unseen or novel) have none. The mixed head keeps the 4
    rows as they are, imprints the 2 from their centred means at norm 6 with the bias that gives them the generic
    rows' mean logit at the centre, and is selection's head when every class has a generic row."""
    rng = np.random.default_rng(0)
    centres = np.eye(6, D, dtype=np.float32)
    x = centres[np.repeat(np.arange(6), 10)] + 0.05 * rng.standard_normal((60, D)).astype(np.float32)
    y = np.repeat(np.arange(6), 10)
    names = [f"c{i}" for i in range(6)]
    rows = {names[i]: (6 * centres[i], np.float32(0.5)) for i in range(4)}
    bank = type("Bank", (), {"generic_weight": 6 * centres[:4], "generic_bias": np.full(4, 0.5, np.float32),
                             "features": x})
    scale = generic_scale(bank, np.flatnonzero(y < 4))                # trained on the 4 classes' images
    np.testing.assert_allclose(scale.center, x[y < 4].mean(0), rtol=1e-5)
    assert scale.norm == pytest.approx(6.0)
    assert scale.offset == pytest.approx(float(np.mean(6 * centres[:4] @ scale.center + 0.5)), rel=1e-5)
    order = ["c4", "c1", "c5", "c0"]                                  # positions: labels follow this order
    pos = np.array([order.index(n) if n in order else -1 for n in names])
    keep = pos[y] >= 0
    head = mixed_head(order, x[keep], pos[y[keep]], rows, scale)
    np.testing.assert_array_equal(head.weight[[1, 3]], 6 * centres[[1, 0]])
    for j, c in ((0, 4), (2, 5)):
        m = x[y == c].mean(0) - scale.center
        np.testing.assert_allclose(head.weight[j], 6 * m / np.linalg.norm(m), rtol=1e-5)
        assert head.weight[j] @ scale.center + head.bias[j] == pytest.approx(scale.offset, abs=1e-5)
    assert head.bias[[1, 3]].tolist() == [0.5, 0.5]
    np.testing.assert_allclose(np.linalg.norm(head.weight, axis=1), 6.0, rtol=1e-5)   # one scale
    assert accuracy(head, x[keep], pos[y[keep]]) == 1.0
    known = ["c2", "c0"]
    sel, mix = selection_head(known, rows), mixed_head(known, x[:2], np.array([0, 1]), rows, scale)
    np.testing.assert_array_equal(sel.weight, mix.weight)
    np.testing.assert_array_equal(sel.bias, mix.bias)
    with pytest.raises(LabelSetError, match="an image of every class"):
        mixed_head(["c4", "c5"], x[y == 4], np.zeros(10, int), rows, scale)   # no image of c5
    np.testing.assert_allclose(imprint_rows(x[y == 4], np.zeros(10, int), 1, 2.0)[0],
                               2 * x[y == 4].mean(0) / np.linalg.norm(x[y == 4].mean(0)), rtol=1e-5)


def test_centred_imprinted_rows_do_not_steal_the_trained_rows_images():
    """ReLU-like features share a large common component. A linear head trained on 6 classes, plus 2 new classes'
    rows imprinted from 5 images each: raw imprinted rows (unit class mean at the trained norm, the trained mean
    bias) take most of the trained classes' images; centred ones (RowScale) leave them and still find their own."""
    rng = np.random.default_rng(1)
    k, d, n = 8, 24, 40
    protos = np.abs(rng.standard_normal((k, d))).astype(np.float32) + 3.0           # positive, a shared offset
    y = np.repeat(np.arange(k), n)
    x = np.maximum(protos[y] + 0.8 * rng.standard_normal((k * n, d)).astype(np.float32), 0)
    trained = np.flatnonzero(y < 6)
    init = Head(tuple(f"c{i}" for i in range(6)), np.zeros((6, d), np.float32), np.zeros(6, np.float32))
    head = finetune_heads([init], [(x[trained], y[trained])], HeadTrainConfig(steps=300, lr=0.05, l2_to_init=0.0))[0]
    scale = RowScale.of(head.weight, head.bias, x[trained])
    shots = np.concatenate([np.flatnonzero(y == c)[:5] for c in (6, 7)])
    names = head.class_names + ("c6", "c7")
    padded = Head(names, np.vstack([head.weight, np.zeros((2, d), np.float32)]),
                  np.concatenate([head.bias, np.zeros(2, np.float32)]))
    centred = imprint_missing(padded, [6, 7], x[shots], y[shots], scale)
    raw_w = imprint_rows(x[shots], y[shots] - 6, 2, scale.norm)
    raw = Head(names, np.vstack([head.weight, raw_w]), np.concatenate([head.bias, np.full(2, head.bias.mean())]))
    old = np.flatnonzero(y < 6)
    new = np.setdiff1d(np.flatnonzero(y >= 6), shots)
    assert accuracy(head, x[old], y[old]) > 0.9                                       # the trained rows work
    assert accuracy(raw, x[old], y[old]) < 0.5                                        # raw rows steal their images
    assert accuracy(centred, x[old], y[old]) > 0.8
    assert accuracy(centred, x[new], y[new]) > 0.8
    assert imprint_missing(head, [], x, y, scale) is head


def test_stratified_split_keeps_every_class_in_train():
    y = np.array([0] * 10 + [1] * 3 + [2])
    tr, va = stratified_split(y, 0.3, np.random.default_rng(0))
    assert sorted(np.concatenate([tr, va])) == list(range(len(y)))
    assert set(y[tr]) == {0, 1, 2} and list(np.bincount(y[va], minlength=3)) == [3, 1, 0]


def test_oracle_at_least_as_good_as_finetune_on_held_out_data(monkeypatch):
    """Noisy generic rows, 20 training images per class: the oracle's own hold-out choice must beat the fixed config
    on fresh test images of the same classes."""
    base = HeadTrainConfig(steps=100, lr=0.05, l2_to_init=1e-3)
    rng, means, generic = make_world(num_classes=20, seed=12, spread=0.7, noise_init=0.5)
    inits, train, test = [], [], []
    for _ in range(24):
        classes = rng.choice(20, 5, replace=False)
        init, tr = make_task(rng, means, generic, classes, n_per_class=20, noise=1.0)
        _, te = make_task(rng, means, generic, classes, n_per_class=100, noise=1.0)
        inits.append(init)
        train.append(tr)
        test.append(te)
    chosen = []
    monkeypatch.setattr(heads_mod, "oracle_search", lambda *a, **kw: chosen.extend(oracle_search(*a, **kw)) or chosen)
    oracle = oracle_heads(inits, train, base, seed=0)
    ft = finetune_heads(inits, train, base)
    assert mean_acc(oracle, test) > mean_acc(ft, test)
    assert len(chosen) == 24 and len({(c.steps, c.lr, c.l2_to_init) for c in chosen}) > 1  # really per task
    assert all(c.steps in OracleGrid().steps + (base.steps,) for c in chosen)


def test_oracle_refit_uses_the_chosen_config():
    inits, data = make_tasks(num_tasks=3, ks=(3,), seed=8)
    grid = OracleGrid(steps=(10,), lr=(0.05,), l2_to_init=(0.0,))
    base = HeadTrainConfig(steps=10, lr=0.05, l2_to_init=0.0)
    cfgs = oracle_search(inits, data, base, grid=grid)
    assert all((c.steps, c.lr, c.l2_to_init) == (10, 0.05, 0.0) for c in cfgs)
    heads = oracle_heads(inits, data, base, grid=grid)
    ref = finetune_heads(inits, data, base)
    for h, r in zip(heads, ref):
        np.testing.assert_allclose(h.weight, r.weight, atol=1e-5)


@pytest.mark.parametrize("bad, error, match", [
    (lambda i, d: (i, d[:-1]), FedtinaError, "one per task"),
    (lambda i, d: (i, d[:1] + [(d[1][0][:0], d[1][1][:0])] + d[2:]), FedtinaError, "task 1"),
    (lambda i, d: (i, d[:2] + [(d[2][0], d[2][1] + 1)]), LabelSetError, "task 2.*k=4"),
    (lambda i, d: (i, [(d[0][0], d[0][1] - 1)] + d[1:]), LabelSetError, "task 0"),
    (lambda i, d: (i, d[:1] + [(d[1][0][:, :5], d[1][1])] + d[2:]), FedtinaError, "task 1.*d=5"),
    (lambda i, d: (i, d[:1] + [(d[1][0], d[1][1][:-1])] + d[2:]), FedtinaError, "task 1"),
    (lambda i, d: (i, d[:1] + [(d[1][0], d[1][1].astype(float))] + d[2:]), FedtinaError, "integers"),
    (lambda i, d: ([i[0], Head(("a", "a", "b", "c"), i[1].weight, i[1].bias), i[2]], d), LabelSetError, "task 1"),
    (lambda i, d: ([i[0], i[1], Head(i[2].class_names, i[2].weight[:3], i[2].bias)], d), FedtinaError, "task 2"),
])
def test_bad_inputs_name_the_task(bad, error, match):
    inits, data = make_tasks(num_tasks=3, ks=(4,), seed=9)
    bad_inits, bad_data = bad(inits, data)
    with pytest.raises(error, match=match):
        finetune_heads(bad_inits, bad_data, HeadTrainConfig(steps=1))
    with pytest.raises(error, match=match):
        oracle_heads(bad_inits, bad_data, HeadTrainConfig(steps=1))


def test_nan_features_rejected():
    inits, data = make_tasks(num_tasks=2, seed=10)
    x = data[1][0].copy()
    x[0, 0] = np.nan
    with pytest.raises(FedtinaError, match="task 1.*NaN"):
        finetune_heads(inits, [data[0], (x, data[1][1])], HeadTrainConfig(steps=1))


def test_empty_task_list():
    assert finetune_heads([], [], HeadTrainConfig()) == []
    assert oracle_heads([], [], HeadTrainConfig()) == []


def test_oracle_keeps_the_received_head_when_nothing_can_be_held_out():
    rng = np.random.default_rng(0)
    init = Head(("a", "b", "c"), rng.standard_normal((3, 4)).astype(np.float32), np.zeros(3, np.float32))
    one_shot = (rng.standard_normal((3, 4)).astype(np.float32), np.arange(3))   # one image per class
    (cfg,) = oracle_search([init], [one_shot], HeadTrainConfig(steps=10, lr=0.05))
    assert cfg.steps == 0
    (kept,) = oracle_heads([init], [one_shot], HeadTrainConfig(steps=10, lr=0.05))
    np.testing.assert_allclose(kept.weight, init.weight)
    np.testing.assert_allclose(kept.bias, init.bias)
