"""Per-run plumbing shared by every stage: the run directory, ranks, logging, progress."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from loragen import io, rundir

log = logging.getLogger(__name__)
T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)) or 0)


def is_main() -> bool:
    return rank() == 0


_shared_run_dir: Path | None = None


def run_dir() -> Path:
    """This run's output directory: Hydra's runtime output dir (honours `hydra.run.dir=`), rank 0's on every rank."""
    if _shared_run_dir is not None:
        return _shared_run_dir
    return Path(HydraConfig.get().runtime.output_dir)


@contextmanager
def using_run_dir(path: Path) -> Iterator[Path]:
    """Run a stage in-process with `path` as its run dir (pipeline steps), logging into path/loragen.log."""
    global _shared_run_dir
    previous = _shared_run_dir
    _shared_run_dir = Path(path)
    _shared_run_dir.mkdir(parents=True, exist_ok=True)
    handler = None
    if is_main():
        handler = logging.FileHandler(_shared_run_dir / rundir.LOG)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        handler.addFilter(OncePerMessage())
        logging.getLogger().addHandler(handler)
    try:
        yield _shared_run_dir
    finally:
        _shared_run_dir = previous
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def share_run_dir(accelerator) -> Path:
    """Make every process use rank 0's run dir (timestamps of `${now:}` can differ between ranks)."""
    global _shared_run_dir
    mine = run_dir()
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = Path(broadcast_object_list([str(mine)], from_process=0)[0])
        if shared != mine and not accelerator.is_main_process:
            import shutil

            if {p.name for p in mine.iterdir()} <= {".hydra", rundir.LOG}:
                shutil.rmtree(mine, ignore_errors=True)  # the stray dir Hydra made on this rank
        _shared_run_dir = shared
    return run_dir()


def start_run(cfg: DictConfig) -> Path:
    """Snapshot the resolved config into the run dir (main process only), quiet other ranks, and show each
    third-party warning once."""
    show_warnings_once()
    out = run_dir()
    if is_main():
        io.write_text(out / rundir.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    else:
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
        root.setLevel(logging.WARNING)
    return out


class OncePerMessage(logging.Filter):
    """Drop a third-party logger's WARNING this handler already showed (same logger, same text); loragen's own
    pass. One instance per handler: a record goes through every handler."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or record.name.split(".")[0] == "loragen":
            return True
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


_shown_warnings: set[tuple[type, str]] = set()


def _show_once(show):
    """`warnings.showwarning` that passes each (category, text) on to `show` only the first time."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key not in _shown_warnings:
            _shown_warnings.add(key)
            show(message, category, filename, lineno, file, line)

    showwarning.shows_once = True
    return showwarning


def show_warnings_once() -> None:
    """Third-party warnings are shown once per message: a Python warning (e.g. a transformers FutureWarning raised
    at every step: Python's own "once" is per module and forgotten whenever a library touches the warning
    filters) and a repeated WARNING of a third-party logger, whether it reaches the root handlers or, like
    transformers', has a handler of its own. `python -W ...` / PYTHONWARNINGS leave Python warnings as they are."""
    if not sys.warnoptions and not getattr(warnings.showwarning, "shows_once", False):
        warnings.showwarning = _show_once(warnings.showwarning)
    handlers = list(logging.getLogger().handlers)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] != "loragen":
            handlers += logger.handlers
    for h in handlers:
        if not any(isinstance(f, OncePerMessage) for f in h.filters):
            h.addFilter(OncePerMessage())


def duration(seconds: float, hours: bool = False) -> str:
    """1:02:03, or 2:03 under an hour (0:02:03 with `hours`)."""
    s = max(int(round(seconds)), 0)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h or hours else f"{m}:{s:02d}"


def rate(per_s: float, unit: str = "it") -> str:
    """2.10 it/s, or 3.50 s/it below one per second."""
    if per_s <= 0:
        return f"? {unit}/s"
    return f"{per_s:.2f} {unit}/s" if per_s >= 1 else f"{1 / per_s:.2f} s/{unit}"


PLAIN_PROGRESS = False  # plain lines even on a terminal (pipeline pool workers: their bars would overwrite each other)


class ProgressBar:
    """In place on a terminal (tqdm); on a pipe or a SLURM log, one plain line every `every` percent and at least
    every `interval_s` seconds while it moves:

        train: 30/100 (30%) loss 0.8120 lr 1.0e-04 2.10 it/s elapsed 0:14 ETA 0:33

    `update(n, loss=, lr=)`: the line's loss is the mean of the losses given since the previous line, its lr the
    last one. The rate and ETA count only this process's progress (`initial`: units already done, e.g. a
    resumed run's steps)."""

    def __init__(self, total: int, desc: str = "", every: int = 10, unit: str = "it", *, initial: int = 0,
                 interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._total, self.desc, self.every, self.unit = total, desc, every, unit
        self.initial = self.done = initial
        self.interval_s, self._clock = interval_s, clock
        self._t0 = self._t_line = clock()
        self._next = (100 * initial // max(total, 1) // every + 1) * every
        self._losses: list[float] = []
        self._lr: float | None = None
        self._bar = None
        self._on = is_main()
        if self._on and sys.stderr.isatty() and not PLAIN_PROGRESS:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, initial=initial)

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    def update(self, n: int = 1, *, loss: float | None = None, lr: float | None = None) -> None:
        self.done += n
        if loss is not None:
            self._losses.append(float(loss))
        if lr is not None:
            self._lr = float(lr)
        if not self._on:
            return
        if self._bar is not None:
            if self._losses or self._lr is not None:
                self._bar.set_postfix_str(self._metrics(), refresh=False)
            self._bar.update(n)
            if self._losses and 100 * self.done // max(self.total, 1) >= self._next:  # running mean per `every` %
                self._next = (100 * self.done // max(self.total, 1) // self.every + 1) * self.every
                self._losses = []
            return
        now = self._clock()
        pct = 100 * self.done // max(self.total, 1)
        if pct >= self._next or self.done >= self.total or now - self._t_line >= self.interval_s:
            log.info("%s", self.line(now))
            self._next = (pct // self.every + 1) * self.every
            self._t_line, self._losses = now, []

    def line(self, now: float | None = None) -> str:
        """The plain progress line as of `now` (the clock's time)."""
        now = self._clock() if now is None else now
        pct = 100 * self.done // max(self.total, 1)
        parts = [f"{self.desc}: {self.done}/{self.total} ({pct}%)"]
        metrics = self._metrics()
        if metrics:
            parts.append(metrics)
        elapsed = now - self._t0
        per_s = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        parts.append(f"{rate(per_s, self.unit)} elapsed {duration(elapsed)}")
        if self.done < self.total:
            parts.append(f"ETA {duration((self.total - self.done) / per_s)}" if per_s > 0 else "ETA ?")
        return " ".join(parts)

    def _metrics(self) -> str:
        out = []
        if self._losses:
            out.append(f"loss {sum(self._losses) / len(self._losses):.4f}")
        if self._lr is not None:
            out.append(f"lr {self._lr:.1e}")
        return " ".join(out)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(items: Iterable[T], total: int | None = None, desc: str = "", every: int = 10) -> Iterator[T]:
    """Iterate with a ProgressBar."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else 0)
    bar = ProgressBar(total, desc, every)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
