"""LoRA adapters: the one PEFT reader/writer, attaching LoRA with a shared init, tokenization, transfer."""
