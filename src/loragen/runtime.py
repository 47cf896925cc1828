"""Per-run plumbing shared by every stage: the run directory, ranks, logging, progress."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from loragen import io

log = logging.getLogger(__name__)
T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)) or 0)


def is_main() -> bool:
    return rank() == 0


def run_dir() -> Path:
    """This run's output directory: Hydra's runtime output dir (honours `hydra.run.dir=`)."""
    return Path(HydraConfig.get().runtime.output_dir)


def start_run(cfg: DictConfig) -> Path:
    """Snapshot the resolved config into the run dir (main process only) and quiet other ranks."""
    out = run_dir()
    if is_main():
        io.write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    else:
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
        root.setLevel(logging.WARNING)
    return out


def progress(items: Iterable[T], total: int | None = None, desc: str = "", every: int = 10) -> Iterator[T]:
    """A progress bar in place on a terminal; on a pipe or SLURM log, a plain line every `every` %."""
    if not is_main():
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    next_mark = every
    for i, item in enumerate(items, 1):
        yield item
        if total:
            pct = 100 * i // total
            if pct >= next_mark or i == total:
                log.info("%s: %d/%d (%d%%)", desc, i, total, pct)
                next_mark = (pct // every + 1) * every
