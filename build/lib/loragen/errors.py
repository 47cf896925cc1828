"""User-facing errors: raised for bad input, printed without a traceback by the CLI."""


class LoragenError(Exception):
    """A user mistake or bad input, with a message that names what is wrong and what was expected."""


class DataError(LoragenError):
    """A malformed data row, a missing field, a missing dataset or split."""


class ConfigError(LoragenError):
    """A config value that cannot work (unknown stage, bad option)."""


class CheckpointError(LoragenError):
    """A corrupt, mismatched or unreadable checkpoint or adapter."""
