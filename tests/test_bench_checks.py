"""The benchmark's rivals and checks on toy data: `imprint_ft` (imprint, then fine-tune on the same shots), the
memorization check (Zeng et al.), per-class recall of unseen classes, and the 1-shot column."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fedtina.config import BenchConfig, HeadTrainConfig
from fedtina.errors import FedtinaError
from fedtina.experiments.bench import format_memorization, format_shots
from fedtina.tina.shots import SHOT_ROWS, moved, run_shots, shot_rows
from fedtina.zoo.baselines import memorization, nearest_zoo_head, zoo_class_gap
from fedtina.zoo.heads import Head, accuracy
from fedtina.zoo.tasks import BenchTask, class_recall


def _skewed_task(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes whose means differ in norm: imprinting (normalised means, zero bias) sends every class-0 image
    with a positive second coordinate to class 1, while a linear head separates them easily."""
    means = np.array([[1.0, 0.0], [3.0, 0.5]])
    y = np.repeat(np.arange(2), n)
    x = means[y] + rng.standard_normal((2 * n, 2)) * np.array([0.05, 0.3])
    return x.astype(np.float32), y


class _Tina:
    """A stand-in generator (Tina's and the rival's) for the shots rows: zero rows (the imprint rows do not depend
    on it)."""

    def generate(self, names, shots=None, use_names=True, seed=0):
        return [Head(tuple(c), np.zeros((len(c), 2), np.float32), np.zeros(len(c), np.float32)) for c in names]


def _shots_assets() -> SimpleNamespace:
    """Class 3 ("a") is seen, with a generic row; class 7 ("b") is unseen."""
    names = {3: "a", 7: "b"}
    return SimpleNamespace(tina=_Tina(), bank=SimpleNamespace(generic_weight=np.eye(2, dtype=np.float32)[:1],
                                                              generic_bias=np.zeros(1, np.float32),
                                                              seen=np.array([3]),
                                                              features=np.array([[1, 0], [0.9, 0.1]], np.float32)),
                           dataset=SimpleNamespace(class_names=[names.get(i, f"c{i}") for i in range(8)]),
                           split=SimpleNamespace(unseen=np.array([7]), backbone_idx=np.array([0, 1])))


def test_imprint_ft_fine_tunes_the_imprinted_head_and_beats_it_on_an_easy_task():
    rng = np.random.default_rng(0)
    (x, y), (tx, ty) = _skewed_task(rng, 20), _skewed_task(rng, 200)
    task = BenchTask((3, 7), ("a", "b"), x, y, tx, ty, x)
    selection = [Head(("a", "b"), np.eye(2, dtype=np.float32), np.zeros(2, np.float32))]
    rows = shot_rows(_shots_assets(), [task], 10, BenchConfig(), selection, 0, lambda _row, fn: fn(), _Tina())
    assert set(rows) == set(SHOT_ROWS)
    (imp,), (tuned,) = rows["imprint"], rows["imprint_ft"]
    assert not np.allclose(imp.weight, tuned.weight) or not np.allclose(imp.bias, tuned.bias)
    assert accuracy(imp, tx, ty) < 0.9                     # the toy task is one imprinting gets wrong
    assert accuracy(tuned, tx, ty) > accuracy(imp, tx, ty) + 0.05


def test_run_shots_reports_imprint_ft_and_ood_recall_at_every_n():
    rng = np.random.default_rng(1)
    (x, y), (tx, ty) = _skewed_task(rng, 6), _skewed_task(rng, 20)
    tasks = [BenchTask((3, 7), ("a", "b"), x, y, tx, ty, x)]
    head = Head(("a", "b"), np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    base = {row: ([head], 0.0) for row in ("selection", "tina", "oracle")}
    base["gidaris"] = ([head], 0.0)
    shots = run_shots(_shots_assets(), {"id": tasks, "ood": tasks}, BenchConfig(shots=[1, 3]),
                      {"id": base, "ood": base}, _Tina())
    for n in ("1", "3"):
        r = shots[n]["imprint_ft"]
        assert {"id_acc", "ood_acc", "ood_unseen_recall", "ood_seen_recall"} <= set(r) and r["personalize_s"] >= 0
    # one shot per class leaves nothing to hold out: the selected fine-tune keeps the imprinted head
    assert shots["1"]["imprint_ft"]["ood_acc"] == shots["1"]["imprint"]["ood_acc"]
    for row in ("local_ft", "tina_ft", "imprint_ft"):
        assert shots["1"][row]["ood_moved"] == 0.0 and np.isnan(shots["1"][row]["ood_moved_gain"])
    assert "OOD recall u/s" in format_shots(shots) and "OOD ft moved" in format_shots(shots)


def test_moved_counts_changed_heads_and_their_gain_only():
    """Two tasks: the fine-tune keeps the first head (bit for bit) and fixes the second; the share moved is 1/2 and
    the gain is the second task's alone."""
    rng = np.random.default_rng(2)
    (x, y), (tx, ty) = _skewed_task(rng, 6), _skewed_task(rng, 20)
    task = BenchTask((3, 7), ("a", "b"), x, y, tx, ty, x)
    good = Head(("a", "b"), np.array([[-1, 0], [1, 0]], np.float32), np.array([2, -2], np.float32))   # x < 2: a
    bad = Head(("a", "b"), np.array([[1, 0], [-1, 0]], np.float32), np.array([-2, 2], np.float32))
    out = moved([good, bad], [good, Head(good.class_names, good.weight.copy(), good.bias.copy())], [task, task])
    assert out["moved"] == 0.5
    assert out["moved_gain"] == pytest.approx(accuracy(good, tx, ty) - accuracy(bad, tx, ty))
    assert accuracy(good, tx, ty) > 0.9 > 0.1 > accuracy(bad, tx, ty)


# ----------------------------------------------------------------------------------------------------------------
# memorization


def _zoo_world(seed: int = 0, d: int = 16, seen: int = 12, unseen: int = 10, zoo_heads: int = 40, k: int = 4):
    """Class centroids in row space; zoo heads of seen classes whose rows are their centroids plus a little
    fine-tuning noise; OOD tasks of 2 unseen + 2 seen classes whose images sit around the centroids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((seen + unseen, d))
    names = [f"c{i}" for i in range(seen + unseen)]
    entries = []
    for _ in range(zoo_heads):
        ids = rng.choice(seen, k, replace=False)
        rows = centres[ids] + 0.05 * rng.standard_normal((k, d))
        entries.append(SimpleNamespace(class_names=tuple(names[i] for i in ids),
                                       params={"head.weight": rows.astype(np.float32),
                                               "head.bias": np.zeros(k, np.float32)}))
    tasks = []
    for _ in range(12):
        ids = np.concatenate([seen + rng.choice(unseen, 2, replace=False), rng.choice(seen, 2, replace=False)])
        y = np.repeat(np.arange(k), 15)
        x = (centres[ids][y] + 0.8 * rng.standard_normal((len(y), d))).astype(np.float32)
        ty = np.repeat(np.arange(k), 30)
        tx = (centres[ids][ty] + 0.8 * rng.standard_normal((len(ty), d))).astype(np.float32)
        tasks.append(BenchTask(tuple(int(i) for i in ids), tuple(names[i] for i in ids), x, y, tx, ty, x))
    assets = SimpleNamespace(zoo=SimpleNamespace(entries=lambda: entries),
                             split=SimpleNamespace(unseen=np.arange(seen, seen + unseen)))
    return assets, tasks, centres, entries


def test_a_generator_that_copies_zoo_heads_is_flagged_and_an_honest_one_is_not():
    assets, tasks, centres, entries = _zoo_world()
    rng = np.random.default_rng(5)
    copies = []
    for t in tasks:   # a whole zoo head, rows shuffled, standing for the task's classes
        e = entries[int(rng.integers(len(entries)))]
        order = rng.permutation(len(t.class_names))
        copies.append(Head(t.class_names, e.params["head.weight"][order], e.params["head.bias"][order]))
    honest = [Head(t.class_names, (centres[list(t.class_ids)] + 0.05 * rng.standard_normal((4, 16)))
                   .astype(np.float32), np.zeros(4, np.float32)) for t in tasks]
    cfg = HeadTrainConfig(steps=20, lr=0.1)
    copied = memorization(assets, tasks, copies, honest, cfg, seed=0)
    built = memorization(assets, tasks, honest, honest, cfg, seed=0)
    assert copied["to_zoo"] < 1e-5 < copied["noise_to_zoo"] and copied["ratio"] < 0.01
    assert copied["head_overlap"] == 1.0            # the nearest zoo head is the copied one: the same mistakes
    assert built["ratio"] > 0.6 and built["to_zoo"] > 0.5 * built["noise_scale"]
    assert built["head_overlap"] < 1.0 and 0.0 <= built["fine_tune_overlap"] <= 1.0
    assert copied["noise_scale"] == built["noise_scale"] > 0   # a property of the zoo, not of the generator
    assert "nearer the zoo than" in format_memorization(copied)[0]
    assert "no nearer the zoo than" in format_memorization({**built, "to_zoo": built["noise_to_zoo"]})[0]


def test_the_noise_scale_is_the_zoos_gap_to_another_class():
    bank = np.array([[0.0, 0.0], [0.1, 0.0], [3.0, 0.0], [3.0, 4.0]])
    names = np.array(["a", "a", "b", "c"])
    # nearest other class: a0 -> b 3.0, a1 -> b 2.9, b -> a1 2.9, c -> b 4.0
    assert zoo_class_gap(bank, names) == pytest.approx(2.95)


def test_nearest_zoo_head_matches_rows_in_any_order_and_skips_small_heads():
    rng = np.random.default_rng(2)
    zoo = [rng.standard_normal((n, 5)) for n in (2, 3, 3, 4)]
    query = zoo[2][[2, 0, 1]] + 1e-3
    z, match = nearest_zoo_head(query, zoo)
    assert z == 2 and match.tolist() == [2, 0, 1]
    big = np.vstack([zoo[3], zoo[3][:1] + 1.0])   # 5 rows: only heads of >= 5 rows may stand in
    with pytest.raises(FedtinaError, match="no zoo head has the 5 rows"):
        nearest_zoo_head(big, zoo)


def test_memorization_needs_unseen_classes():
    assets, tasks, centres, _ = _zoo_world()
    assets.split.unseen = np.array([], np.int64)
    heads = [Head(t.class_names, centres[list(t.class_ids)].astype(np.float32), np.zeros(4, np.float32))
             for t in tasks]
    with pytest.raises(FedtinaError, match="unseen classes"):
        memorization(assets, tasks, heads, heads, HeadTrainConfig(steps=5), seed=0)


# ----------------------------------------------------------------------------------------------------------------
# recall, the 1-shot column


def test_class_recall_on_a_hand_made_confusion():
    eye = np.eye(3, dtype=np.float32)
    head = Head(("a", "u", "b"), eye, np.zeros(3, np.float32))     # predicts the feature's one-hot position
    # true:      a  a  a  a  u  u  b  b
    # predicted: a  a  a  u  u  a  a  a      -> recall a 3/4, u 1/2, b 0/2
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    first = BenchTask((1, 9, 2), head.class_names, eye, np.arange(3), eye[pred], y, eye)
    # a second task where the unseen class (9) is first and always right, the seen one always wrong
    second = BenchTask((9, 4), ("u", "c"), eye[:2, :2], np.arange(2), eye[[0, 0, 0], :2], np.array([0, 0, 1]),
                       eye[:2, :2])
    heads = [head, Head(("u", "c"), np.eye(2, dtype=np.float32), np.zeros(2, np.float32))]
    r = class_recall(heads, [first, second], unseen=np.array([9]))
    assert r["unseen_recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["seen_recall"] == pytest.approx((0.75 + 0.0 + 0.0) / 3)
    assert accuracy(head, first.test_x, first.test_y) == pytest.approx(4 / 8)   # not what the recall says


def test_the_shots_axis_has_a_one_shot_column_by_default():
    from fedtina.config import from_dict
    from fedtina.experiments import harness

    assert 1 in from_dict(BenchConfig, {}).shots
    assert 1 in harness.compose("bench", [])["bench"]["shots"]    # what `python -m fedtina.experiments.bench` runs
