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


def test_sigterm_to_the_pipeline_stops_its_worker_steps_which_save_and_the_rerun_finishes(tmp_path):
    """The pipeline passes the signal on: a LoRA step in a worker saves its state, the pipeline exits 143 with one
    line naming it, and the same command again resumes it and finishes every step."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT, run_cli

    lora = '["train.max_steps=60","ckpt.every=0","lora.eval_limit=10","lora.final_eval_limit=8","lora.eval_base=false"]'
    args = ["experiment=paw_tiny", "tracker=none", "pipeline.workers=2", f"hydra.run.dir={tmp_path}",
            f"pipeline.paw.lora_overrides={lora}"]
    proc = subprocess.Popen([sys.executable, "-m", "loragen", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if re.search(r"\[lora_\w+/\w+\]\[loragen.runtime\].* train: \d+/60 \(", line):  # a worker trains
                children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
                for pid in [proc.pid, *map(int, children)]:  # pause all, so the signal lands mid-training
                    os.kill(pid, signal.SIGSTOP)
                os.kill(proc.pid, signal.SIGTERM)
                for pid in [*map(int, children), proc.pid]:
                    os.kill(pid, signal.SIGCONT)
                break
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if "interrupted" in ln]
    names = re.findall(r"(lora_(?:source|target)/\w+) interrupted at step (\d+) of 60 \(SIGTERM\)", line)
    assert names, line
    for name, step in names:  # each stopped LoRA saved the step it reached and has no finished record
        assert json.loads((tmp_path / name / "state" / "trainer.json").read_text())["step"] == int(step)
        assert not (tmp_path / name / "fingerprint.json").exists()
    again = run_cli(args)
    for name, step in names:
        assert f"resuming from {tmp_path / name / 'state'} at step {step} of 60" in again.stdout
    assert json.loads((tmp_path / "table.json").read_text())["rows"]
