"""Progress a person can read in a log: training lines with loss, lr, rate and ETA; pipeline `step k/n` lines;
third-party warnings shown once."""

from __future__ import annotations

import io as _io
import logging
import sys
import uuid
import warnings

import pytest
from accelerate import Accelerator
from hydra import initialize_config_dir

from loragen import io, runtime
from loragen.pipeline import engine
from loragen.pipeline.engine import Step, run_steps
from loragen.train import fit
from tests.conftest import CONF
from tests.train_helpers import records, tiny_lora, train_cfg


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def once_filter_removed():
    """show_warnings_once() adds its filter to the root's and third-party loggers' handlers (pytest's own here):
    take it off afterwards."""
    yield
    loggers = [logging.getLogger(), *[lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger)]]
    for h in [h for lg in loggers for h in lg.handlers]:
        for f in [f for f in h.filters if isinstance(f, runtime.OncePerMessage)]:
            h.removeFilter(f)


@pytest.fixture
def plain(monkeypatch):
    """A log, not a terminal: plain lines."""
    monkeypatch.setattr(sys, "stderr", _io.StringIO())


def lines(caplog, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def test_training_lines_carry_the_mean_loss_since_the_last_line_lr_rate_and_eta(plain, caplog):
    clock = FakeClock()
    bar = runtime.ProgressBar(100, desc="train", clock=clock)
    loss = {step: 1 + step / 100 for step in range(1, 101)}
    with caplog.at_level(logging.INFO, logger="loragen.runtime"):
        for step in range(1, 101):
            clock.t += 0.5  # 2 steps per second
            bar.update(1, loss=loss[step], lr=1e-4)
    got = lines(caplog, "train:")
    assert len(got) == 10  # every 10 %
    # step 30: the mean of steps 21..30 is 1 + 25.5/100; 15 s for 30 steps; 70 left at 2/s is 35 s
    assert got[2] == "train: 30/100 (30%) loss 1.2550 lr 1.0e-04 2.00 it/s elapsed 0:15 ETA 0:35"
    assert got[0] == "train: 10/100 (10%) loss 1.0550 lr 1.0e-04 2.00 it/s elapsed 0:05 ETA 0:45"
    assert got[-1] == "train: 100/100 (100%) loss 1.9550 lr 1.0e-04 2.00 it/s elapsed 0:50"  # done: no ETA


def test_a_resumed_run_counts_its_rate_from_where_it_resumed(plain, caplog):
    clock = FakeClock()
    bar = runtime.ProgressBar(100, desc="train", clock=clock, initial=50)
    with caplog.at_level(logging.INFO, logger="loragen.runtime"):
        for _ in range(10):
            clock.t += 1.0
            bar.update(1, loss=2.0, lr=3e-4)
    # 10 steps in 10 s since the resume at 50; 40 left
    assert lines(caplog, "train:") == ["train: 60/100 (60%) loss 2.0000 lr 3.0e-04 1.00 it/s elapsed 0:10 ETA 0:40"]


def test_slow_steps_get_a_line_at_least_every_minute_in_seconds_per_step(plain, caplog):
    clock = FakeClock()
    bar = runtime.ProgressBar(100, desc="train", clock=clock)
    with caplog.at_level(logging.INFO, logger="loragen.runtime"):
        clock.t += 30.0
        bar.update(1, loss=4.0)  # 30 s since the start: no line yet
        clock.t += 70.0
        bar.update(1, loss=2.0)  # 100 s: a line, though only 2 %
    # 2 steps in 100 s: 50 s each; 98 left: 4900 s = 1 h 21 min 40 s
    assert lines(caplog, "train:") == ["train: 2/100 (2%) loss 3.0000 50.00 s/it elapsed 1:40 ETA 1:21:40"]


def test_the_training_loop_logs_the_loss_and_lr_of_its_history(paths, tmp_path, plain, caplog):
    model, obj, _ = tiny_lora(paths)
    with caplog.at_level(logging.INFO, logger="loragen.runtime"):
        res = fit(model, obj.loss, records(), obj.collate, train_cfg(max_steps=20, warmup_steps=5),
                  accelerator=Accelerator(cpu=True), state_dir=tmp_path / "state", fingerprint={"test": 1})
    got = lines(caplog, "train:")
    history = {row["step"]: row for row in res.history}  # log_every=1: every step's loss and lr
    steps = [int(line.split()[1].split("/")[0]) for line in got]
    assert {2, 4, 6, 8, 10, 12, 14, 16, 18, 20} <= set(steps)  # every 10 % (and every minute on a slow machine)
    for previous, k, line in zip([0, *steps], steps, got):
        since = [history[s]["loss"] for s in range(previous + 1, k + 1)]
        mean = sum(since) / len(since)
        assert line.startswith(f"train: {k}/20 ({5 * k}%) loss {mean:.4f} lr {history[k]['lr']:.1e} "), line


def test_pipelines_log_step_k_of_n_with_elapsed_time_and_steps_left(tmp_path, monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(engine, "clock", clock)

    def execute(step, cfg, step_dir):
        clock.t += 192.0  # 3 min 12 s per step
        step_dir.mkdir(parents=True, exist_ok=True)
        io.write_text(step_dir / "out.txt", "ok")

    steps = [Step("a", ["stage=data", "dataset=arc_easy"], ["out.txt"]),
             Step("b", ["stage=data", "dataset=boolq"], ["out.txt"], ["a"]),
             Step("c", ["stage=data", "dataset=piqa"], ["out.txt"])]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), \
            caplog.at_level(logging.INFO, logger="loragen.pipeline.engine"):
        run_steps(steps, tmp_path, [], execute)
        first = lines(caplog, "step ")
        caplog.clear()
        run_steps(steps, tmp_path, [], execute)
        again = lines(caplog, "step ")
    # a and c need nothing and run first; b waits for a
    assert first == [
        f"step 1/3 a (elapsed 0:00:00, 2 steps left): running in {tmp_path / 'a'}",
        "step 1/3 a (elapsed 0:03:12, 2 steps left): finished in 0:03:12",
        f"step 2/3 c (elapsed 0:03:12, 1 step left): running in {tmp_path / 'c'}",
        "step 2/3 c (elapsed 0:06:24, 1 step left): finished in 0:03:12",
        f"step 3/3 b (elapsed 0:06:24, 0 steps left): running in {tmp_path / 'b'}",
        "step 3/3 b (elapsed 0:09:36, 0 steps left): finished in 0:03:12",
    ]
    assert [line.split(": ")[0] for line in again] == ["step 1/3 a (elapsed 0:00:00, 2 steps left)",
                                                       "step 2/3 c (elapsed 0:00:00, 1 step left)",
                                                       "step 3/3 b (elapsed 0:00:00, 0 steps left)"]
    assert all(": skipped (done, fingerprint " in line for line in again)


def test_a_pipeline_ends_with_its_wall_time_and_slowest_steps(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(engine, "clock", clock)
    cost = {"a": 30.0, "b": 90.0, "c": 60.0}

    def execute(step, cfg, step_dir):
        clock.t += cost[step.name]
        step_dir.mkdir(parents=True, exist_ok=True)
        io.write_text(step_dir / "out.txt", "ok")

    steps = [Step(n, ["stage=data", "dataset=arc_easy"], ["out.txt"]) for n in cost]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        status = run_steps(steps, tmp_path, [], execute)
        again = run_steps(steps, tmp_path, [], execute)
    assert [status[n]["seconds"] for n in cost] == [30.0, 90.0, 60.0]
    assert engine.profile(status, 200.0) == ("pipeline finished in 0:03:20 (3 of 3 steps run); slowest: b 90.0 s (45%"
                                             f", CPU {status['b']['cpu_seconds']:.0f} s); c 60.0 s (30%, CPU "
                                             f"{status['c']['cpu_seconds']:.0f} s); a 30.0 s (15%, CPU "
                                             f"{status['a']['cpu_seconds']:.0f} s)")
    assert engine.profile(again, 2.0) == "pipeline finished in 0:00:02 (0 of 3 steps run; every step was done already)"


def test_durations_and_rates():
    assert [runtime.duration(s) for s in (0, 59.4, 61, 3599, 3600, 3725)] == \
        ["0:00", "0:59", "1:01", "59:59", "1:00:00", "1:02:05"]
    assert runtime.duration(192, hours=True) == "0:03:12"
    assert [runtime.rate(r) for r in (2.1, 1.0, 0.25)] == ["2.10 it/s", "1.00 it/s", "4.00 s/it"]


def test_a_third_party_warning_is_shown_once(monkeypatch, once_filter_removed):
    text = f"`x` is deprecated ({uuid.uuid4()})"  # new text: nothing earlier in this session saw it

    def warn_from_two_places():
        warnings.warn(text, FutureWarning, stacklevel=1)
        warnings.warn(text, FutureWarning, stacklevel=1)

    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        warnings.simplefilter("default")  # Python's default for FutureWarning: once per call site
        warn_from_two_places()
        assert len(shown) == 2  # without the filter: every call site, again after every filter change
        runtime.show_warnings_once()
        shown.clear()
        for _ in range(3):
            warn_from_two_places()
            warnings.filterwarnings("ignore", message="unrelated")  # a library touching the filters resets registries
        assert [str(w.message) for w in shown] == [text]


def test_a_repeated_third_party_logging_warning_is_shown_once(once_filter_removed):
    got: list[str] = []
    text = f"use_cache=True is incompatible ({uuid.uuid4()})"

    class Collect(logging.Handler):
        def emit(self, record):
            got.append(f"{record.name}: {record.getMessage()}")

    root = logging.getLogger()
    own = logging.getLogger("fakelib")  # like transformers: its own handler, not propagated to the root
    own.propagate = False
    handlers = [(root, Collect()), (own, Collect())]
    for logger, h in handlers:
        logger.addHandler(h)
    try:
        runtime.show_warnings_once()
        for _ in range(3):
            logging.getLogger("otherlib.module").warning(text)
            logging.getLogger("fakelib.modeling").warning(text)
            logging.getLogger("loragen.train.loop").warning("full state saved")  # ours: every time
        logging.getLogger("otherlib.module").warning("another one")
    finally:
        for logger, h in handlers:
            logger.removeHandler(h)
    assert got == [f"otherlib.module: {text}", f"fakelib.modeling: {text}", "loragen.train.loop: full state saved",
                   "loragen.train.loop: full state saved", "loragen.train.loop: full state saved",
                   "otherlib.module: another one"]
