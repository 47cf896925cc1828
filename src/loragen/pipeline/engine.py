"""The step engine. Each step is one stage run in its own subdirectory of the pipeline's run dir.

A step records the fingerprint of the config that produced it (and of the steps it depends
on) once it finishes. Running the pipeline again skips steps whose fingerprint matches and
whose outputs exist, reruns a step whose config changed (and, through the fingerprint chain,
everything that depends on it; the old outputs are moved aside, never overwritten), and
resumes a step that was interrupted (no fingerprint yet) in place.

Progress: one line per step, `step k/n <name> (elapsed 0:03:12, n-k steps left): running in <dir>` (or
`skipped`), and `step k/n <name> finished in ...`.

Step records (fingerprint.json): besides the fingerprint, `seconds` (wall), `cpu_seconds` (user+sys CPU seconds of
this process and its waited-for children over the step: the stage's own threads in-process, the job's processes with
submitit_local; null for steps run elsewhere, SLURM, or several at once in a job array) and
`load` = {"before": os.getloadavg(), "after": ..., "cores": os.cpu_count()}: what else the machine was running.
When the steps are done, `profile(status, seconds)` is the pipeline's end line: its wall time and slowest steps.

Signals: a step stopped by SIGTERM/SIGINT (a training step saves its state first, see train.preemption; any
other step stops at once, its outputs are written atomically) is reported as interrupted and the pipeline raises
errors.Interrupted with the signal's exit code (143/130); running the same command again skips the finished steps
and resumes the interrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

from loragen import fingerprint as fp
from loragen import io, rundir, runtime
from loragen.errors import ConfigError, Interrupted

log = logging.getLogger(__name__)
FINGERPRINT = rundir.STEP_RECORD
clock = time.monotonic  # the pipeline's elapsed time (a fake in tests)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """SIGTERM/SIGINT outside the training loop (which saves its state first): the step stops at once."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs (main thread only), SIGTERM and SIGINT raise StopRequested instead of killing the
    process or raising a bare KeyboardInterrupt (a second one ends the process at once); signals the process
    ignores stay ignored. The training loop installs its own handlers over these while it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    raised: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if raised:  # again while the first stop unwinds (a cleanup that hangs): end the process now
            from loragen.train.preemption import exit_now

            exit_now(f"stopped at once ({_signal_name(signum)} again)", _exit_code(raised[0]))
        raised.append(signum)
        raise StopRequested(signum)

    from loragen.train.preemption import handling

    with handling(STOP_SIGNALS, handler):
        yield


def stopped_message(signum: int) -> str:
    return f"interrupted ({_signal_name(signum)}) before it finished; rerun the same command to resume"


def _signal_name(signum: int) -> str:
    from loragen.train.preemption import signal_name

    return signal_name(signum)


def _exit_code(signum: int) -> int:
    from loragen.train.preemption import exit_code

    return exit_code(signum)


@dataclass
class Step:
    name: str                 # its subdirectory, e.g. "lora_source/arc_easy"
    overrides: list[str]      # Hydra overrides composing its config (on top of the pipeline's shared ones)
    outputs: list[str]        # files (relative to its dir) that exist once it has finished
    deps: list[str] = field(default_factory=list)


def quote(value: Any) -> str:
    """A value as a Hydra override string (paths with odd characters, lists, dicts, null)."""
    if value is None:
        return "null"
    if isinstance(value, dict):  # keys as they are: Hydra dict keys (letters, digits, _ - @ . / ...)
        return "{" + ",".join(f"{k}:{quote(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(quote(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def shared_overrides(cfg: DictConfig) -> list[str]:
    """What every step inherits from the pipeline run: hardware, tracker, seed, paths and data settings."""
    out = [f"hardware={cfg.hardware.name}", f"tracker={cfg.tracker.name}", f"seed={cfg.seed}"]
    for group in ("hardware", "tracker", "paths", "data"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if key != "name" and not isinstance(value, dict):
                out.append(f"{group}.{key}={quote(value)}")
    return out


def compose_step(step: Step, shared: list[str]) -> DictConfig:
    """The step's config, composed and validated (loragen.stages.checks) as its stage will see it."""
    from hydra import compose

    from loragen.stages.checks import validate

    try:
        cfg = compose(config_name="config", overrides=shared + step.overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's own message says what is wrong
        raise ConfigError(f"pipeline step {step.name}: cannot compose its config ({e})") from None
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"pipeline step {step.name}: {e}") from None
    return cfg


def fingerprint(step_cfg: DictConfig, dep_prints: Iterable[str]) -> tuple[str, dict]:
    """(hash, content): the step's result-affecting config, its data by content and its dependencies' hashes."""
    content = {**fp.step_content(step_cfg), "deps": sorted(dep_prints)}
    return fp.digest(content), content


def run_steps(steps: list[Step], root: Path, shared: list[str], execute, *, cpu: bool = True) -> dict[str, dict]:
    """Run `steps` under `root`; `execute(step, cfg, step_dir)` runs one step (on this machine unless `cpu` is
    false, e.g. SLURM: then no CPU seconds are recorded).

    Steps run in waves: every step whose dependencies are done. When the executor has a
    `run_many(items)` (SLURM, submitit), a wave's steps go out together as one job array;
    otherwise they run one after another in the order given.
    Returns {step name: {"status": "done" | "skipped", "dir": str, "fingerprint": str}}; a step done in this call
    also has "seconds" and "cpu_seconds" (as its record).
    A step stopped by a signal raises errors.Interrupted naming it (see the module docstring).
    """
    _check_deps(steps)
    configs = {s.name: compose_step(s, shared) for s in steps}  # every step checked before any runs or is submitted
    if steps:
        fp.check_data_source(configs[steps[0].name])
    run = _Run(steps, root, configs, cpu=cpu)
    pending = list(steps)
    try:
        with stop_on_signals():  # a signal between steps: nothing is half-done, stop at once
            while pending:
                wave = [s for s in pending if all(d in run.status for d in s.deps)]
                pending = [s for s in pending if s not in wave]
                todo = [item for item in (run.plan(step) for step in wave) if item is not None]
                if len(todo) > 1 and hasattr(execute, "run_many"):
                    run.execute_many(execute, todo)
                else:
                    for item in todo:
                        run.execute_one(execute, item)
    except StopRequested as e:
        raise Interrupted(f"pipeline interrupted ({_signal_name(e.signum)}) between steps; finished steps are kept; "
                          "rerun the same command to resume", exit_code=_exit_code(e.signum)) from None
    if run.moved:
        log.info("moved aside in this run (kept, not deleted):\n  %s", "\n  ".join(run.moved))
    return run.status


class _Run:
    """One run_steps call: what has been done, what was moved aside, and the `step k/n` progress lines."""

    def __init__(self, steps: list[Step], root: Path, configs: dict[str, DictConfig], cpu: bool = True):
        self.root, self.configs, self.cpu = root, configs, cpu
        self.status: dict[str, dict] = {}
        self.moved: list[str] = []
        self.n, self.t_start = len(steps), clock()
        self.position = {s.name: i + 1 for i, s in enumerate(_order(steps))}  # k of "step k/n": the order they run

    def where(self, step: Step) -> str:
        """`step k/n <name> (elapsed 0:03:12, n-k steps left)`."""
        left = self.n - self.position[step.name]
        return (f"step {self.position[step.name]}/{self.n} {step.name} "
                f"(elapsed {runtime.duration(clock() - self.t_start, hours=True)}, "
                f"{left} step{'' if left == 1 else 's'} left)")

    def plan(self, step: Step) -> tuple | None:
        """None when the step is done with the same fingerprint (skipped); else what to run, the old outputs of a
        changed step moved aside."""
        status = self.status
        step_cfg = self.configs[step.name]
        digest, content = fingerprint(step_cfg, [status[d]["fingerprint"] for d in step.deps])
        step_dir = self.root / step.name
        recorded = _read_record(step_dir)
        done = all((step_dir / o).exists() for o in step.outputs)
        if recorded and done and (recorded["fingerprint"] == digest or _legacy_same(recorded, step, status)):
            if recorded["fingerprint"] != digest and runtime.is_main():  # a record from before content hashes
                io.write_json(step_dir / FINGERPRINT, {**recorded, "fingerprint": digest, "content": content})
                log.info("step %-28s recorded before content fingerprints; same step overrides and unchanged "
                         "inputs: kept, its record upgraded", step.name)
            log.info("%s: skipped (done, fingerprint %s)", self.where(step), digest)
            status[step.name] = {"status": "skipped", "dir": str(step_dir), "fingerprint": digest}
            return None
        if recorded and recorded["fingerprint"] != digest:
            why = fp.changed_keys(recorded["content"], content) if "content" in recorded else \
                ["recorded before content fingerprints, with other step overrides or changed inputs"]
            stale = _stale_name(step_dir)
            step_dir.rename(stale)
            self.moved.append(f"{step.name} -> {stale.name} ({'; '.join(why[:6])}{' ...' if len(why) > 6 else ''})")
            log.info("step %-28s changed (%s): old outputs moved to %s", step.name, "; ".join(why[:6]), stale)
        return step, step_cfg, step_dir, digest, content

    def execute_one(self, execute, item: tuple) -> None:
        step, cfg, step_dir, digest, content = item
        log.info("%s: running in %s", self.where(step), step_dir)
        t0, cpu0, load0 = clock(), cpu_seconds(), load_average()
        try:
            with stop_on_signals():
                execute(step, cfg, step_dir)
        except (Interrupted, StopRequested) as e:
            log.warning("%s: interrupted", self.where(step))
            raise _interrupted(f"{step.name} ({self.position[step.name]}/{self.n})", e) from None
        cpu = cpu_seconds() - cpu0 if self.cpu else None
        self.status[step.name] = _finish(step, step_dir, digest, content, clock() - t0, cpu=cpu,
                                         load=load_record(load0))
        log.info("%s: finished in %s", self.where(step), runtime.duration(clock() - t0, hours=True))

    def execute_many(self, execute, todo: list[tuple]) -> None:
        """A wave's steps together: one job array (SLURM, submitit), or a pool of local workers (pipeline.workers),
        which reports each step as it ends (its own seconds and CPU seconds)."""
        for step, *_ in todo:
            log.info("%s: submitted", self.where(step))
        log.info("steps %s submitted together", ", ".join(t[0].name for t in todo))
        t0, load0 = clock(), load_average()
        by_name = {t[0].name: t for t in todo}

        def finished(name: str, seconds: float, cpu: float) -> None:
            step, _, step_dir, digest, content = by_name[name]
            self.status[name] = _finish(step, step_dir, digest, content, seconds, cpu=cpu if self.cpu else None,
                                        load=load_record(load0))
            log.info("%s: finished in %s", self.where(step), runtime.duration(seconds, hours=True))

        items = [(step, cfg, step_dir) for step, cfg, step_dir, *_ in todo]
        try:
            with stop_on_signals():
                if getattr(execute, "reports_each_step", False):
                    execute.run_many(items, finished=finished)
                else:
                    execute.run_many(items)
        except (Interrupted, StopRequested) as e:
            for step, _, step_dir, digest, content in todo:  # record what finished before the stop
                if step.name not in self.status and all((step_dir / o).exists() for o in step.outputs):
                    self.status[step.name] = _finish(step, step_dir, digest, content, clock() - t0,
                                                     load=load_record(load0))
            stopped = [f"{t[0].name} ({self.position[t[0].name]}/{self.n})" for t in todo if t[0].name not in self.status]
            for t in todo:
                if t[0].name not in self.status:
                    log.warning("%s: interrupted", self.where(t[0]))
            raise _interrupted(", ".join(stopped), e) from None
        for step, _, step_dir, digest, content in todo:  # a job array: no step's own seconds or CPU seconds
            if step.name not in self.status:
                self.status[step.name] = _finish(step, step_dir, digest, content, clock() - t0,
                                                 load=load_record(load0))
                log.info("%s: finished in %s", self.where(step), runtime.duration(clock() - t0, hours=True))


def _order(steps: list[Step]) -> list[Step]:
    """The steps in the order run_steps takes them: wave by wave, each wave in the order given."""
    done: set[str] = set()
    pending, order = list(steps), []
    while pending:
        wave = [s for s in pending if all(d in done for d in s.deps)]
        if not wave:  # a cycle: left for the engine to report; keep the given order
            return order + pending
        pending = [s for s in pending if s not in wave]
        order += wave
        done |= {s.name for s in wave}
    return order


def _interrupted(names: str, e: BaseException) -> Interrupted:
    """The pipeline's one line for a step stopped by a signal (e: the stage's Interrupted, or StopRequested)."""
    if isinstance(e, StopRequested):
        message, code = stopped_message(e.signum), _exit_code(e.signum)
    else:
        message, code = str(e), e.exit_code
    if message.startswith("pipeline"):
        return Interrupted(message, exit_code=code)
    return Interrupted(f"pipeline step {names} {message}", exit_code=code)


def _stale_name(step_dir: Path) -> Path:
    """`<name>.stale-<time>`, with a counter when a step changed twice within a second."""
    base = f"{step_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, k = step_dir.with_name(base), 1
    while candidate.exists():
        candidate, k = step_dir.with_name(f"{base}.{k}"), k + 1
    return candidate


def _check_deps(steps: list[Step]) -> None:
    names = {s.name for s in steps}
    for step in steps:
        unknown = [d for d in step.deps if d not in names]
        if unknown:
            raise ConfigError(f"pipeline step {step.name} depends on {unknown}, which no step defines")


def _legacy_same(recorded: dict, step: Step, status: dict[str, dict]) -> bool:
    """A record written before content fingerprints (no `content`) stands for this step when it was made with the
    same step overrides and none of its inputs was redone in this run. (Its hash cannot be recomputed: the typed
    configs render some values differently, e.g. lora.alpha 16 -> 16.0.)"""
    return ("content" not in recorded and recorded.get("overrides") == step.overrides
            and all(status[d]["status"] == "skipped" for d in step.deps))


def _finish(step: Step, step_dir: Path, digest: str, content: dict, seconds: float, *, cpu: float | None = None,
            load: dict | None = None) -> dict:
    missing = [o for o in step.outputs if not (step_dir / o).exists()]
    if missing:
        raise ConfigError(f"pipeline step {step.name} finished without its outputs {missing} in {step_dir}")
    cpu = None if cpu is None else round(cpu, 1)
    if runtime.is_main():
        io.write_json(step_dir / FINGERPRINT, {"fingerprint": digest, "deps": step.deps, "overrides": step.overrides,
                                               "seconds": round(seconds, 1), "cpu_seconds": cpu, "load": load,
                                               "content": content})
    return {"status": "done", "dir": str(step_dir), "fingerprint": digest, "seconds": round(seconds, 1),
            "cpu_seconds": cpu}


# ---- what a step cost, and the pipeline's end line ----------------------------------------------------------------

def cpu_seconds() -> float:
    """User+sys CPU seconds of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this system
        return None


def load_record(before: list[float] | None) -> dict:
    """The step record's `load`: the 1/5/15-minute load averages before and after the step, and the core count."""
    return {"before": before, "after": load_average(), "cores": os.cpu_count()}


def profile(status: dict[str, dict], seconds: float, top: int = 5) -> str:
    """The pipeline's end line: its wall time and its `top` slowest steps run in this call, each with its seconds
    and share of the wall time (CPU seconds where recorded)."""
    ran = sorted(((name, s) for name, s in status.items() if s.get("seconds") is not None),
                 key=lambda item: -item[1]["seconds"])
    head = f"pipeline finished in {runtime.duration(seconds, hours=True)} ({len(ran)} of {len(status)} steps run"
    if not ran:
        return head + "; every step was done already)"
    total = max(seconds, 1e-9)
    parts = []
    for name, s in ran[:top]:
        cpu = f", CPU {s['cpu_seconds']:.0f} s" if s.get("cpu_seconds") is not None else ""
        parts.append(f"{name} {s['seconds']:.1f} s ({100 * s['seconds'] / total:.0f}%{cpu})")
    return head + f"); slowest: {'; '.join(parts)}"


def run_in_process(step: Step, cfg: DictConfig, step_dir: Path) -> None:
    """The local executor: the stage runs in this process, with step_dir as its run dir."""
    from loragen.stages import run_stage

    with runtime.using_run_dir(step_dir):
        if runtime.is_main():
            io.write_text(step_dir / rundir.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        run_stage(cfg)


def _read_record(step_dir: Path) -> dict | None:
    """The step's fingerprint.json (None: the step never finished, or the record is unreadable)."""
    path = step_dir / FINGERPRINT
    if not path.is_file():
        return None
    try:
        record = io.read_json(path)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None
