"""Stopping a training run without losing it: signals only set a flag; the loop saves its full state at the next
step boundary and stops there.

- SIGUSR2 with a Python handler installed before ours (submitit's on SLURM, which requeues the job): after the
  save that handler is called (`hand_over`), so the requeued task resumes from the saved state ("preempted").
- SIGTERM, SIGINT (the first Ctrl-C), and SIGUSR2 with nobody to requeue: the run is "interrupted"; the stage
  raises errors.Interrupted (exit 128 + the signal number: 143, 130) and running the same command resumes.
- A second SIGINT stops at once: one line on stderr (`on_stop_now()`: where the run was, what state is kept) and
  the process exits 130 there and then (os._exit: no cleanup that could hang on a half-finished write; every
  state and checkpoint is written atomically, so what was saved is intact). Once the loop has stopped for an
  interruption, a further Ctrl-C does the same while the process finishes stopping (tracker, exit handlers).
- A signal the process ignores (SIG_IGN: SIGINT in background jobs, nohup) stays ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Iterable, Iterator, NoReturn

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
REQUEUE_SIGNALS = (signal.SIGUSR2,)  # SLURM's warning signal (submitit's default), handed over to its handler


def exit_now(message: str, code: int) -> NoReturn:
    """One line on stderr, then end the process at once with `code`."""
    os.write(2, f"loragen: {message}\n".encode())
    os._exit(code)


def exit_at_once(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C while a stopped run finishes stopping (tracker, exit handlers): end the process now."""
    exit_now("stopped at once (Ctrl-C again); the saved training state is kept", exit_code(signal.SIGINT))


@contextlib.contextmanager
def handling(signals: Iterable[int], handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    """While the block runs, `handler` handles each of `signals` the process does not ignore (SIG_IGN stays); after
    it, the previous handler comes back where `handler` is still the one installed (not over a newer one, e.g.
    exit_at_once)."""
    previous = {}
    for s in signals:
        h = signal.getsignal(s)
        if h is not signal.SIG_IGN:
            previous[s] = h
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            if signal.getsignal(s) is handler:
                signal.signal(s, h if h is not None else signal.SIG_DFL)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by `signum`: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


class PreemptionFlag:
    """Context manager installing the flag-setting handlers (main thread only) and restoring the old ones."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS, on_stop_now: Callable[[], str] | None = None):
        self.signals = signals
        self.on_stop_now = on_stop_now
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def requeue(self) -> bool:
        """True when the signal goes to a requeueing handler (SLURM/submitit) after the save: "preempted"."""
        return self.signum in REQUEUE_SIGNALS and callable(self._previous.get(self.signum))

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum if self.signum is not None else signal.SIGTERM)

    def request(self, signum: int = signal.SIGUSR2) -> None:
        if self.signum is None:
            more = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
            log.warning("received %s: saving the training state at the next step boundary%s",
                        signal_name(signum), more)
            self.signum = signum
        elif signum == signal.SIGINT and self.signum == signal.SIGINT:
            exit_now(self.on_stop_now() if self.on_stop_now else "stopped at once by a second Ctrl-C",
                     exit_code(signal.SIGINT))

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                previous = signal.getsignal(s)
                if previous is signal.SIG_IGN:
                    continue  # ignored stays ignored
                self._previous[s] = previous
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if self.requested and not self.requeue and signal.SIGINT in self._previous:
            signal.signal(signal.SIGINT, exit_at_once)  # the process is stopping: Ctrl-C again ends it now

    def hand_over(self) -> None:
        """After the state is saved: run the requeueing handler that was there before ours (see `requeue`)."""
        if self.requeue:
            self._previous[self.signum](self.signum, None)
