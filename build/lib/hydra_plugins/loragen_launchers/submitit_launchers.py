"""hydra-submitit-launcher's launchers with loragen's failure handling (see common.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from hydra_plugins.loragen_launchers.common import call_job, exit_with, finish

log = logging.getLogger(__name__)


class _Launcher(BaseSubmititLauncher):
    def __call__(self, *args: Any) -> JobReturn:
        return call_job(super().__call__, *args)

    def make_executor(self):
        """submitit's executor with this launcher's settings (also used by the pipeline executors)."""
        import submitit

        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in ("submitit_folder", "max_num_timeout")})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from loragen import jobs

        assert self.config is not None and len(job_overrides) > 0
        executor = self.make_executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        params = []
        for i, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(overrides))}")
            params.append((list(overrides), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
                           Singleton.get_state()))
        try:
            submitted = jobs.submit(executor, self, *zip(*params))
        except jobs.SubmissionError as e:
            exit_with(e)
        log.info("submitted jobs %s", ", ".join(j.job_id for j in submitted))
        return finish(jobs.wait(submitted), job_overrides, initial_job_idx, sweep_dir)


class SlurmLauncher(_Launcher):
    _EXECUTOR = "slurm"


class LocalLauncher(_Launcher):
    _EXECUTOR = "local"
