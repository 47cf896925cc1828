"""Per-run plumbing shared by every stage: the run directory, ranks, logging, progress."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

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
    """Snapshot the resolved config into the run dir (main process only) and quiet other ranks."""
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


class ProgressBar:
    """In place on a terminal (tqdm); on a pipe or a SLURM log, one plain line every `every` percent."""

    def __init__(self, total: int, desc: str = "", every: int = 10, unit: str = "it"):
        self._total, self.desc, self.every, self.done = total, desc, every, 0
        self._next = every
        self._bar = None
        self._on = is_main()
        if self._on and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self._on:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        pct = 100 * self.done // max(self.total, 1)
        if pct >= self._next or self.done >= self.total:
            log.info("%s: %d/%d (%d%%)", self.desc, self.done, self.total, pct)
            self._next = (pct // self.every + 1) * self.every

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


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
