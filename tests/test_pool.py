"""pipeline.workers: a wave's independent steps in local worker processes (loragen.pipeline.pool)."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
from hydra import initialize_config_dir

from tests.conftest import CONF, DATA_DIR


def _rows(dataset: str, split: str) -> int:
    return sum(1 for line in open(f"{DATA_DIR}/{dataset}/{split}.jsonl") if line.strip())


def test_a_wave_runs_two_at_a_time_in_worker_processes_each_step_recorded(tmp_path, caplog):
    from loragen.pipeline import engine
    from loragen.pipeline.pool import LocalPool

    root = tmp_path / "pipe"
    shared = ["tracker=none", f"paths.data_dir={DATA_DIR}"]
    steps = [engine.Step(f"data/{d}", ["stage=data", f"dataset={d}"], ["data_summary.json"])
             for d in ("piqa", "arc_easy", "openbookqa")]
    caplog.set_level(logging.INFO)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), \
            LocalPool(2, log_file=tmp_path / "pipeline.log", threads=1) as pool:
        status = engine.run_steps(steps, root, shared, pool)
        assert len(pool.pids()) == 2
    assert [status[s.name]["status"] for s in steps] == ["done"] * 3
    for d in ("piqa", "arc_easy", "openbookqa"):
        summary = json.loads((root / f"data/{d}/data_summary.json").read_text())
        assert summary[d]["validation"]["n"] == _rows(d, "validation")
        record = json.loads((root / f"data/{d}/fingerprint.json").read_text())
        assert record["seconds"] > 0 and record["cpu_seconds"] > 0  # the step's own, from its worker
    pids = {int(p) for p in re.findall(r"finished in worker (\d+)", caplog.text)}
    assert len(pids) == 2 and os.getpid() not in pids  # two workers served the three steps
    tagged = (tmp_path / "pipeline.log").read_text()
    assert "[data/piqa][" in tagged and "[data/openbookqa][" in tagged  # worker lines, tagged by step
    assert (root / "data/piqa/loragen.log").is_file()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # again: every step skipped
        again = engine.run_steps(steps, root, shared, engine.run_in_process)
    assert [again[s.name]["status"] for s in steps] == ["skipped"] * 3


def test_a_failing_step_does_not_stop_the_others_of_its_wave(tmp_path):
    from loragen.errors import LoragenError
    from loragen.pipeline import engine
    from loragen.pipeline.pool import LocalPool

    root = tmp_path / "pipe"
    (tmp_path / "none").mkdir()  # exists (checked up front) but holds no piqa: the step fails in its worker
    shared = ["tracker=none", f"paths.data_dir={DATA_DIR}"]
    broken = engine.Step("data/broken", ["stage=data", "dataset=piqa", f"paths.data_dir={tmp_path / 'none'}"],
                         ["data_summary.json"])
    ok = engine.Step("data/piqa", ["stage=data", "dataset=piqa"], ["data_summary.json"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), LocalPool(2, threads=1) as pool:
        with pytest.raises(LoragenError, match="not found in the local data dir"):
            engine.run_steps([broken, ok], root, shared, pool)
    assert json.loads((root / "data/piqa/fingerprint.json").read_text())["seconds"] > 0  # kept for the next run
    assert not (root / "data/broken/fingerprint.json").exists()


@pytest.mark.parametrize("overrides, match", [
    (["pipeline.workers=0"], r"pipeline.workers=0; expected >= 1"),
    (["pipeline.workers=2", "pipeline.executor=slurm"], r"pipeline.workers=2; expected 1 with pipeline.executor=slurm"),
])
def test_workers_is_checked_before_anything_runs(overrides, match):
    from hydra import compose

    from loragen.errors import ConfigError
    from loragen.stages.checks import validate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=dnd_minilm", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
