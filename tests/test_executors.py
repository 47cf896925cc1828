"""Pipeline executors without SLURM: a step as a submitit job on this machine, and its failure report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from tests.conftest import CONF, DATA_DIR


def test_submitit_local_executor_runs_a_step_and_names_a_failed_ones_log(tmp_path):
    from loragen.errors import LoragenError
    from loragen.pipeline import engine, executors

    root = tmp_path / "pipe"
    (tmp_path / "none").mkdir()  # a data dir that exists (checked up front) but holds no piqa: fails in the job
    shared = ["tracker=none", f"paths.data_dir={DATA_DIR}"]
    ok = engine.Step("data/piqa", ["stage=data", "dataset=piqa"], ["data_summary.json"])
    broken = engine.Step("data/broken", ["stage=data", "dataset=piqa", f"paths.data_dir={tmp_path / 'none'}"],
                         ["data_summary.json"])
    execute = executors.SubmititExecutor("local", params={"timeout_min": 5})
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        status = engine.run_steps([ok], root, shared, execute)
        assert status["data/piqa"]["status"] == "done"
        summary = json.loads((root / "data/piqa/data_summary.json").read_text())
        expected = sum(1 for line in open(f"{DATA_DIR}/piqa/validation.jsonl") if line.strip())
        assert summary["piqa"]["validation"]["n"] == expected
        assert list((root / "data/piqa/.submitit").glob("*/*_0_log.out"))  # it ran as a submitit job
        with pytest.raises(LoragenError, match=r"1 of 1 pipeline step jobs failed: data/broken .*not found in the "
                                               r"local data dir.*\(log: \S+_0_log\.(err|out)\)"):
            engine.run_steps([broken], root, shared, execute)


def test_launcher_settings_are_submitits_defaults_outside_a_hydra_app():
    from loragen.pipeline.executors import SubmititExecutor

    assert SubmititExecutor("slurm").params == {}
    ex = SubmititExecutor("slurm", params={"partition": "a800", "gpus_per_node": 4, "tasks_per_node": 4,
                                           "max_num_timeout": 3, "setup": ["export A=1"], "qos": None})
    executor = ex.make_executor(Path("/tmp/x"), name="loragen-step")
    p = executor._executor.parameters
    assert (p["partition"], p["gpus_per_node"], p["ntasks_per_node"], p["setup"]) == ("a800", 4, 4, ["export A=1"])
    assert executor._executor.max_num_timeout == 3 and "qos" not in p
