"""User-facing errors: raised for bad input, printed without a traceback by the CLI."""

from __future__ import annotations


class LoragenError(Exception):
    """A user mistake or bad input, with a message that names what is wrong and what was expected."""


class DataError(LoragenError):
    """A malformed data row, a missing field, a missing dataset or split."""


class ConfigError(LoragenError):
    """A config value that cannot work (unknown stage, bad option)."""


class CheckpointError(LoragenError):
    """A corrupt, mismatched or unreadable checkpoint or adapter."""


class Interrupted(LoragenError):
    """A run stopped by SIGTERM or SIGINT after saving its state; the CLI prints the message and exits with
    `exit_code` (128 + the signal number: 143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WriteError(LoragenError):
    """A file or directory that cannot be written (no permission, read-only file system, disk full): `path` is
    what was being written, `errno` the operating system's error number."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno


class DiskFullError(WriteError):
    """No space left (ENOSPC) or quota exceeded (EDQUOT) while writing `path`; nothing of `path` was written."""


class OverlongError(DataError):
    """A document whose continuation is longer than the model's context (eval.overlong=error)."""
