"""Tina's upload loop (issue 23): an echo (the sent head unchanged) is not appended, a refresh that lowers Tina's
accuracy on the server's probe set is rolled back (and a resumed run decides the same), the probe set is drawn once
and holds no client's images."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from fedtina.tina.probe import ProbeSet, draw_class_sets, probe_set
from fedtina.tina.service import RefreshDecision, TinaService, Upload, ZooList
from fedtina.zoo.heads import Head
from simkit import compose, summary

# ----------------------------------------------------------------------------------------------------------------
# without Ray


def _head(names, w, b=None) -> Head:
    w = np.asarray(w, np.float32)
    return Head(tuple(names), w, np.zeros(len(w), np.float32) if b is None else np.asarray(b, np.float32))


def test_an_upload_knows_how_far_it_moved_and_carries_its_evidence():
    sent = _head("ab", [[1.0, 0.0], [0.0, 1.0]])
    echo = Upload(3, ("a", "b"), (0, 1), sent, _head("ab", [[1.0, 0.0], [0.0, 1.0]]), images=2.5)
    moved = Upload(3, ("a", "b"), (0, 1), sent, _head("ab", [[1.0, 0.1], [0.0, 1.0]]), images=2.5)
    assert echo.moved == 0.0 and echo.echo
    assert moved.moved == pytest.approx(0.1 / np.sqrt(2)) and not moved.echo
    entry = moved.entry({"acc": 0.5})
    assert entry.source == "client:3"
    assert entry.metrics == {"images_per_class": 2.5, "moved": pytest.approx(0.1 / np.sqrt(2)), "acc": 0.5}
    # a head of another shape is no echo (the gate refuses it)
    assert not Upload(3, ("a", "b"), (0, 1), sent, _head("a", [[1.0, 0.0]])).echo


class _Tina:
    """A stand-in generator: the head of a label set of class ids is sign * identity rows (features are one-hot)."""

    def __init__(self, sign: float) -> None:
        self.sign = sign

    def generate(self, sets, steps=None, seed=0, use_names=True):
        return [_head(s, self.sign * np.eye(4, dtype=np.float32)[[int(n) for n in s]]) for s in sets]


def _probe() -> ProbeSet:
    feats = np.eye(4, dtype=np.float32)
    labels = np.array([0, 1, 2, 3])

    def val_data(ids):
        keep = np.isin(labels, ids)
        return feats[keep], np.searchsorted(np.asarray(ids), labels[keep])

    return probe_set([(0, 1), (1, 2, 3)], ["0", "1", "2", "3"], val_data)


@pytest.mark.parametrize("sign, adopted", [(-1.0, False), (1.0, True)])
def test_a_refresh_is_adopted_only_when_the_probe_does_not_score_it_lower(monkeypatch, tmp_path, sign, adopted):
    import fedtina.tina.train as train

    saved = []
    monkeypatch.setattr(train, "refresh", lambda tina, entries, steps, **kw: _Tina(sign))
    monkeypatch.setattr(train, "save_checkpoint", lambda path, tina: saved.append((path, tina)))
    current = _Tina(1.0)
    service = TinaService(current, assets=type("A", (), {"shots": None, "descriptions": None})(), reference=None,
                          zoo=ZooList([]), check_cfg=None, norm_scale=1.0, probe=_probe())
    decision = service.refresh(5, save=[tmp_path / "tina.safetensors"])
    assert decision == RefreshDecision(adopted, 1.0, 1.0 if adopted else 0.0)
    assert (service.tina is current) is not adopted
    assert [p for p, _ in saved] == ([tmp_path / "tina.safetensors"] if adopted else [])   # a rolled back one is dropped
    assert service.probe_now == 1.0


def test_the_probe_set_is_drawn_once_from_old_clients_and_holds_no_client_image(tiny):
    from fedtina.config import from_dict
    from fedtina.data.partition import PartitionConfig, make_partition

    _, assets = tiny
    part = make_partition(assets.dataset, assets.split, 30, from_dict(PartitionConfig, {"k_min": 3, "k_max": 5}))
    labels = np.asarray(assets.dataset.labels)
    sets = draw_class_sets(part, labels, 8)
    assert len(sets) == 8 and sets == draw_class_sets(part, labels, 8)     # fixed: the same sets for the same run
    old = {tuple(c.class_ids) for c in part.clients if not c.is_new}
    assert all(any(set(s) <= set(o) for o in old) for s in sets)         # label sets the federation has
    assert any(set(s) & set(assets.split.unseen) for s in sets) or not any(c.has_unseen for c in part.clients)
    client_images = set()
    for c in part.clients:
        client_images |= set(np.asarray(c.train_idx).tolist()) | set(np.asarray(c.test_idx).tolist())
    probe_images = [i for i in np.asarray(part.server_val_idx).tolist() if labels[i] in {c for s in sets for c in s}]
    assert probe_images and not client_images & set(probe_images)
    probe = probe_set(sets, assets.dataset.class_names, lambda ids: (np.asarray(ids), ids))
    assert probe.names[0] == tuple(assets.dataset.class_names[c] for c in sets[0])


# ----------------------------------------------------------------------------------------------------------------
# through Ray

LOOP = ["clients=6", "rounds=2", "method.names=[tina]", "method.tina.refresh_every=1", "method.tina.refresh_steps=5",
        "partition.new_share=0", "checks.max_acc_drop=1.0",
        "head_ft.select=false"]   # every client moves its head, so uploads are accepted and Tina is refreshed


def _negated_refresh(monkeypatch):
    """Every refresh returns a Tina whose heads are the refreshed one's, negated: a refresh that makes Tina worse."""
    import fedtina.tina.train as train

    real = train.refresh

    class Negated:
        def __init__(self, tina):
            self.inner, self.cfg, self.encoder = tina, tina.cfg, tina.encoder

        def generate(self, *a, **kw):
            return [Head(h.class_names, -h.weight, -h.bias) for h in self.inner.generate(*a, **kw)]

    monkeypatch.setattr(train, "refresh", lambda *a, **kw: Negated(real(*a, **kw)))


@pytest.mark.slow
def test_echoes_are_dropped_and_a_bad_refresh_is_rolled_back_also_after_a_resume(tiny, tmp_path, monkeypatch):
    from fedtina.simulate import run
    from fedtina.zoo.store import ZooStore
    import fedtina.methods.tina as method

    cache, assets = tiny
    cached_zoo = len(ZooStore(assets.zoo_dir))
    _negated_refresh(monkeypatch)

    # (1) every refresh is worse: each is rolled back, Tina's probe score never changes, no Tina file is written
    ref = tmp_path / "reference"
    run(compose(cache, *LOOP), ref, assets=assets)
    growth = summary(ref)["zoo_growth"]
    assert len(ZooStore(ref / "zoo")) == cached_zoo + sum(g["accepted"] for g in growth)
    refreshed = [g for g in growth if g["refresh"]]
    assert len(refreshed) == 2, growth
    for g in refreshed:
        assert g["refresh"] == "rolled back" and g["probe_after"] < g["probe_before"] == g["probe"], g
    assert len({g["probe"] for g in growth}) == 1
    assert not (ref / "tina" / "tina.safetensors").exists() and not list((ref / "tina").glob("tina-c*"))

    # (2) the same run stopped by a full disk right after cohort 1's refresh decision, then resumed: the resumed
    # cohort refreshes again and decides the same
    real_row, failed = method.cohort_row, []

    def full_disk_once(fed, rnd, *a, **kw):
        if rnd == 1 and not failed:
            failed.append(rnd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_row(fed, rnd, *a, **kw)

    monkeypatch.setattr(method, "cohort_row", full_disk_once)
    out = tmp_path / "resumed"
    first = run(compose(cache, *LOOP), out, assets=assets)
    assert first.failed and failed == [1]
    run(None, out, assets=assets, resume=True)
    assert summary(out)["zoo_growth"] == growth
