"""The benchmark's shots axis on toy data: shot draws, the imprint baseline, bad `bench.shots` values."""

from __future__ import annotations

import numpy as np
import pytest

from fedtina.errors import FedtinaError
from fedtina.experiments.bench import format_shots
from fedtina.tina.shots import check_shots, draw_shots, imprint_heads
from fedtina.zoo.heads import accuracy


def test_draws_take_n_per_class_deterministically_and_only_from_the_training_part():
    y = np.array([0] * 6 + [1] * 2 + [2] * 4)
    a = draw_shots(y, 3, 3, np.random.default_rng([1, 0, 3]))
    b = draw_shots(y, 3, 3, np.random.default_rng([1, 0, 3]))
    np.testing.assert_array_equal(a, b)
    assert np.bincount(y[a], minlength=3).tolist() == [3, 2, 3]       # class 1 has only 2 images
    assert draw_shots(y, 3, "all", np.random.default_rng(0)).tolist() == list(range(len(y)))
    assert not np.array_equal(a, draw_shots(y, 3, 3, np.random.default_rng([1, 1, 3])))
    assert set(a) <= set(range(len(y)))   # positions in the task's zoo-part arrays: never a test image


def test_imprint_rows_are_scaled_normalised_class_means():
    rng = np.random.default_rng(0)
    centres = np.eye(4, dtype=np.float32)[:3] * 5
    x = np.concatenate([c + 0.1 * rng.standard_normal((10, 4)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(3), 10)
    (h,) = imprint_heads([("a", "b", "c")], [(x, y)], scale=2.0)
    np.testing.assert_allclose(np.linalg.norm(h.weight, axis=1), 2.0, rtol=1e-5)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(h.weight, 2.0 * means / np.linalg.norm(means, axis=1, keepdims=True), rtol=1e-5)
    assert h.bias.tolist() == [0.0, 0.0, 0.0] and accuracy(h, x, y) == 1.0


@pytest.mark.parametrize("bad", [[0], [-1], [1, 1], [2.5], ["few"], [True]])
def test_bad_shot_lists_are_refused(bad):
    with pytest.raises(FedtinaError, match="bench.shots"):
        check_shots(bad)


def test_format_shots_puts_rows_by_n():
    shots = {"0": {"tina": {"id_acc": 0.5, "id_std": 0.1, "ood_acc": 0.4, "ood_std": 0.1}},
             "5": {"imprint": {"id_acc": 0.7, "id_std": 0.1, "ood_acc": 0.6, "ood_std": 0.1}}}
    text = format_shots(shots)
    assert "n=0" in text and "n=5" in text and "70.0 ± 10.0" in text and "40.0 ± 10.0" in text


def test_text_baselines_recover_a_linear_name_to_row_world():
    """Names whose embeddings map linearly to the rows: ridge recovers unseen rows, soft selection mixes seen ones,
    retrieval returns the zoo's mean row of a seen class."""
    from types import SimpleNamespace

    from fedtina.zoo.baselines import TextBaselines, wrong_names

    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(40)]
    emb = rng.standard_normal((40, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    true_map = rng.standard_normal((8, 5))
    rows = emb @ true_map
    seen = np.arange(30)

    class Enc:
        def embed_names(self, ns):
            return emb[[names.index(n) for n in ns]]

    zoo_entry = SimpleNamespace(class_names=("c0", "c1"), params={"head.weight": 2 * rows[:2, :4],
                                                                  "head.bias": 2 * rows[:2, 4]})
    assets = SimpleNamespace(
        dataset=SimpleNamespace(class_names=names), encoder=Enc(),
        bank=SimpleNamespace(generic_weight=rows[seen, :4], generic_bias=rows[seen, 4], seen=seen),
        zoo=SimpleNamespace(entries=lambda: [zoo_entry]))
    tb = TextBaselines(assets)
    unseen = names[30:34]
    h = tb.ridge(unseen)
    want = rows[30:34]
    assert np.abs(h.weight - want[:, :4]).max() < 0.2 and np.abs(h.bias - want[:, 4]).max() < 0.2
    s = tb.soft_selection(["c0"])
    assert s.weight.shape == (1, 4) and tb.temperature > 0
    r = tb.retrieval(["c1", "c35"])
    np.testing.assert_allclose(r.weight[0], 2 * rows[1, :4], rtol=1e-5)   # the zoo's row, not the generic one
    assert wrong_names([("c0", "c1")], names, 0)[0] and not set(wrong_names([("c0", "c1")], names, 0)[0]) & {"c0", "c1"}


def test_samples_of_tina_best_and_mean():
    from types import SimpleNamespace

    from fedtina.experiments.bench import samples_of_tina
    from fedtina.zoo.tasks import BenchTask
    from fedtina.zoo.heads import Head

    x = np.eye(2, dtype=np.float32)
    y = np.array([0, 1])
    good, bad = np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32)[::-1].copy()

    class Gen:   # seed 0 draws a swapped head, seed 1 the right one
        def generate(self, names, seed=0):
            return [Head(tuple(n), good if seed == 1 else bad, np.zeros(2, np.float32)) for n in names]

    assets = SimpleNamespace(tina=Gen())
    task = BenchTask((0, 1), ("a", "b"), x, y, x, y, x)
    (best,) = samples_of_tina(assets, [task], 2, pick="best")
    np.testing.assert_array_equal(best.weight, good)
    (mean,) = samples_of_tina(assets, [task], 2, pick="mean")
    np.testing.assert_allclose(mean.weight, (good + bad) / 2)


def test_novelty_is_zero_for_a_generator_that_copies_the_zoo():
    from types import SimpleNamespace

    from fedtina.zoo.baselines import novelty
    from fedtina.zoo.tasks import BenchTask
    from fedtina.config import HeadTrainConfig
    from fedtina.zoo.heads import Head

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    y = np.repeat(np.arange(2), 20)
    copied = Head(("a", "b"), rng.standard_normal((2, 4)).astype(np.float32), np.zeros(2, np.float32))
    entry = SimpleNamespace(class_names=("a", "b"), params={"head.weight": copied.weight, "head.bias": copied.bias})
    assets = SimpleNamespace(zoo=SimpleNamespace(entries=lambda: [entry]))
    task = BenchTask((0, 1), ("a", "b"), x, y, x, y, x)
    nv = novelty(assets, [task], [copied], [copied], HeadTrainConfig(steps=20, lr=0.1), seed=0)
    assert nv["to_zoo"] == 0.0 and nv["between_fine_tunes"] > 0.0


@pytest.mark.slow
def test_novel_classes_and_cosine_rows_through_the_pipeline(tmp_path):
    """The tiny pipeline with a quarter of the seen classes novel and a cosine generic head: the generic model and
    its head leave the novel classes out, the zoo holds heads over them, every consumer of generic rows treats them as
    unseen ones, and the bench's mixed row keeps the generic rows and imprints the others on their one scale."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).parent))
    from omegaconf import OmegaConf
    from simkit import compose

    from fedtina.assets import build_assets
    from fedtina.config import BenchConfig, core_config
    from fedtina.server.gate import plausible_row_norm
    from fedtina.server.reference import ServerReference
    from fedtina.tina.shots import shot_rows
    from fedtina.zoo.baselines import TextBaselines
    from fedtina.zoo.heads import Head, generic_rows
    from fedtina.zoo.tasks import sample_task_sets, selection_heads, task_data

    cfg = OmegaConf.to_container(compose(tmp_path, "protocol.novel_share=0.25", "backbone.classifier=cosine"),
                                 resolve=True)
    assets = build_assets(core_config(cfg), log=lambda _m: None, with_tina=False)
    split, bank, names = assets.split, assets.bank, assets.dataset.class_names
    novel = {names[c] for c in split.novel}
    assert len(novel) == round(0.25 * len(split.seen)) and np.array_equal(bank.seen, split.backbone_classes)
    assert not np.isin(assets.dataset.labels[split.backbone_idx], split.novel).any()
    rows = generic_rows(bank, names)
    assert not novel & set(rows) and len(rows) == len(split.backbone_classes)
    scale = float(np.linalg.norm(bank.generic_weight, axis=1).mean())
    np.testing.assert_allclose(np.linalg.norm(bank.generic_weight, axis=1), scale, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(bank.features, axis=1), 1.0, rtol=1e-3)
    assert any(novel & set(e.class_names) for e in assets.zoo.entries())        # zoo heads over novel classes

    bench = BenchConfig(num_tasks=4, k=5, ood_unseen=1)
    sets = sample_task_sets(assets, bench)
    tasks = [task_data(assets, ids) for ids in sets["id"] + sets["ood"]]
    assert any(novel & set(t.class_names) for t in tasks)
    selection = selection_heads(assets, tasks)                                   # nearest named generic row
    text = TextBaselines(assets)
    assert not novel & set(text.seen)
    for t in tasks:
        for head in (text.ridge(t.class_names), text.soft_selection(t.class_names), text.retrieval(t.class_names)):
            assert head.weight.shape == (5, bank.dim) and np.isfinite(head.weight).all()
    ref = ServerReference(assets, np.zeros(0, np.int64))
    assert ref.global_head().k == len(names) and ref.selection(tuple(sorted(novel)[:2])).k == 2
    assert plausible_row_norm([], bank.generic_weight) == pytest.approx(scale)

    class Echo:   # stands in for Tina and the rival: the mixed row does not read them
        def generate(self, label_sets, shots=None, use_names=True):
            return [Head(tuple(n), np.zeros((len(n), bank.dim), np.float32), np.zeros(len(n), np.float32))
                    for n in label_sets]

    world = SimpleNamespace(tina=Echo(), bank=bank, dataset=assets.dataset, split=split)
    mixed = shot_rows(world, tasks, 2, bench, selection,
                      0, lambda _row, fn: fn(), Echo())["mixed"]
    for t, h in zip(tasks, mixed):
        np.testing.assert_allclose(np.linalg.norm(h.weight, axis=1), scale, rtol=1e-4)   # one scale
        for j, n in enumerate(t.class_names):
            if n in rows:
                np.testing.assert_array_equal(h.weight[j], rows[n][0])
            else:
                assert not any(np.allclose(h.weight[j], r) for r, _ in rows.values())   # imprinted, not selected
