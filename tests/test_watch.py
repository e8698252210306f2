"""Watching a long run: progress lines off a terminal, a bar on one, per-round TensorBoard scalars. Offline, fast."""

from __future__ import annotations

import pytest

from fedtina.errors import FedtinaError
from fedtina.report.loggers import RunLoggers
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


def _wandb_records(path):
    """The protobuf records of an offline `.wandb` log: a 7-byte file header, then records in 32 KiB blocks, each
    chunk with a 7-byte header (crc, length, type: 1 whole, 2 first, 3 middle, 4 last); a record may span blocks,
    so a byte search over the file can miss it."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:                        # block tail too short for a header: padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            yield rec


def test_wandb_logs_offline_per_round(tmp_path, monkeypatch):
    """Where wandb is installed: an offline run under the run dir, its history the scalars by round."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = RunLoggers(["wandb"], tmp_path, {"methods": ["tina"]})
    lg.scalars(1, {"tina/old_acc_mean": 0.8})
    lg.scalars(2, {"tina/old_acc_mean": 0.9})
    run_dir = lg._wandb.dir
    lg.close()
    wandb.teardown()                 # the log is written by a separate service process: wait for it to flush and exit
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and str(runs[0]) in run_dir
    (log,) = runs[0].glob("*.wandb")                    # what `wandb sync` uploads later
    records = list(_wandb_records(log))
    history = [{"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    kinds = [r.WhichOneof("record_type") for r in records]
    assert [(h.get("round"), h.get("tina/old_acc_mean")) for h in history] == [("1", "0.8"), ("2", "0.9")], kinds
