"""Watching a long run: progress lines off a terminal, a bar on one, per-round TensorBoard scalars. Offline, fast."""

from __future__ import annotations

import pytest

from fedtina.errors import FedtinaError
from fedtina.federation.loggers import RunLoggers
from fedtina.progress import Meter


def test_meter_logs_lines_off_a_terminal_at_most_every_every_s(monkeypatch):
    lines: list[str] = []
    clock = [0.0]
    monkeypatch.setattr("fedtina.progress.time.monotonic", lambda: clock[0])
    m = Meter(100, "[tina] evaluate", unit="replies", every_s=10.0, emit=lines.append, tty=False)
    for _ in range(4):         # 4 updates within 10 s: no line
        clock[0] += 2.0
        m.update(5)
    clock[0] += 4.0            # t = 12 s: a line with the count and rate
    m.update(10)
    m.update(0)
    assert lines == ["[tina] evaluate: 30/100 replies (2.5 replies/s)"]
    m.close()
    quiet = Meter(10, "tina", lines=False, every_s=0.0, emit=lines.append, tty=False)
    quiet.update(10)
    assert len(lines) == 1     # stages that log their own lines stay quiet


def test_meter_draws_a_bar_on_a_terminal(capsys):
    lines: list[str] = []
    with Meter(3, "backbone", unit="epochs", emit=lines.append, tty=True, every_s=0.0) as m:
        for _ in range(3):
            m.update()
    assert lines == [] and m.done == 3
    assert "backbone" in capsys.readouterr().err


def test_tensorboard_scalars_per_round(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lg = RunLoggers(["tensorboard"], tmp_path, {"methods": ["tina"]})
    lg.scalars(1, {"tina/old_acc_mean": 0.8, "tina/old_clients": 10})
    lg.scalars(2, {"tina/old_acc_mean": 0.9, "tina/old_clients": 10})
    lg.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"tina/old_acc_mean", "tina/old_clients"}
    assert [(e.step, round(e.value, 3)) for e in acc.Scalars("tina/old_acc_mean")] == [(1, 0.8), (2, 0.9)]


def test_unknown_logger_is_named(tmp_path):
    with pytest.raises(FedtinaError, match=r"loggers: 'mlflow' is not a logger; valid: \['tensorboard', 'wandb'\]"):
        RunLoggers(["mlflow"], tmp_path)


def test_wandb_logs_offline_per_round(tmp_path, monkeypatch):
    """Where wandb is installed: an offline run under the run dir, its history the scalars by round."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = RunLoggers(["wandb"], tmp_path, {"methods": ["tina"]})
    lg.scalars(1, {"tina/old_acc_mean": 0.8})
    lg.scalars(2, {"tina/old_acc_mean": 0.9})
    run_dir = lg._wandb.dir
    lg.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and str(runs[0]) in run_dir
    (log,) = runs[0].glob("*.wandb")                    # what `wandb sync` uploads later
    data = log.read_bytes()                             # protobuf records: keys and JSON values stored verbatim
    first, second = data.find(b"old_acc_mean\x82\x01\x030.8"), data.find(b"old_acc_mean\x82\x01\x030.9")
    assert 0 <= first < second and b"round" in data
