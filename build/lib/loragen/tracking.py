"""Experiment tracking behind one small interface: SwanLab or nothing.

Only the main process logs. No API key is ever written: SwanLab reads its own login or
SWANLAB_API_KEY from the environment.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from loragen.errors import ConfigError

log = logging.getLogger(__name__)
SWANLAB_MODES = ("cloud", "offline", "local", "disabled")


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def finish(self) -> None: ...


class NullTracker:
    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


class SwanLabTracker:
    def __init__(self, run: Any):
        self._run = run

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._run.log(metrics, step=step)

    def finish(self) -> None:
        self._run.finish()


def make_tracker(cfg: DictConfig, run_dir: str | Path, is_main: bool = True) -> Tracker:
    """A tracker for this run, logging into `run_dir` (offline/local modes) with the resolved config."""
    tcfg = cfg.tracker
    if not is_main or tcfg.name == "none":
        return NullTracker()
    if tcfg.name != "swanlab":
        raise ConfigError(f"tracker={tcfg.name!r}; expected swanlab or none")
    if tcfg.mode not in SWANLAB_MODES:
        raise ConfigError(f"tracker.mode={tcfg.mode!r}; expected one of {SWANLAB_MODES}")
    if tcfg.mode == "disabled":
        return NullTracker()
    import swanlab

    run = swanlab.init(
        project=tcfg.project,
        workspace=tcfg.workspace,
        experiment_name=Path(run_dir).name,
        config=OmegaConf.to_container(cfg, resolve=True),
        logdir=str(Path(run_dir) / "swanlog"),
        mode=tcfg.mode,
    )
    log.info("tracking with SwanLab (%s mode), logs in %s", tcfg.mode, Path(run_dir) / "swanlog")
    return SwanLabTracker(run)
