"""Pipeline executors that run each step as a submitit job: `submitit_local` (this machine) and `slurm`.

The job runs the step exactly as the in-process executor does (engine.run_in_process) in the step's
directory; the pipeline waits for it (a dependent step starts only after the steps it needs have
finished). `run_many` submits several independent steps as one job array. Job settings come from the
pipeline run's `hydra/launcher` (e.g. `hydra/launcher=slurm_a800`, the same preset sweeps use), so
one flag decides the partition, GPUs, tasks per node and time limit of every step:

    loragen stage=pipeline experiment=... pipeline.executor=slurm hydra/launcher=slurm_a800

A step job is checkpointable: on SLURM's timeout/preemption signal the training loop saves its state,
the job is requeued (up to `max_num_timeout` times after timeouts) and resumes (train.resume=auto).
Submitit's logs are in <pipeline run dir>/.submitit/<job id>/.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from loragen import jobs
from loragen.pipeline.engine import Step, run_in_process

log = logging.getLogger(__name__)
# hydra/launcher settings that do not apply to a pipeline step's job.
NOT_FOR_STEPS = {"_target_", "submitit_folder", "name", "array_parallelism", "devices", "gpus_per_job", "poll_s"}


class StepJob:
    """The submitit callable: one pipeline step in its own process (and every task of a multi-task job)."""

    def __call__(self, step: Step, cfg: DictConfig, step_dir: str) -> str:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                            force=True)
        run_in_process(step, cfg, Path(step_dir))
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
        """Run independent steps as one job array and wait for all; raise JobsFailed naming each failure's log."""
        folder = self.folder or _default_folder([d for _, _, d in items])
        executor = self.make_executor(folder, name=f"loragen-{items[0][0].name}" if len(items) == 1 else "loragen-steps")
        steps, cfgs, dirs = zip(*[(s, c, str(d)) for s, c, d in items])
        submitted = jobs.submit(executor, StepJob(), steps, cfgs, dirs)
        for (step, _, _), job in zip(items, submitted):
            log.info("step %-28s submitted as %s job %s", step.name, self.cluster, job.job_id)
        outcomes = jobs.wait(submitted)
        jobs.summarise(outcomes, [s.name for s in steps], folder / "last_steps.json", what="pipeline step")

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
