"""Where the time goes: the training loop's per-interval mean loss and CPU seconds, each pipeline step's CPU
seconds and load in its record, the pipeline's end line, the report's "Profile by step" and its timing plot, and
a SIGTERM outside training and pipelines (one line, exit 143)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from accelerate import Accelerator
from hydra import initialize_config_dir

from loragen import cli, io
from loragen.errors import Interrupted
from loragen.pipeline import engine
from loragen.pipeline.engine import Step, run_steps
from loragen.report import runs as report_runs
from loragen.report import sections
from loragen.train import fit
from loragen.train.preemption import PreemptionFlag
from tests.conftest import CONF, ROOT
from tests.train_helpers import records, tiny_lora, train_cfg

# --- the training loop ------------------------------------------------------------------------------------------

def test_history_rows_carry_the_interval_mean_loss_and_cpu_seconds(paths, tmp_path):
    model, obj, _ = tiny_lora(paths)
    seen: list[tuple[float, float]] = []  # (loss sum, units) of every micro-batch, as the loss function returned them

    def loss_fn(m, batch):
        loss_sum, units = obj.loss(m, batch)
        seen.append((float(loss_sum.detach()), float(units)))
        return loss_sum, units

    cfg = train_cfg(max_steps=7, log_every=3, grad_accum=2, per_device_batch=2)
    res = fit(model, loss_fn, records(), obj.collate, cfg, accelerator=Accelerator(cpu=True),
              state_dir=tmp_path / "state", fingerprint={"test": 1})
    assert [r["step"] for r in res.history] == [3, 6, 7]
    per_step = [seen[i:i + 2] for i in range(0, len(seen), 2)]  # grad_accum=2 micro-batches per step
    assert len(per_step) == 7
    for previous, row in zip([0, 3, 6], res.history):
        micro = [mb for step in per_step[previous:row["step"]] for mb in step]
        expected = sum(s for s, _ in micro) / sum(u for _, u in micro)
        assert row["loss_interval"] == pytest.approx(expected, rel=1e-6)
        last = per_step[row["step"] - 1]
        assert row["loss"] == pytest.approx(sum(s for s, _ in last) / sum(u for _, u in last), rel=1e-6)
        assert row["cpu_s"] > 0
    assert res.history[-1]["loss_interval"] == pytest.approx(res.history[-1]["loss"], rel=1e-6)  # one step: the same


# --- step records and the pipeline's end line ---------------------------------------------------------------------

BURN = "s = 0\nfor i in range(3_000_000):\n    s += i"


def test_step_records_hold_cpu_seconds_and_load(tmp_path):
    def execute(step, cfg, step_dir):  # a local step whose work is in a child process
        subprocess.run([sys.executable, "-c", BURN], check=True)
        step_dir.mkdir(parents=True, exist_ok=True)
        io.write_text(step_dir / "out.txt", "ok")

    steps = [Step("a", ["stage=data", "dataset=arc_easy"], ["out.txt"])]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        status = run_steps(steps, tmp_path / "local", [], execute)
        remote = run_steps(steps, tmp_path / "remote", [], execute, cpu=False)
    record = json.loads((tmp_path / "local" / "a" / engine.FINGERPRINT).read_text())
    assert record["cpu_seconds"] > 0.05 and record["seconds"] >= 0
    assert status["a"]["cpu_seconds"] == record["cpu_seconds"] and status["a"]["seconds"] == record["seconds"]
    load = record["load"]
    assert load["cores"] == os.cpu_count() and len(load["before"]) == 3 and len(load["after"]) == 3
    assert json.loads((tmp_path / "remote" / "a" / engine.FINGERPRINT).read_text())["cpu_seconds"] is None
    assert remote["a"]["cpu_seconds"] is None


def test_the_pipeline_end_line_names_its_time_and_slowest_steps():
    status = {f"lora/d{i}": {"status": "done", "seconds": 10.0 * i, "cpu_seconds": 15.0 * i} for i in range(1, 7)}
    status["tokenize/d1"] = {"status": "skipped"}
    status["generator/d1"] = {"status": "done", "seconds": 5.0, "cpu_seconds": None}
    line = engine.profile(status, 250.0)
    assert line.startswith("pipeline finished in 0:04:10 (7 of 8 steps run); slowest: ")
    assert line.endswith("lora/d6 60.0 s (24%, CPU 90 s); lora/d5 50.0 s (20%, CPU 75 s); lora/d4 40.0 s (16%, CPU 60 s); "
                         "lora/d3 30.0 s (12%, CPU 45 s); lora/d2 20.0 s (8%, CPU 30 s)")
    assert engine.profile({"a": {"status": "skipped"}}, 3.0) == \
        "pipeline finished in 0:00:03 (0 of 1 steps run; every step was done already)"


# --- the report ------------------------------------------------------------------------------------------------

def write_step(root, name: str, seconds: float, cpu: float | None, load: dict | None = None) -> None:
    d = root / name
    d.mkdir(parents=True)
    record = {"fingerprint": name, "deps": [], "overrides": [], "seconds": seconds, "content": {}}
    if cpu is not None or load is not None:
        record |= {"cpu_seconds": cpu, "load": load}
    (d / "fingerprint.json").write_text(json.dumps(record))


def test_profile_by_step_groups_steps_by_kind_with_their_share(tmp_path):
    root = tmp_path / "pipeline"
    load = {"before": [1.5, 1.2, 1.0], "after": [2.25, 1.5, 1.1], "cores": 2}
    write_step(root, "tokenize/a", 10.0, 20.0, load)
    write_step(root, "tokenize/b", 30.0, None)  # an older record: no CPU seconds, no load
    write_step(root, "report", 60.0, 50.0, load)
    runs = report_runs.collect([root])
    text = "\n".join(sections.steps_section(runs))
    assert "## Profile by step" in text
    assert "| report | 1 | 60.0 | 60.0% | 50.0 |" in text
    assert "| tokenize | 2 | 40.0 | 40.0% | 20.0 (1 of 2) |" in text
    assert "| total | 3 | 100.0 | 100% | 70.0 (2 of 3) |" in text
    assert "| tokenize | tokenize/a | 10.0 | 10.0% | 20.0 | 2.00 | load 1.5→2.2 / 2 cores |" in text
    assert "| tokenize | tokenize/b | 30.0 | 30.0% | – | – | – |" in text
    assert text.index("| report | report |") < text.index("| tokenize | tokenize/b |") < \
        text.index("| tokenize | tokenize/a |")  # kinds by their total, steps by their time


def test_loop_cpu_seconds_accumulate_until_a_row_lacks_them():
    run = report_runs.LoraRun(path=ROOT, name="lora/x", history=[
        {"step": 2, "cpu_s": 1.0}, {"step": 4, "cpu_s": 2.5}, {"step": 6}, {"step": 8, "cpu_s": 1.0}])
    assert sections.cpu_elapsed(run) == [1.0, 3.5, None, None]
    assert sections.cpu_at(run, 4) == 3.5 and sections.cpu_at(run) is None and sections.cpu_at(run, 3) == 3.5
    assert sections.fmt_load(None) is None and sections.fmt_load({"before": None, "after": None}) is None


# --- SIGTERM outside training and pipelines ---------------------------------------------------------------------

@pytest.fixture
def sigterm_restored():
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


def test_the_cli_sigterm_handler_only_replaces_the_default(sigterm_restored):
    other = lambda s, f: None  # noqa: E731 - stands in for submitit's handler
    signal.signal(signal.SIGTERM, other)
    assert not cli.install_sigterm_handler() and signal.getsignal(signal.SIGTERM) is other
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    assert not cli.install_sigterm_handler() and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert cli.install_sigterm_handler() and signal.getsignal(signal.SIGTERM) is cli.sigterm_handler
    assert not cli.install_sigterm_handler()  # once

    with PreemptionFlag() as flag:  # the training loop's handler goes over it and puts it back
        os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested and signal.getsignal(signal.SIGTERM) is cli.sigterm_handler
    with pytest.raises(engine.StopRequested), engine.stop_on_signals():  # so does a pipeline's
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is cli.sigterm_handler

    with pytest.raises(Interrupted) as e:  # outside both
        os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.exit_code == 143 and str(e.value) == cli.SIGTERM_MESSAGE


SLOW_STAGE = textwrap.dedent("""
    import sys, time
    from loragen import cli

    def slow(cfg):  # stands in for a model loading or a final evaluation
        print("slow phase", flush=True)
        time.sleep(120)

    cli.run_stage = slow
    sys.argv = ["loragen", *sys.argv[1:]]
    cli.main()
""")


def test_sigterm_outside_training_is_one_line_and_exit_143(tmp_path):
    env = {**os.environ, "LORAGEN_DEBUG": ""}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STAGE, "stage=data", "dataset=arc_easy", "tracker=none",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "slow phase" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "done" not in out
    assert err.strip().splitlines()[-1] == f"loragen: {cli.SIGTERM_MESSAGE}"
