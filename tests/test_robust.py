"""Flower's robust strategies and DP mods through the real Ray engine: one attacker among 4 clients (7 for Bulyan,
which needs 4f + 3 updates for f = 1) sends a step 1000 times the honest one, negated. FedAvg's head is thrown
far off (computed); every robust rule, run through Ray, keeps it within a few honest steps. Clipping bounds every update, so the whole run."""

from __future__ import annotations

import numpy as np
import pytest
from simkit import compose

from fedtina.errors import FedtinaError


def _final_head(out) -> np.ndarray:
    from fedtina.runtime.rundir import RunDir

    h = RunDir(out).checkpoint()["progress"]["states"]["fedavg"]["head"]
    return np.concatenate([np.asarray(h["weight"], np.float32).ravel(), np.asarray(h["bias"], np.float32)])


def _run(tiny, tmp_path, name: str, clients: int, *overrides: str) -> tuple[np.ndarray, object]:
    from fedtina.simulate import run

    cache, assets = tiny
    out = tmp_path / name
    cfg = compose(cache, f"clients={clients}", "rounds=1", "method.names=[fedavg]", "partition.new_share=0",
                  "method.fedavg.epochs=1", *overrides)
    outcome = run(cfg, out, assets=assets)
    assert outcome.method_status["fedavg"] == "ok", outcome.method_status
    return _final_head(out), outcome


@pytest.fixture(scope="module")
def init(tiny):
    from fedtina.zoo.heads import generic_rows, selection_head

    _, assets = tiny
    names = tuple(assets.dataset.class_names)
    h = selection_head(names, generic_rows(assets.bank, list(names)), assets.encoder.embed_names)
    return np.concatenate([h.weight.ravel(), h.bias])


ATTACK = ("faults.poison_clients=[3]", "faults.poison_kind=sign_flip", "faults.poison_factor=1000")


def _steps(out, init: np.ndarray, attacker: int, factor: float) -> tuple[float, float]:
    """(norm of the example-weighted mean of the honest clients' FedAvg steps, norm of FedAvg's step with the
    attacker's negated, scaled step in it), computed here from a run's inputs: the numpy step the ClientApps run."""
    from fedtina.client import ops as client_ops
    from fedtina.data.partition import load_partition

    feats = np.load(out / "features.npy")
    d = feats.shape[1]
    c = len(init) // (d + 1)
    w0, b0 = init[:-c].reshape(-1, d), init[-c:]
    steps, n = [], []
    for spec in load_partition(out / "partition.json").clients:
        data = client_ops.client_data(spec, feats)
        w, b = client_ops.fedavg_local_train(w0, b0, data, 1, 0.1, 32)
        step = np.concatenate([(w - w0).ravel(), b - b0])
        steps.append(-factor * step if spec.client_id == attacker else step)
        n.append(len(data.train_y))
    honest = [i for i in range(len(steps)) if i != attacker]
    return (float(np.linalg.norm(np.average([steps[i] for i in honest], axis=0, weights=[n[i] for i in honest]))),
            float(np.linalg.norm(np.average(steps, axis=0, weights=n))))


@pytest.mark.slow
def test_robust_rules_resist_one_attacker_where_fedavg_does_not(tiny, tmp_path, init):
    """Plain FedAvg's step under the attack is computed in-process (it is Flower's weighted mean, covered by every
    other simulation test); each robust rule runs through Ray."""
    honest_step = None
    for rule, extra in (("median", ()), ("trimmed_mean", ("aggregation.beta=0.25",)), ("krum", ()),
                        ("multikrum", ("aggregation.select=2",))):
        head, outcome = _run(tiny, tmp_path, rule, 4, f"aggregation.name={rule}", *extra, *ATTACK)
        if honest_step is None:
            honest_step, attacked_step = _steps(tmp_path / rule, init, attacker=3, factor=1000)
            assert honest_step > 0 and attacked_step > 50 * honest_step
        assert np.linalg.norm(head - init) < 3 * honest_step, rule
        scored = {r.client_id for r in outcome.results if r.method == "fedavg" and r.status == "ok"}
        assert scored == {0, 1, 2, 3}, (rule, scored)   # every client, the attacker too, scored the final head
    head, _ = _run(tiny, tmp_path, "bulyan", 7, "aggregation.name=bulyan", "aggregation.num_malicious=1",
                   *ATTACK)
    assert np.linalg.norm(head - init) < 3 * honest_step


@pytest.mark.slow
def test_flowers_client_side_clipping_bounds_the_fedavg_run(tiny, tmp_path, init):
    head, outcome = _run(tiny, tmp_path, "dp", 4, "privacy.fedavg_clip=0.001", "privacy.fedavg_noise=0.0")
    assert 0 < np.linalg.norm(head - init) <= 0.001 + 1e-6   # one round: the mean of updates clipped to 0.001
    assert {r.client_id for r in outcome.results if r.method == "fedavg" and r.status == "ok"} == {0, 1, 2, 3}


def test_aggregation_and_privacy_config_errors_are_one_line(tiny, tmp_path):
    from fedtina.validate import validate_simulate_config
    from fedtina.simulate import _plain

    cache, _ = tiny
    bad = {("aggregation.name=krumm",): "aggregation.name='krumm' is unknown; valid: fedavg, median",
           ("clients=4", "partition.new_share=0", "aggregation.name=bulyan", "aggregation.num_malicious=1"):
               "needs at least 7 updates per round; the old clients sampled per round are 4",
           ("privacy.upload_noise=-1",): "privacy.upload_noise=-1 is invalid: must be a finite number >= 0",
           ("faults.poison_clients=[1]", "faults.poison_kind=flipp"): "faults.poison_kind='flipp'"}
    for overrides, match in bad.items():
        with pytest.raises(FedtinaError, match=match.replace("(", r"\(").replace("[", r"\[")):
            validate_simulate_config(_plain(compose(cache, *overrides)))
