import json
import sys
import types

import pytest

from loragen.bench import __main__ as bench


def test_benchmarks_are_the_modules_with_run():
    # scaling estimates GPU resources from shapes and has no run(): `make bench` must not call it
    assert bench.benchmarks() == ["evaluate", "generator", "hyperconv", "tokenize", "train", "transfer"]


def test_unknown_benchmark_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown benchmark\(s\) \['scaling'\]; known: \['evaluate'"):
        bench.main(["scaling"], out=tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_results_written_with_machine_and_rows(tmp_path, monkeypatch):
    fake = types.ModuleType("loragen.bench.fake")
    fake.run = lambda: [{"name": "fake", "metric": "items/s", "loragen": 30.0, "reference": 12.0, "ratio": 2.5,
                         "target": ">= 2"}]
    monkeypatch.setitem(sys.modules, "loragen.bench.fake", fake)
    monkeypatch.setattr(bench, "benchmarks", lambda: ["fake"])
    bench.main([], out=tmp_path)
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["machine"]) == {"cpu", "cores", "torch", "python"}
    [row] = report["results"]
    assert (row["name"], row["loragen"], row["reference"], row["ratio"]) == ("fake", 30.0, 12.0, 2.5)
    assert len(row["load_before"]) == 3 and len(row["load_after"]) == 3
    md = (tmp_path / "results.md").read_text().splitlines()
    load = f"{row['load_before'][0]:.2f}/{row['load_after'][0]:.2f}"
    assert f"| fake | items/s | 30 | 12 | 2.50 | >= 2 | {load} | {row.get('notes', '')} |" in md


def test_a_row_measured_under_load_is_marked_busy(tmp_path, monkeypatch):
    fake = types.ModuleType("loragen.bench.fake")
    fake.run = lambda: [{"name": "fake", "metric": "items/s", "loragen": 1.0, "reference": 1.0, "ratio": 1.0}]
    monkeypatch.setitem(sys.modules, "loragen.bench.fake", fake)
    monkeypatch.setattr(bench, "benchmarks", lambda: ["fake"])
    loads = iter([[5.0, 4.0, 3.0], [0.5, 0.5, 0.5]])  # 5 on a 2-core machine before the run
    monkeypatch.setattr(bench.os, "getloadavg", lambda: tuple(next(loads)))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    bench.main([], out=tmp_path)
    [row] = json.loads((tmp_path / "results.json").read_text())["results"]
    assert row["load_before"] == [5.0, 4.0, 3.0] and "BUSY" in row["notes"]
    assert not bench.busy([1.5, 1, 1], [1.9, 1, 1], 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
