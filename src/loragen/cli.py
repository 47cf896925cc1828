"""`loragen [overrides]`: compose the config, snapshot it, dispatch on cfg.stage.name.

How a run that fails ends:
- A user-caused failure prints ONE line on stderr, `loragen: error: <what is wrong and what to do>`, and exits 2:
  loragen's own errors (errors.LoragenError: bad input, a missing dataset, an adapter for another base model,
  an over-long document, a file that cannot be written, a full disk), a config that Hydra refuses (a wrong type
  or an unknown key, named, before anything loads), and a file or directory the operating system refuses to
  write (no permission, read-only file system, disk full).
- Anything else (a bug) prints one line too, exit 1, naming the log that holds its traceback (or, before the
  run dir exists, printing the traceback).
- A run stopped by a signal (errors.Interrupted) prints its one line and exits 128 + the signal (130, 143).
  SIGTERM outside the training loop and outside pipelines (model loading, the final evaluation) raises
  errors.Interrupted too (`sigterm_handler`, installed at start only where SIGTERM has its default action: never
  over submitit's handler on SLURM; the training loop and the pipeline engine put their own over it while they run
  and restore it after); a second SIGTERM while the first one unwinds ends the process at once, exit 143.
The full traceback always goes to the run's loragen.log when there is one; LORAGEN_DEBUG=1 prints it on stderr
too. (Hydra's own error printing is turned off with HYDRA_FULL_ERROR=1 so that its errors reach us.)
"""

from __future__ import annotations

import difflib
import errno
import json
import logging
import os
import signal
import sys
import threading
import traceback
import typing
from pathlib import Path

import hydra
from omegaconf import DictConfig

from loragen import rundir
from loragen.config_dir import conf_dir
from loragen.errors import Interrupted, LoragenError, WriteError
from loragen.stages import run_stage

log = logging.getLogger("loragen")

EXIT_USER = 2  # a user-caused failure (as argparse and Hydra's own config errors)
EXIT_BUG = 1
EXIT_SIGINT = 130
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
WRITE_ERRNOS = FULL_ERRNOS | {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


class _Run:
    cfg: DictConfig | None = None  # the job config once the app runs (its run dir exists then)


@hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    from transformers.utils import logging as hf_logging

    from loragen import runtime

    _Run.cfg = cfg
    install_sigterm_handler()  # a job started by a Hydra launcher runs this without main()
    logging.raiseExceptions = debug()  # a log that cannot be written (disk full) prints no traceback of its own
    try:
        hf_logging.disable_progress_bar()
        out = runtime.start_run(cfg)
        run_stage(cfg)
        if runtime.is_main():
            log.info("stage %s done; outputs in %s", cfg.stage.name, out)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure ends in one line (see the module docstring)
        sys.exit(report(e, cfg))


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them (several lines)
    install_sigterm_handler()
    try:
        app()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - errors before the app runs: composing the config, the run dir
        sys.exit(report(e, _Run.cfg))


# ---- SIGTERM outside training and pipelines ----------------------------------------------------------------------

SIGTERM_MESSAGE = ("interrupted by SIGTERM before/after training; nothing to resume beyond the saved state; "
                   "rerun the same command")


def sigterm_handler(signum: int, frame: typing.Any) -> None:
    """SIGTERM while no training loop or pipeline has its own handler installed: raise errors.Interrupted (exit 143,
    one line). A second one while the first unwinds (a cleanup that hangs) ends the process at once."""
    if sigterm_handler.raised:  # type: ignore[attr-defined]
        from loragen.train.preemption import exit_now

        exit_now("stopped at once (SIGTERM again)", 128 + signum)
    sigterm_handler.raised = True  # type: ignore[attr-defined]
    raise Interrupted(SIGTERM_MESSAGE, 128 + signum)


sigterm_handler.raised = False  # type: ignore[attr-defined]


def install_sigterm_handler() -> bool:
    """Install sigterm_handler for SIGTERM when SIGTERM has its default action (not over submitit's handler, nor
    an ignored SIGTERM, nor anyone else's), in the main thread only; return whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    sigterm_handler.raised = False  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, sigterm_handler)
    return True


# ---- reporting -------------------------------------------------------------------------------------------------

def debug() -> bool:
    return os.environ.get("LORAGEN_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def report(e: BaseException, cfg: DictConfig | None) -> int:
    """Print the one line for `e`, log its traceback into the run's loragen.log; return the exit code."""
    if isinstance(e, Interrupted):
        line, code = f"loragen: {e}", e.exit_code
    elif isinstance(e, KeyboardInterrupt):
        line, code = "loragen: interrupted (Ctrl-C)", EXIT_SIGINT
    else:
        message = user_message(e, cfg)
        code = EXIT_USER if message is not None else EXIT_BUG
        line = f"loragen: error: {message}" if message is not None else ""
    logs = log_traceback(line or f"unexpected {type(e).__name__}", e)
    if not line:
        where = f"traceback in {logs[0]}" if logs else "traceback above"
        line = f"loragen: error: unexpected {type(e).__name__}: {first_line(e)} (a bug? {where})"
        if not logs and not debug():
            traceback.print_exception(e)
    if debug():
        traceback.print_exception(e)
    print(line, file=sys.stderr, flush=True)
    return code


def log_traceback(message: str, e: BaseException) -> list[str]:
    """Write `message` and e's traceback to the log files (FileHandlers of the root logger) only; their paths."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename != os.devnull]
    if not files:
        return []
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), (type(e), e, e.__traceback__))
    for h in files:
        try:
            h.handle(record)
        except Exception:  # noqa: BLE001 - a log that cannot be written (disk full) must not hide the error
            pass
    return [h.baseFilename for h in files]


def first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def user_message(e: BaseException, cfg: DictConfig | None, run: Path | None = None) -> str | None:
    """The one-line message of a user-caused failure, or None when `e` is not one (a bug). `run`: the run dir
    (default: Hydra's, when the app runs)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, LoragenError):
        message = " ".join(str(e).split("\n"))
        os_error = _os_cause(e)
        if isinstance(e, WriteError):
            message += write_hint(e.path, e.errno, cfg, run)
        elif os_error is not None and os_error.errno in FULL_ERRNOS:
            message += write_hint(os_error.filename, os_error.errno, cfg, run)
        return message
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return config_message(e)
    os_error = _os_cause(e)  # also behind another error (Hydra's "Unable to configure handler 'file'")
    if os_error is not None and os_error.errno in WRITE_ERRNOS:
        what = os_error.filename or "a file"
        hint = write_hint(os_error.filename, os_error.errno, cfg, run)
        if hint or os_error.errno in FULL_ERRNOS | {errno.EROFS}:
            return f"cannot write {what}: {os_error.strerror}{hint}"
        return f"{os_error.strerror}: {what}"  # not the run or cache dir: maybe a file being read
    return None


def _os_cause(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def write_hint(path: str | None, err: int | None, cfg: DictConfig | None, run: Path | None = None) -> str:
    """What to do about a write that failed at `path`: which directory it was (run dir, cache dir) and which key
    moves it; on a full disk, what of the run was saved."""
    from loragen import runtime

    if run is None and cfg is not None:
        try:
            run = runtime.run_dir()
        except Exception:  # noqa: BLE001 - no Hydra config (an in-process caller)
            run = None
    p = Path(path) if path else None
    cache = Path(str(cfg.paths.cache_dir)) if cfg is not None and cfg.get("paths") else \
        Path(os.environ.get("LORAGEN_CACHE_DIR") or Path.home() / ".cache" / "loragen")
    if err in FULL_ERRNOS:
        return "; " + saved_summary(run) if run is not None else "; free some space and rerun the same command"
    if p is not None and _under(p, cache):
        return (f"; the cache directory paths.cache_dir={cache} must be writable: set LORAGEN_CACHE_DIR=<dir> "
                "(or paths.cache_dir=<dir>) to a writable directory")
    if run is None:  # Hydra could not create the run dir or write into it
        return "; the run directory must be writable: choose another with hydra.run.dir=<dir>"
    if p is not None and (_under(p, run) or _under(run, p)):
        return f"; the run directory {run} must be writable: choose another with hydra.run.dir=<dir>"
    return ""


def saved_summary(run: Path) -> str:
    """What a run dir holds after a write failed (every loragen file is written whole or not at all)."""
    parts = []
    state = run / rundir.STATE / rundir.TRAINER
    if state.is_file():
        try:
            parts.append(f"the training state at step {json.loads(state.read_text())['step']} ({rundir.STATE}/)")
        except (OSError, ValueError, KeyError, TypeError):
            parts.append(f"a training state ({rundir.STATE}/)")
    ckpts = run / rundir.CHECKPOINTS
    steps = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) if ckpts.is_dir() else []
    if steps:
        parts.append(f"{len(steps)} checkpoints up to {steps[-1]}")
    for name in (rundir.FINAL, rundir.BEST, rundir.ADAPTER, rundir.RESULTS):
        if (run / name).exists():
            parts.append(f"{name}")
    saved = f"saved in {run}: {', '.join(parts)}" if parts else f"nothing of the results is saved in {run} yet"
    missing = [n for n in (rundir.FINAL, rundir.RESULTS) if not (run / n).exists() and (steps or state.is_file())]
    return (saved + (f"; not written: {', '.join(missing)}" if missing else "") +
            "; free some space and rerun the same command to resume")


# ---- Hydra's config errors in one line ------------------------------------------------------------------------

def config_message(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line config errors as one line, naming the key and the type it expects."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    head = compact(str(e)) if cause is not e else ""
    if not isinstance(cause, OmegaConfBaseException):
        return head or type(e).__name__
    reason = (str(getattr(cause, "msg", None) or cause).strip().splitlines() or [""])[0].strip()
    key = getattr(cause, "full_key", None)
    schema = getattr(cause, "object_type", None)
    leaf = getattr(cause, "key", None)
    extra = ""
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and schema is not None and leaf is not None:
        fields = list(getattr(schema, "__dataclass_fields__", {}))
        close = difflib.get_close_matches(str(leaf), fields, n=1)
        parent = key.rsplit(".", 1)[0] if key and "." in key else ""
        if close:
            extra = f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
        elif fields:
            extra = f"; {parent or 'it'} has {', '.join(fields)}"
    elif schema is not None and leaf is not None:
        expected = _expected_type(schema, str(leaf))
        if expected:
            extra = f" ({key} expects {expected})"
    if head.startswith("Error merging override "):
        head = head[len("Error merging override "):]
    head = head.partition("; To append to your config use ")[0]  # a typed group takes no new keys anyway
    reason = reason.rstrip(".")
    return f"{head}: {reason}{extra}" if head else f"{key}: {reason}{extra}"


def _expected_type(schema: type, field: str) -> str | None:
    try:
        hint = typing.get_type_hints(schema).get(field)
    except Exception:  # noqa: BLE001 - the type is a courtesy
        return None
    if hint is None:
        return None
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


def compact(text: str) -> str:
    """Hydra's message in one line: `Heading:` followed by tab-indented items becomes `heading: a, b, c`; the
    config search path is left out; lines are joined with '; '."""
    out: list[str] = []
    items: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("Config search path"):
            break
        if raw.startswith(("\t", "    ")) and items is not None:
            items.append(line)
            continue
        if items is not None:
            out[-1] += " " + ", ".join(items)
            items = None
        if line.endswith(":"):
            out.append(line)
            items = []
        else:
            out.append(line.rstrip("."))
    if items is not None and out:
        out[-1] += " " + ", ".join(items)
    return "; ".join(out)


if __name__ == "__main__":
    main()
