import json
import subprocess
import sys
import types
from pathlib import Path

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
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(bench.__file__).parent, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: the commit measured is recorded (dirty when the tree has changes)
        assert report["git_sha"].removesuffix("-dirty") == head.stdout.strip()
    [row] = report["results"]
    assert (row["name"], row["loragen"], row["reference"], row["ratio"]) == ("fake", 30.0, 12.0, 2.5)
    assert len(row["load_before"]) == 3 and len(row["load_after"]) == 3
    md = (tmp_path / "results.md").read_text().splitlines()
    load = f"{row['load_before'][0]:.2f}/{row['load_after'][0]:.2f}"
    assert row["others_cores"] is not None and row["others_cores"] >= 0
    assert f"| fake | items/s | 30 | 12 | 2.50 | >= 2 | {load} | {row['others_cores']:.2f} | {row.get('notes', '')} |" in md


def test_a_row_measured_beside_other_processes_is_marked_busy(tmp_path, monkeypatch):
    """Busy means other processes' CPU time during the benchmark (the machine's busy time minus this process's and
    its reaped children's), not the load average, which counts the benchmark's own threads too."""
    import subprocess
    import time

    fake = types.ModuleType("loragen.bench.fake")
    fake.run = lambda: (time.sleep(1.5), [{"name": "fake", "metric": "items/s", "loragen": 1.0, "reference": 1.0,
                                           "ratio": 1.0}])[1]
    monkeypatch.setitem(sys.modules, "loragen.bench.fake", fake)
    monkeypatch.setattr(bench, "benchmarks", lambda: ["fake"])
    spin = "import time\nt = time.time()\nwhile time.time() - t < 4: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])  # another process keeps one core busy meanwhile
    try:
        bench.main([], out=tmp_path)
    finally:
        spinner.kill()
        spinner.wait()
    [row] = json.loads((tmp_path / "results.json").read_text())["results"]
    assert row["others_cores"] > 0.5 and "BUSY: other processes used" in row["notes"]
    assert bench.others_cores((10.0, 1.0), (13.0, 2.0), 2.0) == 1.0  # 3 s busy, 1 s ours, over 2 s
    assert bench.others_cores((10.0, 1.0), (10.5, 2.0), 2.0) == 0.0  # never negative (clock granularity)
    assert not bench.busy([1.5, 1, 1], [1.9, 1, 1], 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
