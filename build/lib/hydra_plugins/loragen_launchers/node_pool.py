"""hydra/launcher=node_pool: a sweep's jobs in parallel on one machine, each pinned to its own GPU(s).

The machine's devices (`devices`, e.g. [0,1,2,3]) are cut into slots of `gpus_per_job`; each job runs
as a submitit local job with CUDA_VISIBLE_DEVICES set to its slot, as many at once as there are slots,
the rest queued until a slot frees. A job's failure is recorded (the sweep summary names its log) and
the others go on. On a CPU machine a fake device list tests the scheduling.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides

from hydra_plugins.loragen_launchers.submitit_launchers import LocalLauncher

log = logging.getLogger(__name__)


def slots(devices: Sequence[int], gpus_per_job: int) -> list[tuple[int, ...]]:
    from loragen.errors import ConfigError

    devices = list(devices)
    if gpus_per_job < 1 or len(devices) < gpus_per_job:
        raise ConfigError(f"hydra.launcher.devices={devices} with gpus_per_job={gpus_per_job}: need at least "
                          f"{max(gpus_per_job, 1)} device(s) per job (e.g. hydra.launcher.devices=[0,1,2,3])")
    if len(set(devices)) != len(devices) or not all(isinstance(d, int) and d >= 0 for d in devices):
        raise ConfigError(f"hydra.launcher.devices={devices}: expected distinct GPU indices (non-negative integers)")
    n = len(devices) // gpus_per_job
    return [tuple(devices[i * gpus_per_job:(i + 1) * gpus_per_job]) for i in range(n)]


class NodePoolLauncher(LocalLauncher):
    def __init__(self, devices: Sequence[int] = (), gpus_per_job: int = 1, poll_s: float = 0.5, **params: Any) -> None:
        super().__init__(**params)
        self.devices, self.gpus_per_job, self.poll_s = list(devices), int(gpus_per_job), float(poll_s)

    def __call__(self, *args: Any) -> JobReturn:
        # One line in the job's log: where it ran (the sweep summary points at this log).
        print(f"node_pool: job #{args[2]} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')} "
              f"start={time.time():.3f}", file=sys.stderr, flush=True)
        try:
            return super().__call__(*args)
        finally:
            print(f"node_pool: job #{args[2]} end={time.time():.3f}", file=sys.stderr, flush=True)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from loragen import jobs

        assert self.config is not None and len(job_overrides) > 0
        free = slots(self.devices, self.gpus_per_job)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("node_pool: %d job(s), %d slot(s) of GPUs %s; sweep output dir: %s", len(job_overrides), len(free),
                 free, sweep_dir)
        queue = list(enumerate(job_overrides))
        running: dict[int, tuple[Any, tuple[int, ...]]] = {}
        outcomes: dict[int, jobs.Outcome] = {}
        while queue or running:
            while queue and free:
                i, overrides = queue.pop(0)
                slot = free.pop(0)
                running[i] = (self._start(i + initial_job_idx, overrides, slot), slot)
            for i, (job, slot) in list(running.items()):
                if job.done():
                    (outcome,) = jobs.wait([job])
                    outcome.index = i
                    outcomes[i] = outcome
                    free.append(slot)
                    del running[i]
                    log.info("node_pool: job #%d %s on GPUs %s (%s)", i + initial_job_idx, outcome.status, slot,
                             outcome.log)
            if running:
                time.sleep(self.poll_s)
        return_list = [outcomes[i] for i in range(len(job_overrides))]
        from hydra_plugins.loragen_launchers.common import finish

        return finish(return_list, job_overrides, initial_job_idx, sweep_dir)

    def _start(self, num: int, overrides: Sequence[str], slot: tuple[int, ...]):
        import submitit

        from loragen import jobs

        executor = submitit.LocalExecutor(folder=self.params["submitit_folder"],
                                          max_num_timeout=int(self.params.get("max_num_timeout", 0)))
        executor.update_parameters(timeout_min=int(self.params["timeout_min"]),
                                   tasks_per_node=int(self.params["tasks_per_node"]),
                                   visible_gpus=slot, gpus_per_node=len(slot))
        log.info("node_pool: #%d on GPUs %s: %s", num, slot, " ".join(filter_overrides(overrides)))
        (job,) = jobs.submit(executor, self, [list(overrides)], ["hydra.sweep.dir"], [num], [f"job_id_for_{num}"],
                             [Singleton.get_state()])
        return job
