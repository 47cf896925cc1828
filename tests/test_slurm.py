"""Sweeps, pipeline steps, multi-task training and preemption on a real one-node SLURM cluster
(scripts/slurm-local.sh). Skipped when the cluster cannot start, unless LORAGEN_REQUIRE_SLURM=1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slurm
LAUNCH = ["hydra/launcher=slurm_local", "tracker=none"]
TINY_LORA = ["stage=lora", "model=tiny_qwen2", "dataset=arc_easy", "lora.train_limit=64", "lora.eval_base=false",
             "lora.final_eval_limit=5", "ckpt.every=0"]


def _cluster(command: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "slurm-local.sh"), command], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster; one this session started is stopped after it (its daemons would outlive the tests)."""
    try:
        was_running = _cluster("status", 60).returncode == 0
        proc = _cluster("start", 900)
        ok, reason = proc.returncode == 0, proc.stderr.strip()[-800:]
    except (OSError, subprocess.TimeoutExpired) as e:
        was_running, ok, reason = False, False, str(e)
    if not ok:
        message = f"the local SLURM cluster did not start (scripts/slurm-local.sh start): {reason}"
        if os.environ.get("LORAGEN_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    yield
    if not was_running:
        _cluster("stop", 120)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _summary(sweep: Path) -> list[dict]:
    return json.loads((sweep / "sweep_summary.json").read_text())["jobs"]


def test_multirun_of_two_jobs_through_submitit_slurm(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(["-m", "stage=evaluate", "model=tiny_qwen2", "eval.limit=10", "dataset=arc_easy,boolq",
             f"hydra.sweep.dir={sweep}", *LAUNCH])
    jobs = _summary(sweep)
    assert [j["status"] for j in jobs] == ["completed", "completed"]
    assert all(re.fullmatch(r"\d+_[01]", j["job_id"]) for j in jobs)  # one SLURM job array
    for j in jobs:
        assert "Partition=debug" in _final_state(j["job_id"], "COMPLETED")
    # each job wrote its own results, the same numbers as the same evaluation run here in-process
    local = tmp_path / "local"
    run_cli(["stage=evaluate", "model=tiny_qwen2", "eval.limit=10", "dataset=boolq", "tracker=none",
             f"hydra.run.dir={local}"])
    (on_slurm,) = json.loads((sweep / "1" / "results.json").read_text())["results"]
    (here,) = json.loads((local / "results.json").read_text())["results"]
    assert on_slurm["dataset"] == "boolq" and on_slurm["n"] == 10
    assert on_slurm["acc"] == here["acc"]
    (arc,) = json.loads((sweep / "0" / "results.json").read_text())["results"]
    assert arc["dataset"] == "arc_easy" and arc["n"] == 10


def test_submission_failure_shows_sbatch_message_and_script(slurm_cluster, tmp_path):
    proc = run_cli(["-m", "stage=evaluate", "model=tiny_qwen2", "eval.limit=10", "dataset=arc_easy,boolq",
                    "hydra.launcher.partition=no_such_partition", f"hydra.sweep.dir={tmp_path / 's'}", *LAUNCH],
                   check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("loragen: error: job submission failed:")
    assert "invalid partition specified: no_such_partition" in err  # sbatch's own words
    script = re.search(r"the generated script: (\S+\.sh)", err).group(1)
    assert "#SBATCH --partition=no_such_partition" in Path(script).read_text()


def test_failed_sweep_job_is_named_with_its_log(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    bad = tmp_path / "no_data_here"
    proc = run_cli(["-m", "stage=data", "dataset=arc_easy", f"paths.data_dir={os.environ['LORAGEN_DATA_DIR']},{bad}",
                    f"hydra.sweep.dir={sweep}", *LAUNCH], check=False)
    assert proc.returncode == 2
    jobs = _summary(sweep)
    assert [j["status"] for j in jobs] == ["completed", "failed"]
    assert "not found in the local data dir" in jobs[1]["error"]
    assert f"(log: {jobs[1]['log']})" in proc.stderr and Path(jobs[1]["log"]).is_file()
    assert "not found in the local data dir" in Path(jobs[1]["log"]).read_text()


def test_pipeline_step_runs_as_a_slurm_job(slurm_cluster, tmp_path):
    from hydra import initialize_config_dir

    from loragen.errors import LoragenError
    from loragen.pipeline import engine, executors

    root = tmp_path / "pipe"
    shared = ["tracker=none", f"paths.data_dir={os.environ['LORAGEN_DATA_DIR']}"]
    step = engine.Step("eval/boolq", ["stage=evaluate", "model=tiny_qwen2", "dataset=boolq", "eval.limit=10"],
                       ["results.json"])
    execute = executors.SubmititExecutor("slurm", params={"partition": "debug", "cpus_per_task": 1, "timeout_min": 10})
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        status = engine.run_steps([step], root, shared, execute)
        assert status["eval/boolq"]["status"] == "done"
        (entry,) = json.loads((root / "eval/boolq/results.json").read_text())["results"]
        assert entry["n"] == 10 and entry["dataset"] == "boolq"
        logs = list((root / "eval/boolq/.submitit").glob("*/*_0_log.out"))
        assert logs, "the step ran as a submitit job"
        # done steps are skipped without a new job
        again = engine.run_steps([step], root, shared, execute)
        assert again["eval/boolq"]["status"] == "skipped"
        assert list((root / "eval/boolq/.submitit").glob("*/*_0_log.out")) == logs

        # independent steps as one job array
        pair = [engine.Step(f"data/{d}", ["stage=data", f"dataset={d}"], ["data_summary.json"]) for d in ("piqa", "boolq")]
        execute.run_many([(s, engine.compose_step(s, shared), root / s.name) for s in pair])
        ids = sorted(p.parent.name for p in (root / "data" / ".submitit").glob("*/*_0_log.out"))
        assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0] and ids[0] != ids[1], ids
        assert all((root / s.name / "data_summary.json").is_file() for s in pair)

        (tmp_path / "nothing").mkdir()  # exists (a missing data dir is refused before submission) but holds no boolq
        broken = engine.Step("eval/broken", ["stage=evaluate", "model=tiny_qwen2", "dataset=boolq",
                                             f"paths.data_dir={tmp_path / 'nothing'}"], ["results.json"])
        with pytest.raises(LoragenError, match=r"1 of 1 pipeline step jobs failed: eval/broken .*not found in the "
                                               r"local data dir.*\(log: .*_0_log\.(err|out)\)"):
            engine.run_steps([broken], root, shared, execute)


def test_two_task_job_trains_as_one_gloo_group(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    common = [*TINY_LORA, "train.max_steps=4"]
    run_cli(["-m", *common, "hardware.per_device_batch=2", "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}",
             *LAUNCH])
    trainer = json.loads((sweep / "0" / "state" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["step"] == 4
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml",
                                                                                    "sweep_summary.json"]
    (job,) = _summary(sweep)
    task0 = Path(job["log"]).with_name(f"{job['job_id']}_0_log.out").read_text()
    assert re.search(r"submitit job: rank 0 of 2, master \S+:\d+", task0)
    # one process with the same global batch (4) takes the same steps
    local = tmp_path / "local"
    run_cli([*common, "hardware.per_device_batch=4", "tracker=none", f"hydra.run.dir={local}"],
            env={"OMP_NUM_THREADS": "1"})
    two, one = _adapter(sweep / "0" / "final"), _adapter(local / "final")
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)
    assert any(one[k].abs().sum() > 0 for k in one if "lora_B" in k)  # it trained


def test_preempted_training_requeues_and_ends_equal_to_an_uninterrupted_run(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    # two identical trainings in one job array (log_every does not change the trajectory); job 1 is preempted
    args = [*TINY_LORA, "train.max_steps=300", "hardware.per_device_batch=4", "train.log_every=10,11",
            f"hydra.sweep.dir={sweep}", *LAUNCH]
    proc = subprocess.Popen([sys.executable, "-m", "loragen", "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log1 = _wait_for(lambda: next(iter(sweep.glob(".submitit/*_1/*_1_0_log.out")), None), 120)
        _wait_for(lambda: re.search(r"train: \d+/300", log1.read_text()), 120)
        job_id = log1.name.split("_0_log")[0]
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        t_signal = time.time()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    text = log1.read_text()
    saved = int(re.search(r"preempted: full state saved at step (\d+)", text).group(1))
    resumed = int(re.search(r"resuming from \S+ at step (\d+) of 300", text).group(1))
    assert 0 < saved == resumed < 300
    assert "Restarts=1" in _final_state(job_id, "COMPLETED")
    print(f"requeued job {job_id}: signal -> finished in {time.time() - t_signal:.1f} s")
    interrupted, uninterrupted = _adapter(sweep / "1" / "final"), _adapter(sweep / "0" / "final")
    assert interrupted.keys() == uninterrupted.keys()
    for k in uninterrupted:
        assert torch.equal(interrupted[k], uninterrupted[k]), k


def _final_state(job_id: str, state: str) -> str:
    """`scontrol show job` once SLURM has moved the job to `state` (a job's result file precedes its end)."""
    show = lambda: subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout  # noqa: E731
    return _wait_for(lambda: (lambda s: s if f"JobState={state}" in s else None)(show()), 60)


def _wait_for(probe, timeout: float):
    end = time.time() + timeout
    while time.time() < end:
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {probe}")
