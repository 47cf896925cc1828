"""loragen: LoRA adapters as data (fine-tune, tokenize, generate, transfer, evaluate)."""

__version__ = "0.1.0"
