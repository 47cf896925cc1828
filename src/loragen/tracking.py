"""Experiment tracking behind one small interface: SwanLab or nothing.

Only the main process logs. No API key is ever written: SwanLab reads its own login or
SWANLAB_API_KEY from the environment.

Resume: the training loop saves the tracker's run id in the full state (state/trainer.json `tracker_run_id`);
a run that resumes from that state (train.resume=auto) continues the same SwanLab run
(`swanlab.init(id=..., resume="allow")`). Offline, each resumed segment is its own directory
`swanlog/run-<time>-<id>/` with the same id; `swanlab sync --id <id> <dir>` of each puts them into one cloud run.

Signals: SwanLab installs a SIGINT handler at init that ends the run (and, when SIGINT was ignored, swallows the
signal and leaves a dead run). make_tracker puts the process's own SIGINT handling back right after init, so
Ctrl-C reaches the training loop (train.preemption) and an ignored SIGINT stays ignored.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Protocol

from omegaconf import DictConfig, OmegaConf

from loragen import rundir
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

    @property
    def run_id(self) -> str | None:
        """SwanLab's run id (saved in the training state, so a resumed run continues this run)."""
        return getattr(self._run, "id", None)

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

    resume: dict[str, Any] = {}
    run_id = resumed_run_id(cfg, run_dir)
    if run_id is not None:
        if accepts(swanlab.init, "id", "resume"):
            resume = {"id": run_id, "resume": "allow"}
        else:
            log.warning("SwanLab %s cannot resume a run (swanlab.init takes no id/resume): this resumed training "
                        "logs to a new SwanLab run, not to %s", getattr(swanlab, "__version__", "?"), run_id)
    with sigint_kept():
        run = swanlab.init(
            project=tcfg.project,
            workspace=tcfg.workspace,
            experiment_name=Path(run_dir).name,
            config=OmegaConf.to_container(cfg, resolve=True),
            logdir=str(Path(run_dir) / "swanlog"),
            mode=tcfg.mode,
            **resume,
        )
    tracker = SwanLabTracker(run)
    log.info("tracking with SwanLab (%s mode), logs in %s; %s run %s", tcfg.mode, Path(run_dir) / "swanlog",
             "continuing" if resume else "new", tracker.run_id)
    return tracker


def resumed_run_id(cfg: DictConfig, run_dir: str | Path) -> str | None:
    """The tracker run id recorded in the run dir's training state, when the training will resume from it."""
    train = cfg.get("train")
    if train is None or str(train.get("resume", "auto")) != "auto":
        return None
    path = Path(run_dir) / rundir.STATE / rundir.TRAINER
    try:
        run_id = json.loads(path.read_text()).get("tracker_run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return str(run_id) if run_id else None


def accepts(fn: Any, *names: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


@contextlib.contextmanager
def sigint_kept() -> Iterator[None]:
    """Undo a SIGINT handler installed inside the block (SwanLab's), keeping the one that was there before."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and signal.getsignal(signal.SIGINT) is not before:
            signal.signal(signal.SIGINT, before if before is not None else signal.SIG_DFL)
