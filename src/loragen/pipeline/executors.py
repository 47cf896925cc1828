"""Pipeline executors that run each step as a submitit job: `submitit_local` (this machine) and `slurm`.

The job runs the step exactly as the in-process executor does (engine.run_in_process) in the step's
directory; the pipeline waits for it (a dependent step starts only after the steps it needs have
finished). `run_many` submits several independent steps as one job array. Job settings come from the
pipeline run's `hydra/launcher` (e.g. `hydra/launcher=slurm_a800`, the same preset sweeps use), so
one flag decides the partition, GPUs, tasks per node and time limit of every step:

    loragen stage=pipeline experiment=... pipeline.executor=slurm hydra/launcher=slurm_a800

A step job is checkpointable: on SLURM's timeout/preemption signal (SIGUSR2) the training loop saves its
state, the job is requeued (up to `max_num_timeout` times after timeouts) and resumes (train.resume=auto).
A step job stopped by SIGTERM/SIGINT (a training step saves its state first) ends with an "interrupted" result,
and the pipeline raises errors.Interrupted. SIGTERM or SIGINT to the pipeline process while it waits is passed on
to its step jobs as SIGTERM (they save and stop); a second one stops waiting at once. (Ctrl-C in a terminal also
reaches submitit's local job controller, which kills the step about a second later: stop a `submitit_local`
pipeline with `kill -TERM <pid>` to let a training step save.)
Submitit's logs are in <pipeline run dir>/.submitit/<job id>/.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from loragen import jobs
from loragen.errors import Interrupted
from loragen.pipeline.engine import STOP_SIGNALS, Step, StopRequested, run_in_process, stop_on_signals, stopped_message
from loragen.train.preemption import handling

log = logging.getLogger(__name__)
INTERRUPTED = "interrupted"  # the key of a step job's result when a signal stopped it
# hydra/launcher settings that do not apply to a pipeline step's job.
NOT_FOR_STEPS = {"_target_", "submitit_folder", "name", "array_parallelism", "devices", "gpus_per_job", "poll_s"}


class StepJob:
    """The submitit callable: one pipeline step in its own process (and every task of a multi-task job)."""

    def __call__(self, step: Step, cfg: DictConfig, step_dir: str) -> str | dict:
        """The step dir; or {"interrupted": message, "exit_code": 143|130} when SIGTERM/SIGINT stopped the step
        (SIGUSR2 stays submitit's: checkpoint and requeue)."""
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
        return run_guarded(step, cfg, step_dir)


LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def run_guarded(step: Step, cfg: DictConfig, step_dir: str) -> str | dict:
    """Run the step in this process (a job's or a pool worker's): the step dir, or the "interrupted" result."""
    from loragen.train.preemption import exit_code

    try:
        with stop_on_signals():  # over submitit's SIGTERM handler, which only logs
            run_in_process(step, cfg, Path(step_dir))
    except Interrupted as e:
        log.warning("step %s: %s", step.name, e)
        return {INTERRUPTED: str(e), "exit_code": e.exit_code}
    except StopRequested as e:
        log.warning("step %s: %s", step.name, stopped_message(e.signum))
        return {INTERRUPTED: stopped_message(e.signum), "exit_code": exit_code(e.signum)}
    return step_dir

    def checkpoint(self, *args: Any) -> Any:
        """On preemption/timeout: requeue the same step; training resumes from <step dir>/state."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


class SubmititExecutor:
    def __init__(self, cluster: str, params: dict | None = None, folder: Path | None = None):
        self.cluster = cluster  # "slurm" | "local"
        self.params = launcher_params(cluster) if params is None else dict(params)
        self.folder = folder

    def __call__(self, step: Step, cfg: DictConfig, step_dir: Path) -> None:
        self.run_many([(step, cfg, step_dir)])

    def run_many(self, items: Sequence[tuple[Step, DictConfig, Path]]) -> None:
        """Run independent steps as one job array and wait for all; raise JobsFailed naming each failure's log,
        or errors.Interrupted when a signal stopped steps (theirs, or one passed on from this process)."""
        folder = self.folder or _default_folder([d for _, _, d in items])
        executor = self.make_executor(folder, name=f"loragen-{items[0][0].name}" if len(items) == 1 else "loragen-steps")
        steps, cfgs, dirs = zip(*[(s, c, str(d)) for s, c, d in items])
        submitted = jobs.submit(executor, StepJob(), steps, cfgs, dirs)
        for (step, _, _), job in zip(items, submitted):
            log.info("step %-28s submitted as %s job %s", step.name, self.cluster, job.job_id)
        with passed_on(lambda: [terminate(job) for job in submitted],
                       ", ".join(str(j.job_id) for j in submitted)) as received:
            outcomes = jobs.wait(submitted)
        stopped = {s.name: o.result for s, o in zip(steps, outcomes)
                   if o.status == "completed" and isinstance(o.result, dict) and INTERRUPTED in o.result}
        if received:  # a job the signal ended without its "interrupted" result (killed, or stopped before it ran)
            stopped.update({s.name: {INTERRUPTED: stopped_message(received[0]), "exit_code": 128 + received[0]}
                            for s, o in zip(steps, outcomes) if o.status != "completed" and s.name not in stopped})
        failed = None
        try:
            jobs.summarise(outcomes, [s.name for s in steps], folder / "last_steps.json", what="pipeline step")
        except jobs.JobsFailed as e:
            failed = e
        if stopped:
            detail = "; ".join(f"{name} {r[INTERRUPTED]}" for name, r in stopped.items())
            raise Interrupted(f"pipeline step {detail}", exit_code=next(iter(stopped.values()))["exit_code"])
        if received:
            raise Interrupted(f"pipeline interrupted ({signal.Signals(received[0]).name}) as its step jobs finished; "
                              "finished steps are kept; rerun the same command to resume", exit_code=128 + received[0])
        if failed is not None:
            raise failed

    def make_executor(self, folder: Path, name: str):
        import submitit

        init: dict[str, Any] = {"folder": str(folder / "%j")}
        if "max_num_timeout" in self.params:
            init[f"{self.cluster}_max_num_timeout"] = int(self.params["max_num_timeout"])
        executor = submitit.AutoExecutor(cluster=self.cluster, **init)
        generic = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
                   "stderr_to_stdout"}
        settings = {k if k in generic else f"{self.cluster}_{k}": v for k, v in self.params.items()
                    if k not in NOT_FOR_STEPS | {"max_num_timeout"} and v is not None}
        if self.cluster == "local":  # the local executor knows only these
            settings = {k: v for k, v in settings.items() if k in {"timeout_min", "gpus_per_node", "tasks_per_node"}}
        executor.update_parameters(name=name, **settings)
        return executor


@contextlib.contextmanager
def passed_on(stop: Callable[[], Any], jobs_named: str) -> Iterator[list[int]]:
    """While waiting for step jobs (main thread only): the first SIGTERM/SIGINT calls `stop` (which sends them
    SIGTERM: a training step saves its state and stops) and waiting goes on; a second one stops waiting at once
    (StopRequested). Yields the list of signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            raise StopRequested(signum)
        log.warning("received %s: asking the step jobs %s to save and stop (again to stop waiting at once)",
                    signal.Signals(signum).name, jobs_named)
        stop()

    with handling(STOP_SIGNALS, handler):
        yield received


def terminate(job) -> None:
    """SIGTERM to a step job: the local job's controller passes it to its tasks; SLURM: scancel --signal=TERM."""
    try:
        process = getattr(job, "_process", None)
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        elif type(job).__name__ == "SlurmJob":
            subprocess.run(["scancel", "--signal=TERM", str(job.job_id)], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not signal job %s: %s", job.job_id, e)


def _default_folder(step_dirs: list[Path]) -> Path:
    """Job logs next to the steps: `<step dir>/.submitit/`, or under the steps' common parent for an array."""
    return Path(os.path.commonpath([str(d) for d in step_dirs])) / ".submitit"


def launcher_params(cluster: str) -> dict:
    """This run's hydra/launcher settings when they are submitit's for `cluster`; else submitit's defaults."""
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except ValueError:  # no Hydra app (library use, tests)
        return {}
    target = str(launcher.get("_target_", ""))
    wanted = "SlurmLauncher" if cluster == "slurm" else ("LocalLauncher", "NodePoolLauncher")
    if not target.endswith(wanted):
        log.info("pipeline.executor=%s with hydra/launcher=%s: submitit's default job settings (for SLURM pick "
                 "a preset, e.g. hydra/launcher=slurm_a800)", "slurm" if cluster == "slurm" else "submitit_local",
                 target.rsplit(".", 1)[-1])
        return {}
    return {k: v for k, v in OmegaConf.to_container(launcher, resolve=False).items() if k not in NOT_FOR_STEPS}


def slurm(step: Step, cfg: DictConfig, step_dir: Path) -> None:
    SubmititExecutor("slurm")(step, cfg, step_dir)


def submitit_local(step: Step, cfg: DictConfig, step_dir: Path) -> None:
    SubmititExecutor("local")(step, cfg, step_dir)


slurm.run_many = lambda items: SubmititExecutor("slurm").run_many(items)  # type: ignore[attr-defined]
submitit_local.run_many = lambda items: SubmititExecutor("local").run_many(items)  # type: ignore[attr-defined]
