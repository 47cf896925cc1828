"""Preemption: SLURM's warning signal (SIGUSR2, or SIGTERM) only sets a flag; the loop saves its full
state at the next step boundary and stops. The handler that was installed before (e.g. submitit's,
which requeues the job) is then called, so the requeued task resumes from the saved state.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    """Context manager installing the flag-setting handlers (main thread only) and restoring the old ones."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGUSR2) -> None:
        if self.signum is None:
            log.warning("received signal %d: saving the training state at the next step boundary", signum)
        self.signum = signum

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def hand_over(self) -> None:
        """After the state is saved: run the handler that was there before ours, if it was a Python one."""
        prev = self._previous.get(self.signum) if self.signum is not None else None
        if callable(prev):
            prev(self.signum, None)
