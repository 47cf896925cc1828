"""Trajectory checkpoints: `checkpoints/step-000123/` every `every` optimizer steps after `start_step`,
listed in `checkpoints/manifest.json` with each step's loss and eval metrics.

Only adapters (or whatever `save_fn` writes) go here, never optimizer state: the resumable state
lives in `state/` (see train.state). `keep_last` prunes these trajectory checkpoints only.

Saving must not dominate step time at `every=1`, so `save_fn(path)` may return a deferred write: a
callable that captured what it writes (e.g. a CPU copy of the adapter tensors, lora.snapshot) and that
one background writer thread runs, in step order, while training goes on. A `save_fn` returning
anything but a callable wrote synchronously (then the manifest is written at once too). The writer
also appends each checkpoint to `manifest.jsonl` (a log: pruned ones stay listed) and deletes pruned
dirs after the newer one is written; `manifest.json` (the checkpoints on disk, its schema unchanged)
is rewritten by `flush()`, which waits for the writer and raises its error if a write failed. The
training loop flushes before every full-state save (a resumed run sees every checkpoint up to its state
step), before naming the last good checkpoint, and at the end (`close()`, also on preemption).

BestCheckpoint keeps the adapter with the best validation metric (`ckpt.best_metric`) seen at the
periodic evaluations as `<run dir>/best/` (replaced atomically) and `best.json` (step, metric, value).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import threading
from pathlib import Path
from typing import Callable

from loragen import io, rundir
from loragen.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d{6,})$")
Write = Callable[[], None]
SaveFn = Callable[[Path], object]  # writes `path` now, or returns the deferred write (a Write)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


class Checkpointer:
    """Decides which steps are saved, writes them through `save_fn(path)`, keeps the manifest (rank 0 only).

    Use it as a context manager (or call `close()`) so that deferred writes are finished and manifest.json
    is written; `fit` does.
    """

    def __init__(self, root: str | Path, save_fn: SaveFn, *, every: int, start_step: int = 0,
                 keep_last: int | None = None, is_main: bool = True, max_pending: int = 4):
        if every < 0 or start_step < 0 or (keep_last is not None and keep_last < 1):
            raise ConfigError(f"ckpt.every={every}, ckpt.start_step={start_step}, ckpt.keep_last={keep_last}: "
                              "expected every >= 0 (0 = off), start_step >= 0, keep_last >= 1 or null")
        self.root, self.save_fn = Path(root), save_fn
        self.every, self.start_step, self.keep_last, self.is_main = every, start_step, keep_last, is_main
        self.manifest_path = self.root / rundir.MANIFEST
        self.log_path = self.root / rundir.MANIFEST_LOG
        self.entries: list[dict] = []  # the checkpoints saved (all written once flush() returns)
        self._writer = BackgroundWriter(max_pending)
        self._dirty = False  # entries changed since manifest.json was written

    def due(self, step: int) -> bool:
        return self.every > 0 and step > self.start_step and (step - self.start_step) % self.every == 0

    def resume_at(self, step: int) -> None:
        """Keep the checkpoints up to `step` that are on disk (later ones are redone by the resumed run)."""
        self.flush()
        self.entries = [e for e in self._read_saved() if e["step"] <= step and (self.root / e["path"]).is_dir()]
        if self.is_main and (self.log_path.is_file() or self.manifest_path.is_file()):
            io.write_jsonl(self.log_path, self.entries)
            io.write_json(self.manifest_path, {"checkpoints": self.entries})

    @property
    def last(self) -> Path | None:
        """The last checkpoint saved; on disk once flush() has returned."""
        return self.root / self.entries[-1]["path"] if self.entries else None

    def save(self, step: int, metrics: dict) -> Path:
        path = self.root / step_dir_name(step)
        if not self.is_main:
            return path
        self._writer.raise_error()
        write = _deferred(self.save_fn(path))
        entry = {"step": step, "path": path.name, **metrics}
        self.entries = [e for e in self.entries if e["step"] != step] + [entry]
        drop = []
        if self.keep_last is not None:
            drop, self.entries = self.entries[:-self.keep_last], self.entries[-self.keep_last:]
        self._dirty = True

        def commit() -> None:
            if write is not None:
                write()
            self._append_log(entry)
            for e in drop:  # written before this one (the writer keeps step order)
                shutil.rmtree(self.root / e["path"], ignore_errors=True)

        if write is None:  # a synchronous save_fn: keep everything synchronous
            commit()
            self.flush()
        else:
            self._writer.submit(commit, what=str(path))
        return path

    def flush(self) -> None:
        """Wait for the pending writes (raising the first one that failed), then write manifest.json."""
        if not self.is_main:
            return
        try:
            self._writer.drain()
        finally:
            if self._writer.failed:  # list only what was written before the failure
                self.entries = [e for e in self.entries if (self.root / e["path"]).is_dir()]
            if self._dirty or self._writer.failed:
                io.write_json(self.manifest_path, {"checkpoints": self.entries})
                self._dirty = False

    def close(self) -> None:
        self.flush()
        self._writer.stop()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # finish what was saved, but let the exception that is propagating win
            self.close()
        except Exception as e:  # noqa: BLE001
            log.error("while stopping on %s: %s", exc_type.__name__, e)
            self._writer.stop()

    def _append_log(self, entry: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    def _read_saved(self) -> list[dict]:
        """The entries of manifest.jsonl (a later line for a step replaces an earlier one), else of manifest.json."""
        if not self.log_path.is_file():
            return io.read_json(self.manifest_path)["checkpoints"] if self.manifest_path.is_file() else []
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        by_step: dict[int, dict] = {}
        for n, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                by_step[int(entry["step"])] = entry
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                if n == len(lines):  # a write cut short by a crash: that checkpoint is redone
                    log.warning("%s:%d: ignoring an incomplete last line", self.log_path, n)
                    break
                raise CheckpointError(f"{self.log_path}:{n}: not a checkpoint entry ({e}); "
                                      "expected a JSON object with step and path") from None
        return [by_step[s] for s in sorted(by_step)]


def _deferred(result: object) -> Write | None:
    """What a save_fn returned: a deferred write (callable), or anything else once it has written."""
    return result if callable(result) else None


class BackgroundWriter:
    """One daemon thread running submitted writes in order; at most `max_pending` wait (then submit blocks).

    After a write fails, later ones are skipped (`failed`) and the error is raised once on the submitting
    thread, by the next submit(), drain() or raise_error().
    """

    def __init__(self, max_pending: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_pending)))
        self._thread: threading.Thread | None = None
        self._error: tuple[str, BaseException] | None = None  # not raised yet
        self.failed = False

    def submit(self, write: Write, what: str) -> None:
        self.raise_error()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._queue.put((write, what))

    def drain(self) -> None:
        if self._thread is not None:
            self._queue.join()
        self.raise_error()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def raise_error(self) -> None:
        if self._error is None:
            return
        (what, e), self._error = self._error, None
        if isinstance(e, OSError):
            raise CheckpointError(f"writing checkpoint {what} failed: {e}") from e
        raise e

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if not self.failed:
                    write, what = job
                    try:
                        write()
                    except BaseException as e:  # noqa: BLE001 - raised on the training thread
                        self._error, self.failed = (what, e), True
            finally:
                self._queue.task_done()


# metric -> better direction; any other name needs ckpt.best_mode
MAXIMIZE = ("acc", "acc_norm", "bleu", "rouge_l", "exact_match", "embed_sim", "success_rate")
MINIMIZE = ("loss",)
ALIASES = {"rougeL": "rouge_l", "rouge-l": "rouge_l", "em": "exact_match"}
MODES = ("max", "min")


class BestCheckpoint:
    """Saves through `save_fn(root / rundir.BEST)` whenever the evaluation metric `metric` improves (rank 0 writes).

    `metric` names an evaluation metric with or without its "eval_" prefix (loss: the validation loss,
    eval_loss; bleu: eval_bleu; acc: eval_acc ...). `mode` max | min, or None to derive it from the name.
    Ties keep the earlier checkpoint.
    """

    def __init__(self, root: str | Path, save_fn: SaveFn, *, metric: str, mode: str | None = None,
                 is_main: bool = True):
        name = metric[len("eval_"):] if metric.startswith("eval_") else metric
        name = ALIASES.get(name, name)
        if mode is None:
            if name not in MAXIMIZE + MINIMIZE:
                raise ConfigError(f"ckpt.best_metric={metric!r}: no known direction; set ckpt.best_mode=max|min "
                                  f"(known: {', '.join(MAXIMIZE + MINIMIZE)})")
            mode = "max" if name in MAXIMIZE else "min"
        if mode not in MODES:
            raise ConfigError(f"ckpt.best_mode={mode!r}; expected max, min or null (derived from the metric)")
        self.root, self.save_fn, self.is_main = Path(root), save_fn, is_main
        self.metric, self.key, self.mode = name, f"eval_{name}", mode
        self.dir, self.record_path = self.root / rundir.BEST, self.root / rundir.BEST_RECORD
        self.record: dict | None = None  # {"step", "metric", "value", "mode"}

    def better(self, value: float) -> bool:
        if value != value:  # NaN never wins
            return False
        if self.record is None:
            return True
        best = self.record["value"]
        return value > best if self.mode == "max" else value < best

    def update(self, step: int, metrics: dict) -> bool:
        """Called after each evaluation with its metrics; saves and returns True when `metric` improved."""
        if self.key not in metrics:
            have = sorted(k for k in metrics if k.startswith("eval_"))
            raise ConfigError(f"ckpt.best_metric={self.metric!r}: the evaluation at step {step} reported no "
                              f"{self.key}; it reported {have or 'nothing'}")
        value = float(metrics[self.key])
        if not self.better(value):
            return False
        self.record = {"step": int(step), "metric": self.metric, "value": value, "mode": self.mode}
        if self.is_main:
            write = _deferred(self.save_fn(self.dir))
            if write is not None:  # best/ is rare: write it now
                write()
            io.write_json(self.record_path, self.record)
        return True

    def resume_at(self, step: int) -> None:
        """Keep best.json when it was written at or before `step` (a later one is redone by the resumed run)."""
        self.record = None
        if self.record_path.is_file():
            saved = io.read_json(self.record_path)
            if saved.get("metric") == self.metric and saved.get("mode") == self.mode and saved["step"] <= step:
                self.record = saved


def list_checkpoints(root: str | Path) -> list[Path]:
    """Trajectory checkpoint dirs under `root`, in step order."""
    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))
