"""Signals: SIGTERM and Ctrl-C save the training state at the next step boundary and stop with 143/130 and one
line; a second Ctrl-C stops at once; an ignored SIGINT stays ignored (SwanLab on); a resumed run ends bit-equal to
an uninterrupted one and continues its SwanLab run; a pipeline reports an interrupted step as interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hydra import initialize_config_dir
from safetensors.torch import load_file

from loragen import io
from loragen.errors import Interrupted
from loragen.pipeline.engine import Step, StopRequested, run_steps
from loragen.train import fit, preemption
from loragen.train.preemption import PreemptionFlag, exit_at_once
from loragen.train.state import trainable_tensors
from tests.conftest import CONF, ROOT, compose, run_cli
from tests.train_helpers import records, tiny_lora, train_cfg

STEPS = 60
TINY = ["stage=lora", "model=tiny_qwen2", "dataset=arc_easy", "tracker=none", "train.per_device_batch=4",
        "train.lr=5e-3", "lora.train_limit=40", "lora.final_eval_limit=8", "lora.eval_base=false", "lora.r=4",
        f"train.max_steps={STEPS}", "ckpt.every=0"]


@pytest.fixture
def handlers():
    """Every handler a test may change, put back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    # start from an interactive process's handlers: pytest itself may run with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    yield
    for s, h in saved.items():
        signal.signal(s, h)


# --- the flag ------------------------------------------------------------------------------------------------

def test_sigterm_and_ctrl_c_interrupt_sigusr2_with_a_handler_requeues(handlers):
    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested and not flag.requeue and flag.exit_code == 143

    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
    assert flag.exit_code == 130 and not flag.requeue
    assert signal.getsignal(signal.SIGINT) is exit_at_once  # Ctrl-C again while the process finishes stopping

    calls = []
    signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))  # stands in for submitit's requeueing handler
    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.requeue
        flag.hand_over()
    assert calls == [signal.SIGUSR2]

    signal.signal(signal.SIGUSR2, signal.SIG_DFL)  # nobody to requeue: an interruption (exit 128 + 12)
    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR2)
    assert not flag.requeue and flag.exit_code == 140


def test_an_ignored_sigint_stays_ignored(handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with PreemptionFlag() as flag:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
    assert not flag.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# --- the loop, in this process ---------------------------------------------------------------------------------

def _fit(paths, out, on_step=None, max_steps=4):
    model, obj, _ = tiny_lora(paths)
    res = fit(model, obj.loss, records(), obj.collate, train_cfg(max_steps=max_steps), accelerator=Accelerator(cpu=True),
              state_dir=out / "state", fingerprint={"test": 1}, on_step=on_step)
    return model, res


def test_sigterm_saves_that_step_and_the_stage_raises_interrupted(paths, tmp_path, handlers):
    straight, _ = _fit(paths, tmp_path / "straight")
    _, first = _fit(paths, tmp_path / "run", on_step=lambda s: s == 2 and os.kill(os.getpid(), signal.SIGTERM))
    assert (first.status, first.step, first.exit_code) == ("interrupted", 2, 143)
    assert json.loads((tmp_path / "run" / "state" / "trainer.json").read_text())["step"] == 2
    with pytest.raises(Interrupted) as e:
        first.raise_if_interrupted()
    assert e.value.exit_code == 143
    assert str(e.value) == (f"interrupted at step 2 of 4 (SIGTERM); state saved in {tmp_path / 'run' / 'state'}; "
                            "rerun the same command to resume")
    resumed, second = _fit(paths, tmp_path / "run")
    assert (second.resumed_from, second.status) == (2, "completed")
    a, b = trainable_tensors(straight), trainable_tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


class Exited(BaseException):
    """Stands in for os._exit in this process."""


def test_a_second_ctrl_c_stops_at_once_naming_the_last_saved_state(paths, tmp_path, handlers, monkeypatch):
    def exit_now(message, code):
        raise Exited(message, code)

    monkeypatch.setattr(preemption, "exit_now", exit_now)

    def twice(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    model, obj, _ = tiny_lora(paths)
    with pytest.raises(Exited) as e:
        fit(model, obj.loss, records(), obj.collate, train_cfg(max_steps=5, save_state_every=2),
            accelerator=Accelerator(cpu=True), state_dir=tmp_path / "state", fingerprint={"test": 1}, on_step=twice)
    assert e.value.args == (f"stopped at once by a second Ctrl-C at step 3 of 5; the last saved state is step 2 in "
                            f"{tmp_path / 'state'}; rerun the same command to resume from it", 130)
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 2


# --- SwanLab ---------------------------------------------------------------------------------------------------

def test_swanlab_keeps_sigint_and_a_resumed_run_continues_its_run_id(tmp_path, monkeypatch, handlers):
    from loragen.tracking import make_tracker

    monkeypatch.chdir(tmp_path)
    cfg = compose(["stage=lora", "tracker=swanlab", "tracker.mode=offline"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job
    first = make_tracker(cfg, tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # not SwanLab's handler, which would swallow Ctrl-C
    first.log({"train/loss": 1.0}, step=1)
    first.finish()
    run_id = first.run_id
    assert run_id
    io.write_json(tmp_path / "state" / "trainer.json", {"step": 1, "tracker_run_id": run_id})  # as fit saves it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    second = make_tracker(cfg, tmp_path)
    assert second.run_id == run_id and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    second.log({"train/loss": 0.5}, step=2)
    second.finish()
    runs = sorted(p.name for p in (tmp_path / "swanlog").iterdir() if p.is_dir())
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)  # two segments of one run (swanlab sync --id)
    third = make_tracker(compose(["stage=lora", "tracker=swanlab", "tracker.mode=offline", "train.resume=never"]),
                         tmp_path)
    assert third.run_id != run_id  # starting over: a new run
    third.finish()


# --- the CLI, in a subprocess ----------------------------------------------------------------------------------

def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def _interactive_sigint() -> None:
    """In the child: SIGINT as in a terminal's foreground job (a background pytest would pass on SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(args: list[str], signum: int, env: dict | None = None, preexec=None, timeout: float = 300):
    """Run loragen; at its first training progress line pause it, send `signum`, let it go on; return
    (returncode, stdout, stderr). Pausing makes the signal land mid-run however fast the steps are."""
    proc = subprocess.Popen([sys.executable, "-m", "loragen", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec or _interactive_sigint)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if re.search(r"train: \d+/\d+ \(", line):
                os.kill(proc.pid, signal.SIGSTOP)
                os.kill(proc.pid, signum)
                os.kill(proc.pid, signal.SIGCONT)
                break
        rest, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(out) + rest, err


def _one_interrupted_line(stderr: str, what: str) -> int:
    """The step named by the only line of stderr about the interruption; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if "interrupted" in ln]
    assert len(lines) == 1, stderr[-3000:]
    match = re.search(rf"interrupted at step (\d+) of {STEPS} \({what}\); state saved in (\S+); rerun the same "
                      r"command to resume$", lines[0])
    assert match, lines[0]
    return int(match.group(1))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "straight"
    run_cli([*TINY, f"hydra.run.dir={out}"])
    return _adapter(out)


def test_sigterm_exits_143_with_one_line_and_the_rerun_ends_bit_equal(uninterrupted, tmp_path):
    args = [*TINY, f"hydra.run.dir={tmp_path}"]
    code, out, err = _interrupt(args, signal.SIGTERM)
    step = _one_interrupted_line(err, "SIGTERM")
    assert code == 143, err[-3000:]
    assert 0 < step < STEPS and json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == step
    assert not (tmp_path / "final").exists() and "stage lora done" not in out
    again = run_cli(args)
    assert f"resuming from {tmp_path / 'state'} at step {step} of {STEPS}" in again.stdout
    final = _adapter(tmp_path)
    assert final.keys() == uninterrupted.keys() and all(torch.equal(final[k], uninterrupted[k]) for k in final)


def test_ctrl_c_with_swanlab_exits_130_and_the_rerun_continues_the_swanlab_run(uninterrupted, tmp_path):
    args = [*TINY, "tracker=swanlab", f"hydra.run.dir={tmp_path}"]
    env = {"SWANLAB_MODE": "offline"}
    code, out, err = _interrupt(args, signal.SIGINT, env=env)
    step = _one_interrupted_line(err, "SIGINT")
    assert code == 130, err[-3000:]
    trainer = json.loads((tmp_path / "state" / "trainer.json").read_text())
    assert trainer["step"] == step and trainer["tracker_run_id"]
    run_cli(args, env=env)
    final = _adapter(tmp_path)
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)
    runs = [p.name for p in (tmp_path / "swanlog").iterdir() if p.is_dir()]
    assert len(runs) == 2 and all(r.endswith(trainer["tracker_run_id"]) for r in runs)


def test_an_ignored_sigint_is_ignored_with_swanlab_on(tmp_path):
    args = [*TINY, "tracker=swanlab", f"hydra.run.dir={tmp_path}"]
    code, out, err = _interrupt(args, signal.SIGINT, env={"SWANLAB_MODE": "offline"},
                                preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert (tmp_path / "final").is_dir() and "received SIGINT" not in out


def test_a_pipeline_reports_its_interrupted_step_and_exits_143(tmp_path):
    lora = f'["train.max_steps={STEPS}","ckpt.every=0","lora.eval_limit=10","lora.final_eval_limit=8","lora.eval_base=false"]'
    args = ["experiment=paw_tiny", "tracker=none", f"hydra.run.dir={tmp_path}", f"pipeline.paw.lora_overrides={lora}"]
    code, out, err = _interrupt(args, signal.SIGTERM)
    assert code == 143, err[-3000:]
    assert "Traceback" not in err and "finished without its outputs" not in err + out
    (line,) = [ln for ln in err.splitlines() if "interrupted" in ln]
    match = re.search(r"pipeline step (\S+) \((\d+)/(\d+)\) interrupted at step (\d+) of \d+ \(SIGTERM\)", line)
    assert match, line
    name, step = match.group(1), int(match.group(4))
    assert re.search(rf"step {match.group(2)}/{match.group(3)} {re.escape(name)} \(elapsed [\d:]+, \d+ steps? left\): "
                     r"interrupted", out)
    # the rerun resumes this step in place: its state is there and it has no finished record
    assert json.loads((tmp_path / name / "state" / "trainer.json").read_text())["step"] == step
    assert not (tmp_path / name / "fingerprint.json").exists()


# --- the engine ------------------------------------------------------------------------------------------------

def test_an_interrupted_step_stops_the_pipeline_with_its_code_and_the_rerun_resumes_it(tmp_path):
    class Stops:
        def __init__(self, stop_at=None):
            self.ran, self.stop_at = [], stop_at

        def __call__(self, step, cfg, step_dir):
            step_dir.mkdir(parents=True, exist_ok=True)
            self.ran.append(step.name)
            if step.name == self.stop_at:
                raise Interrupted("interrupted at step 3 of 9 (SIGINT); state saved in x; rerun the same command to "
                                  "resume", exit_code=130)
            for o in step.outputs:
                io.write_text(step_dir / o, "ok")

    steps = [Step("a", ["stage=data", "dataset=arc_easy"], ["out.txt"]),
             Step("b", ["stage=data", "dataset=boolq"], ["out.txt"], ["a"]),
             Step("c", ["stage=data", "dataset=piqa"], ["out.txt"], ["b"])]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        first = Stops(stop_at="b")
        with pytest.raises(Interrupted) as e:
            run_steps(steps, tmp_path, [], first)
        assert e.value.exit_code == 130 and str(e.value).startswith("pipeline step b (2/3) interrupted at step 3 of 9")
        assert first.ran == ["a", "b"] and (tmp_path / "a" / "fingerprint.json").is_file()
        again = Stops()
        status = run_steps(steps, tmp_path, [], again)
    assert again.ran == ["b", "c"] and status["a"]["status"] == "skipped"


def test_a_signal_during_a_step_that_does_not_train_stops_it_at_once_as_interrupted(tmp_path, handlers):
    def slow(step, cfg, step_dir):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # never reached: the engine's handler raises
        raise AssertionError("not stopped")

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(Interrupted) as e:
            run_steps([Step("a", ["stage=data"], ["out.txt"])], tmp_path, [], slow)
    assert e.value.exit_code == 143
    assert str(e.value) == ("pipeline step a (1/1) interrupted (SIGTERM) before it finished; rerun the same command "
                            "to resume")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


# --- step jobs (submitit executors) ----------------------------------------------------------------------------

class _Job:
    def __init__(self, job_id, result=None, process=None):
        self.job_id, self.result, self._process = job_id, result, process


def test_a_step_job_stopped_by_a_signal_is_reported_interrupted(tmp_path, monkeypatch):
    from loragen import jobs
    from loragen.pipeline import executors

    message = "interrupted at step 4 of 9 (SIGTERM); state saved in s; rerun the same command to resume"

    def stopped(step, cfg, step_dir):
        raise Interrupted(message, exit_code=143)

    monkeypatch.setattr(executors, "run_in_process", stopped)
    step = Step("lora/x", [], ["final/adapter_config.json"])
    result = executors.StepJob()(step, None, str(tmp_path))
    assert result == {"interrupted": message, "exit_code": 143}
    # the pipeline's side: that result (a completed job) is an interruption, not "finished without its outputs"
    monkeypatch.setattr(executors.SubmititExecutor, "make_executor", lambda self, folder, name: None)
    monkeypatch.setattr(jobs, "submit", lambda executor, fn, *lists: [_Job("7", fn(*args)) for args in zip(*lists)])
    monkeypatch.setattr(jobs, "wait", lambda submitted: [jobs.Outcome(i, j.job_id, "completed", result=j.result)
                                                         for i, j in enumerate(submitted)])
    with pytest.raises(Interrupted) as e:
        executors.SubmititExecutor("local", params={}, folder=tmp_path).run_many([(step, None, tmp_path / "x")])
    assert e.value.exit_code == 143 and str(e.value) == f"pipeline step lora/x {message}"


def test_a_signal_to_the_waiting_pipeline_is_passed_on_to_its_step_jobs(handlers):
    from loragen.pipeline.executors import passed_on, terminate

    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                              "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(43))\nprint('ready', flush=True)\n"
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        job = _Job("1", process=child)
        with passed_on(lambda: terminate(job), "1") as received:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the job gets SIGTERM and saves; waiting goes on
            assert child.wait(timeout=30) == 43
            with pytest.raises(StopRequested):  # a second one stops waiting at once
                os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGINT, signal.SIGTERM]
    finally:
        child.kill()
