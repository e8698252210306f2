"""The upload-worth experiment's parts: the row bank, the counting of uploads per class, the bins, near names, and
a two-cohort run on the tiny assets (the probe set is disjoint from the contributors and the same at every
measurement; withheld classes never reach the zoo)."""

from __future__ import annotations

import numpy as np
import pytest

from fedtina.experiments.uploads import BINS, bin_label, bin_of, near_names
from fedtina.tina.offline import recalls
from fedtina.zoo.heads import Head, RowBank


def test_row_bank_means_uploaded_rows_and_falls_back():
    bank = RowBank()
    bank.add(Head(("a", "b"), np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.array([1.0, 2.0], np.float32)))
    bank.add(Head(("c", "a"), np.array([[5.0, 5.0], [3.0, 2.0]], np.float32), np.array([0.0, 3.0], np.float32)))
    assert (bank.count("a"), bank.count("b"), bank.count("c"), bank.count("z")) == (2, 1, 1, 0)
    fallback = Head(("a", "z"), np.full((2, 2), -1.0, np.float32), np.array([-1.0, -2.0], np.float32))
    h = bank.over(fallback)
    np.testing.assert_allclose(h.weight, [[2.0, 1.0], [-1.0, -1.0]])
    np.testing.assert_allclose(h.bias, [2.0, -2.0])
    np.testing.assert_array_equal(fallback.weight, -1.0)   # the fallback head is not modified


def test_bins_and_near_names():
    assert [bin_of(n) for n in (0, 1, 2, 3, 5, 6, 10, 11, 20, 21, 500)] == [
        "0", "1", "2", "3-5", "3-5", "6-10", "6-10", "11-20", "11-20", ">20", ">20"]
    assert [bin_label(lo, hi) for lo, hi in BINS][0] == "0"
    near = near_names(["purple striped heart", "red dotted star", "blue ring"], ["purple checkered heart"], 2)
    assert near == ["purple striped heart"]
    assert near_names(["cougar face"], ["cougar body"], 1) == ["cougar face"]


def test_recalls_per_class():
    from fedtina.client.ops import ClientData

    x = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
    data = ClientData((0, 1), ("a", "b"), x, np.array([0, 0, 1, 1]), x, np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]))
    head = Head(("b", "a"), np.array([[0, 1], [1, 0]], np.float32), np.zeros(2, np.float32))  # any class order
    assert recalls(head, data) == {"a": 1.0, "b": 0.5}


@pytest.mark.slow
def test_two_cohorts_on_the_tiny_assets(tiny):
    from simkit import compose

    from fedtina.experiments.uploads import run_uploads, summarize
    from fedtina.simulate import _plain

    cache, assets = tiny
    cfg = _plain(compose(cache, "clients=32", "partition.unseen_share=0.6", "partition.new_share=0.25",
                         "head_ft.select=false"))   # contributors move their heads: no echoes, so uploads count
    cfg.update(cohorts=2, withheld_share=0.3, steps_per_head=0.5, retrain_at=[], near_words=1)
    result = run_uploads(assets, cfg)
    pairs = result["pairs"]
    probes = {t: {p["probe"] for p in pairs if p["cohort"] == t} for t in (0, 1, 2)}
    assert probes[0] == probes[1] == probes[2] and probes[0]                       # the same probes every time
    uploaders = {a["client"] for a in result["accepted"]}
    assert uploaders and not uploaders & probes[0]                                  # probes never upload
    withheld = set(result["withheld"])
    assert not any(withheld & set(a["names"]) for a in result["accepted"])          # withheld classes: no upload
    for p in pairs:   # each pair's count = accepted uploads holding the class, up to its cohort
        assert p["uploads"] == sum(p["class"] in a["names"] for a in result["accepted"] if a["cohort"] <= p["cohort"])
    sel = [p["recall"] for p in pairs if p["method"] == "selection"]
    assert sel == [p["recall"] for p in pairs if p["method"] == "selection" and p["cohort"] == 0] * 3  # fixed floor
    def at(m, t):
        return [p["recall"] for p in pairs if p["method"] == m and p["cohort"] == t]
    assert at("tina_bank", 0) == at("tina", 0)                                      # no upload yet: Tina's head
    uploaded = [(p["probe"], p["class"]) for p in pairs if p["cohort"] == 2 and p["uploads"] > 0]
    by = {(p["method"], p["probe"], p["class"]): p["recall"] for p in pairs if p["cohort"] == 2}
    assert uploaded and any(by["tina_bank", *k] != by["tina", *k] for k in uploaded)   # the uploaded rows served
    for c in result["costs"]:   # each cohort's refresh was judged on the server's probe set, and its verdict kept
        assert c["echoes"] == 0 and c["accepted"] > 0 and c["refresh"] in ("adopted", "rolled back"), c
        assert (c["refresh"] == "adopted") == (c["probe_after"] >= c["probe_before"]), c
    s = summarize(result)
    assert set(s["methods"]) == {"tina", "tina_bank", "row_bank", "fedavg", "selection", "local_ft"} and "0" in s["by_bin"]
