"""Adapters on one loaded base model: check them all before scoring, then swap without reloading the base."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loragen.errors import CheckpointError
from loragen.lora.adapter_io import PEFT_PREFIX, is_adapter_dir, lora_pairs, read_adapter

log = logging.getLogger(__name__)


def check_adapter(base: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Raise CheckpointError naming the adapter and the first mismatch if it does not fit `base`."""
    if not is_adapter_dir(adapter_dir):
        raise CheckpointError(f"{adapter_dir} is not a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    ad = read_adapter(adapter_dir)
    modules = dict(base.named_modules())
    for prefix, (a, b) in lora_pairs(ad.tensors).items():
        name = prefix[len(PEFT_PREFIX):] if prefix.startswith(PEFT_PREFIX) else prefix
        mod = modules.get(name)
        if mod is None:
            close = [n for n in modules if n.endswith(name.split(".")[-1])][:3]
            raise CheckpointError(f"adapter {adapter_dir}: module {name!r} is not in the base model (e.g. {close})")
        w = getattr(mod, "weight", None)
        if w is None or w.dim() != 2:
            raise CheckpointError(f"adapter {adapter_dir}: module {name!r} of the base model is not a linear layer")
        out_f, in_f = w.shape
        if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"adapter {adapter_dir}: module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                f"the base weight ({out_f}, {in_f}); expected lora_A (r, {in_f}) and lora_B ({out_f}, r). "
                "Was it trained on another base model?"
            )


class AdapterSwitcher:
    """Holds the base model and activates one adapter (or none) at a time.

    `use(None)` scores the bare base; `use(path)` loads the adapter onto the same base
    weights (PEFT `load_adapter`), dropping the previous one.
    """

    def __init__(self, base: torch.nn.Module):
        self.base = base
        self.peft = None
        self.active: str | None = None

    def use(self, adapter_dir: str | None):
        from peft import PeftModel

        if adapter_dir is None:
            if self.peft is not None:
                self._drop()
            return self.base
        name = f"a{abs(hash(str(adapter_dir))) % 10**8}"
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=name, is_trainable=False)
        else:
            self.peft.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
            self.peft.set_adapter(name)
            self.peft.delete_adapter(self.active)
        self.active = name
        self.peft.eval()
        return self.peft

    def _drop(self) -> None:
        self.base = self.peft.unload()  # removes LoRA layers, base weights untouched
        self.peft = None
        self.active = None
