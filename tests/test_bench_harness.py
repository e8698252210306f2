"""The experiments' one harness: every experiment is `run(cfg, assets, out_dir) -> Result` behind the same
`python -m fedtina.experiments.<name> key=value` command, they never import one another, the listing, the files a
result leaves and bad input as one line. Offline and fast: no assets are built here."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedtina.errors import FedtinaError
from fedtina.experiments import harness

def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in harness.PACKAGE.glob("*.py") if not p.stem.startswith("_")}


def test_no_experiment_imports_another():
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            others = [t for t in targets if t.startswith("fedtina.experiments.")
                      and t.split(".")[2] not in ("harness", name)]
            assert not others, f"{name} imports {others}: what experiments share belongs in the library"


def test_every_experiment_has_run_a_config_and_the_three_line_main():
    names = set(harness.experiments())
    assert {"bench", "analyses", "scale", "uploads", "attacks", "robust", "privacy", "gpu_check", "parse"} <= names
    for name in names:
        tree = _modules()[name]
        defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "run" in defs, name
        assert (harness.CONFIGS / f"{name}.yaml").is_file(), name
        main = [n for n in tree.body if isinstance(n, ast.If)]
        assert len(main) == 1 and len(main[0].body) == 2 and "harness.main(__spec__.name)" in ast.unparse(main[0])


def test_the_listing_names_every_experiment_and_app():
    proc = subprocess.run([sys.executable, "-m", "fedtina.experiments"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, line in harness.experiments().items():
        assert line and f"  {name:<12} {line}" in lines
    for app in harness.APPS:
        assert any(line.startswith(f"  {app} ") and len(line) > 30 for line in lines), app
    assert "  bench        The core benchmark: how well each way of personalizing a head does on tasks Tina never " \
           "saw." in lines


def test_a_result_leaves_its_json_table_and_figures(tmp_path):
    drawn = []
    result = harness.Result({"rows": [1, 2], "x": float("nan")}, lambda d: f"| rows | {len(d['rows'])} |",
                            {"a.png": lambda path, data: drawn.append((path, data["rows"]))})
    table = harness.write("demo", result, tmp_path / "out")
    assert table == "| rows | 2 |" and (tmp_path / "out" / "demo.md").read_text() == "| rows | 2 |\n"
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["rows"] == [1, 2]
    assert drawn == [(tmp_path / "out" / "a.png", [1, 2])]


def test_bad_input_is_one_error_before_anything_runs(tmp_path):
    with pytest.raises(FedtinaError, match=r"clients=\[0, 5\]: need a list of positive client counts"):
        harness.execute("scale", harness.compose("scale", ["clients=[0,5]"]), tmp_path)
    with pytest.raises(FedtinaError, match="Could not override 'nonsense'"):
        harness.compose("scale", ["nonsense=1"])
    assert not list(tmp_path.iterdir())   # nothing written
    proc = subprocess.run([sys.executable, "-m", "fedtina.experiments.scale", "clients=7",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "clients=7: need a list" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_novel_share_too_large_for_bench_k_fails_before_any_build(tmp_path, monkeypatch):
    import fedtina.assets

    monkeypatch.setattr(fedtina.assets, "build_assets", lambda *a, **k: pytest.fail("assets were built"))
    cfg = harness.compose("bench", ["dataset.images_per_class=4", f"cache_dir={tmp_path / 'cache'}",
                                    "protocol.novel_share=0.8", "zoo.k_min=5", "zoo.k_max=5"])
    with pytest.raises(FedtinaError, match=r"^protocol.novel_share=0.8 leaves the generic model 13 of the 66 seen "
                                           r"classes, fewer than bench.k=20"):
        harness.execute("bench", {**cfg, "bench": {**cfg["bench"], "k": 20}}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
