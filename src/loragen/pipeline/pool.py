"""pipeline.workers > 1 with the local executor: a wave's independent steps run that many at a time, each in a
worker process with an equal share of this process's torch threads.

Why: on a CPU, several processes on fewer threads each get more done than one process on every thread. A MiniLM
LoRA step of the demo took 0.62-0.69 s on one thread with another run beside it, against 0.40 s alone on two
threads: 1.23x the throughput on 2 cores (small ops and Python between them use one core; OpenMP's hand-offs cost).
The workers start once (spawned: a fresh interpreter, no forked OpenMP state) and serve every wave of the run. A
wave of one step runs in this process on every thread, as with workers=1.

Numbers: a step on fewer threads adds some products in another order (oneDNN splits long reductions, such as a
LoRA factor's gradient over the batch's tokens, across threads), so its floats can differ by rounding from the
same step with workers=1, as they differ between machines with different core counts.

Logs: each worker's lines go to the console and to the pipeline's log, tagged with the step's name, and to the
step's own loragen.log; progress comes as plain lines (two in-place bars would overwrite each other).

Signals: the workers have their own process group, so a terminal's Ctrl-C reaches only the pipeline process. The
first SIGTERM/SIGINT is passed on to the running steps as SIGTERM (a training step saves its state and stops; steps
not started are dropped) and the pipeline waits for them; a second one stops waiting at once and ends the workers.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import resource
import signal
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from loragen import runtime
from loragen.errors import Interrupted, LoragenError
from loragen.pipeline.engine import Step, run_in_process
from loragen.pipeline.executors import INTERRUPTED, LOG_FORMAT, passed_on, run_guarded

log = logging.getLogger(__name__)
Finished = Callable[[str, float, float], None]  # (step name, wall seconds, CPU seconds of its worker)


class LocalPool:
    """The local executor with `workers` processes for waves of several steps (see the module docstring).

    Use it as a context manager: the workers start at the first wave of several steps and stop at the end."""

    reports_each_step = True  # run_many calls `finished` as each step ends (engine.execute_many records it then)

    def __init__(self, workers: int, log_file: Path | None = None, threads: int | None = None):
        import torch

        self.workers = workers
        self.threads = threads or max(1, torch.get_num_threads() // workers)
        self.log_file = log_file
        self._pool: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        self.close(kill=kind is not None)

    def __call__(self, step: Step, cfg: DictConfig, step_dir: Path) -> None:
        """A wave of one step: in this process, on every thread."""
        run_in_process(step, cfg, step_dir)

    def run_many(self, items: Sequence[tuple[Step, DictConfig, Path]], finished: Finished | None = None) -> None:
        """Run independent steps `workers` at a time; `finished(name, seconds, cpu_seconds)` as each one ends.

        Every step runs even when another fails (they are independent; what finished is kept for the next run).
        Raises the failure when one step failed, a LoragenError naming each when several did, or errors.Interrupted
        when a signal stopped steps."""
        pool = self._start()
        futures = {pool.submit(_work, step, cfg, str(step_dir)): step for step, cfg, step_dir in items}
        failures: dict[str, BaseException] = {}
        stopped: dict[str, dict] = {}

        def stop() -> None:
            for future in futures:
                future.cancel()  # not started yet: dropped
            self.signal_workers(signal.SIGTERM)

        with passed_on(stop, f"in worker processes {', '.join(map(str, self.pids()))}") as received:
            for future in cf.as_completed(futures):
                step = futures[future]
                if future.cancelled():
                    continue
                try:
                    out = future.result()
                except BrokenProcessPool:
                    failures[step.name] = LoragenError(
                        f"pipeline step {step.name}: its worker process died (killed, e.g. out of memory?); rerun the "
                        "same command to resume")
                    continue
                except BaseException as e:  # noqa: BLE001 - the step's own error, re-raised below
                    failures[step.name] = e
                    continue
                if isinstance(out["result"], dict) and INTERRUPTED in out["result"]:
                    stopped[step.name] = out["result"]
                    continue
                log.info("step %s finished in worker %d (%s, CPU %.0f s)", step.name, out["pid"],
                         runtime.duration(out["seconds"], hours=True), out["cpu_seconds"])
                if finished is not None:
                    finished(step.name, out["seconds"], out["cpu_seconds"])
        if stopped:
            detail = "; ".join(f"{n} {r[INTERRUPTED]}" for n, r in stopped.items())
            raise Interrupted(f"pipeline step {detail}", exit_code=next(iter(stopped.values()))["exit_code"])
        if received:  # the running steps finished before the signal reached them; the rest never started
            dropped = [s.name for f, s in futures.items() if f.cancelled()]
            raise Interrupted(f"pipeline interrupted ({signal.Signals(received[0]).name}) as its steps finished"
                              f"{'; not started: ' + ', '.join(dropped) if dropped else ''}; finished steps are kept; "
                              "rerun the same command to resume", exit_code=128 + received[0])
        if len(failures) == 1:
            raise next(iter(failures.values()))
        if failures:
            raise LoragenError(f"{len(failures)} of {len(items)} pipeline steps failed (the others finished and are "
                               "kept):\n" + "\n".join(f"  {name}: {e}" for name, e in failures.items()))

    def pids(self) -> list[int]:
        return sorted(getattr(self._pool, "_processes", None) or {}) if self._pool is not None else []

    def signal_workers(self, signum: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def close(self, kill: bool = False) -> None:
        """Stop the workers (at once with `kill`: the pipeline is ending on an error or a second signal)."""
        if self._pool is None:
            return
        if kill:
            self.signal_workers(signal.SIGKILL)
        self._pool.shutdown(wait=not kill, cancel_futures=True)
        self._pool = None

    def _start(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            log.info("pipeline.workers=%d: independent steps run %d at a time, each in a worker process with %d "
                     "torch thread%s", self.workers, self.workers, self.threads, "" if self.threads == 1 else "s")
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(self.threads, self.log_file))
        return self._pool


# ---- in the worker process ----------------------------------------------------------------------------------------

_step_name = "-"


class _StepTag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.step = _step_name
        return True


def _init_worker(threads: int, log_file: Path | None) -> None:
    import torch

    os.setpgrp()  # a terminal's Ctrl-C goes to the pipeline process only, which passes it on once
    for s in (signal.SIGTERM, signal.SIGINT):  # between steps a stray signal must not end the worker
        signal.signal(s, lambda signum, frame: None)
    torch.set_num_threads(threads)
    runtime.PLAIN_PROGRESS = True
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]  # where the pipeline's console log goes
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT.replace("[%(name)s]", "[%(step)s][%(name)s]")))
        handler.addFilter(_StepTag())
        root.addHandler(handler)


def _work(step: Step, cfg: DictConfig, step_dir: str) -> dict:
    global _step_name
    _step_name = step.name
    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    try:
        result = run_guarded(step, cfg, step_dir)
    finally:
        _step_name = "-"
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"result": result, "seconds": time.monotonic() - t0, "cpu_seconds": cpu, "pid": os.getpid()}
