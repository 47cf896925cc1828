"""loragen: LoRA adapters as data (fine-tune, tokenize, generate, transfer, evaluate)."""

from loragen.schema import register as _register_schemas

__version__ = "0.1.0"
_register_schemas()  # the typed config schemas (loragen.schema) must be in Hydra's ConfigStore before any compose
