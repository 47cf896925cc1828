"""What every loragen launcher does around submitit: run the Hydra job, wait, summarise."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, filter_overrides

log = logging.getLogger(__name__)
SUMMARY = "sweep_summary.json"


class JobExited(RuntimeError):
    """The job's task function called sys.exit with a non-zero status (loragen does on a LoragenError)."""


def call_job(parent_call, *args: Any) -> JobReturn:
    """Run one Hydra job inside a submitit task; a non-zero sys.exit becomes an exception submitit records."""
    try:
        return parent_call(*args)
    except SystemExit as e:
        if e.code in (None, 0, -1):  # -1: submitit's exit after requeueing a preempted/timed-out job
            raise
        raise JobExited(f"the job exited with status {e.code}") from None


def finish(outcomes, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, sweep_dir: Path) -> list[JobReturn]:
    """Turn submitit outcomes into Hydra JobReturns, write the sweep summary, raise if any job failed."""
    from loragen import jobs

    returns = []
    for o in outcomes:
        ret = o.result
        if o.status == "completed" and isinstance(ret, JobReturn) and ret.status == JobStatus.FAILED:
            o.status, o.error = "failed", f"{type(ret._return_value).__name__}: {ret._return_value}"
        returns.append(ret)
    labels = [f"#{initial_job_idx + o.index} {' '.join(filter_overrides(job_overrides[o.index]))}".strip()
              for o in outcomes]
    try:
        jobs.summarise(outcomes, labels, sweep_dir / SUMMARY, what="sweep")
    except jobs.JobsFailed as e:
        exit_with(e)
    return returns


def exit_with(e: Exception) -> None:
    """The CLI's way of reporting a user-facing error: one line on stderr, exit status 2."""
    log.error("%s", e)
    print(f"loragen: error: {e}", file=sys.stderr)
    sys.exit(2)
