"""Submitit jobs seen from the submitting side: submit with clear errors, wait, summarise.

Shared by the sweep launchers (hydra_plugins.loragen_launchers) and the pipeline executors.
Waiting does not rely on `sacct` (clusters without an accounting database, like the local
test cluster, have none): a job is done when its result files exist, or when SLURM reports it in
a final state (squeue, then scontrol) without them, which is a failure (killed, timed out, OOM).
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from loragen import io
from loragen.errors import LoragenError

log = logging.getLogger(__name__)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
GRACE_S = 10.0  # a finished job's result file may appear a little after SLURM says it ended


class SubmissionError(LoragenError):
    """sbatch (or the local executor) refused the job."""


class JobsFailed(LoragenError):
    """One or more jobs of a sweep or a pipeline step failed."""


@dataclass
class Outcome:
    index: int
    job_id: str
    status: str          # completed | failed
    result: Any = None   # the callable's return value (task 0) when completed
    error: str = ""      # one line: why it failed
    log: str = ""        # where to look (stderr of task 0, stdout when merged)


def submit(executor, fn: Callable, *arg_lists: Sequence) -> list:
    """executor.map_array(fn, *arg_lists) (one job array), turning a refused submission into SubmissionError."""
    try:
        return executor.map_array(fn, *arg_lists)
    except Exception as e:  # noqa: BLE001 - submitit raises plain RuntimeErrors with sbatch's output inside
        raise submission_error(e, Path(str(executor.folder))) from None


def submission_error(e: Exception, folder: Path) -> SubmissionError:
    text = str(e)
    script = _submission_script(text, folder)
    stderr = text.split("Error stream produced:", 1)[-1] if "Error stream produced:" in text else text
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    message = " | ".join(lines[-3:]) or type(e).__name__
    return SubmissionError(f"job submission failed: {message}; the generated script: {script or 'not written'}")


def _submission_script(text: str, folder: Path) -> str | None:
    match = re.search(r"(\S*submission_file_\w+\.sh)", text)
    if match:
        return match.group(1)
    base = folder.parent if "%" in folder.name else folder
    scripts = sorted(base.glob("*submission_file_*.sh"), key=lambda p: p.stat().st_mtime)
    return str(scripts[-1]) if scripts else None


def wait(jobs: Sequence, poll_s: float = 1.0, squeue_every_s: float = 5.0) -> list[Outcome]:
    """Wait for every job; return one Outcome per job, failures included (never raises for a job's failure)."""
    pending = dict(enumerate(jobs))
    outcomes: dict[int, Outcome] = {}
    ended_at: dict[int, float] = {}
    last_squeue = 0.0
    while pending:
        for i, job in list(pending.items()):
            if finished(job):
                outcomes[i] = _collect(i, job)
                del pending[i]
        if pending and _is_slurm(next(iter(pending.values()))) and time.time() - last_squeue >= squeue_every_s:
            last_squeue = time.time()
            states = slurm_states([j.job_id for j in pending.values()])
            for i, job in list(pending.items()):
                state = states.get(job.job_id, "")
                if state in FINAL_STATES:
                    ended_at.setdefault(i, time.time())
                    if time.time() - ended_at[i] > GRACE_S and not finished(job):
                        outcomes[i] = Outcome(i, job.job_id, "failed", error=f"SLURM state {state} and no result",
                                              log=_log_path(job))
                        del pending[i]
        if pending:
            time.sleep(poll_s)
    return [outcomes[i] for i in range(len(jobs))]


def finished(job) -> bool:
    """Every task wrote its result file (for SLURM jobs this never calls sacct, unlike job.done())."""
    if not _is_slurm(job):
        return job.done()
    return all(Path(sub.paths.result_pickle).exists() for sub in (job._sub_jobs or [job]))


def _collect(i: int, job) -> Outcome:
    try:
        result = job.results()[0]
    except Exception as e:  # noqa: BLE001 - submitit's FailedJobError/UncompletedJobError carry the trace
        return Outcome(i, job.job_id, "failed", error=last_error_line(job, e), log=_log_path(job))
    return Outcome(i, job.job_id, "completed", result=result, log=_log_path(job))


def last_error_line(job, e: Exception) -> str:
    """The most telling line: loragen's own `error:` line from the job's stderr, else the exception's last line."""
    for path in (job.paths.stderr, job.paths.stdout):
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        ours = [ln for ln in lines if "loragen: error:" in ln]
        if ours:
            return ours[-1].split("loragen: error:", 1)[1].strip()
    text = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    traced = [ln for ln in text if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln)]
    return (traced or text or [type(e).__name__])[-1]


def _log_path(job) -> str:
    err = Path(job.paths.stderr)
    return str(err if err.exists() and err.stat().st_size else job.paths.stdout)


def _is_slurm(job) -> bool:
    return type(job).__name__ == "SlurmJob"


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """{job id: SLURM state} from squeue (all states); ids squeue no longer knows are left out."""
    ids = ",".join(sorted(set(job_ids)))
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ids, "-o", "%i|%T"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        states[jid.strip()] = state.strip().split()[0] if state.strip() else ""
    return states


def summarise(outcomes: Sequence[Outcome], labels: Sequence[str], path: Path, what: str = "sweep") -> None:
    """Write {path} (json) and log one line per job; raise JobsFailed naming each failed job's log."""
    rows = [{"job": labels[o.index], "job_id": o.job_id, "status": o.status, "error": o.error or None, "log": o.log}
            for o in outcomes]
    io.write_json(path, {"jobs": rows})
    failed = [r for r in rows if r["status"] != "completed"]
    log.info("%s: %d of %d jobs completed; summary in %s", what, len(rows) - len(failed), len(rows), path)
    if failed:
        detail = "; ".join(f"{r['job']} (job {r['job_id']}): {r['error']} (log: {r['log']})" for r in failed)
        raise JobsFailed(f"{len(failed)} of {len(rows)} {what} jobs failed: {detail}. Summary: {path}")
