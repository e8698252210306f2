"""fedtina.experiments.scale: the growth fit, a run's row from its run dir, the table. Offline, no simulation."""

from __future__ import annotations

import json
import math

import pytest

from fedtina.experiments.scale import MemorySampler, format_table, growth_exponent, measure


def test_growth_exponent_recovers_a_power_law():
    ns = [100, 1000, 10000, 100000]
    assert growth_exponent(ns, [3 * n for n in ns]) == pytest.approx(1.0)
    assert growth_exponent(ns, [0.5 * n ** 1.5 for n in ns]) == pytest.approx(1.5)
    assert growth_exponent(ns, [7.0] * 4) == pytest.approx(0.0)
    assert growth_exponent([100], [1.0]) is None and growth_exponent([100, 100], [1.0, 2.0]) is None


def _run_dir(tmp_path, n_messages: int):
    d = tmp_path / "run"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"summary": {
        "server_wall_s": {"methods": {"tina": 6.0, "selection": 2.0}},
        "methods": {"tina": {"n_failed": 1}, "selection": {"n_failed": 0}},
        "method_status": {"tina": "ok", "selection": "ok"}, "interrupted": None}}))
    header = "method,round,client_id,phase,wall_s,cpu_s,peak_mem_mb,bytes_sent,bytes_recv,acc,status,detail\n"
    (d / "phases.csv").write_text(header + "".join(f"tina,1,{i},evaluate,0.1,0.1,1,0,0,1,ok,\n"
                                                   for i in range(n_messages)))
    (d / "server_phases.csv").write_text(header + "describe,0,-1,describe,2.0,0,0,0,0,,ok,\n"
                                         "tina,1,-1,generate,0.5,0,0,0,0,,ok,40 heads in 1 batch(es)\n"
                                         "tina,2,-1,generate,1.5,0,0,0,0,,ok,60 heads in 1 batch(es)\n")
    return d


def test_a_runs_row_from_its_run_dir(tmp_path):
    d = _run_dir(tmp_path, n_messages=50)
    sampler = MemorySampler(pid=-1, sample_s=0.01)
    sampler.stop()
    row = measure(d, 12.0, sampler)
    assert row["federation_s"] == 10.0 and row["messages"] == 50 and row["messages_per_s"] == 5.0
    assert row["heads_per_s"] == 50.0 and row["failed"] == 1 and row["methods_s"] == {"tina": 6.0, "selection": 2.0}


def test_the_table_has_a_row_per_count_and_the_exponents():
    rows = [{"clients": n, "wall_s": n / 10, "federation_s": n / 20, "methods_s": {"tina": n / 40},
             "driver_peak_mb": 1000 + n // 100, "machine_peak_mb": 2000 + n // 50, "messages_per_s": 200.0,
             "heads_per_s": 100.0, "failed": 0} for n in (100, 1000, 10000)]
    table = format_table(rows)
    assert "| 10,000 | 1000 | 250.0 |" in table and table.count("\n| ") == 3   # 3 rows under the header
    expo = table.rsplit("growth exponent", 1)[1]
    assert "wall_s 1.00" in expo and "federation_s 1.00" in expo
    b = growth_exponent([100, 1000, 10000], [1001, 1010, 1100])
    assert f"driver_peak_mb {b:.2f}" in expo and not math.isnan(b)
