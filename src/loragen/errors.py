"""User-facing errors: raised for bad input, printed without a traceback by the CLI."""


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
