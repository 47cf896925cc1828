"""A cheap copy of a training PEFT model's adapter, for writing it while training goes on.

`get_peft_model_state_dict` walks the whole model's state_dict on every call (on tiny_qwen2 it costs
more than the training step's save budget). The saved names and the live tensors behind them do not
change during training, so they are resolved once; each snapshot then only copies those tensors to
the CPU. A saved tensor that is not a live parameter or buffer (a PEFT version that computes one)
falls back to the full state dict on every snapshot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from loragen.lora.adapter_io import Adapter, write_adapter


class AdapterSnapshot:
    def __init__(self, peft_model, adapter_name: str = "default"):
        from peft import get_peft_model_state_dict

        self.model, self.adapter_name = peft_model, adapter_name
        saved = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        live = {_key(t): t for t in [*peft_model.parameters(), *peft_model.buffers()]}
        self.sources: dict[str, torch.Tensor] | None = {name: live.get(_key(t)) for name, t in saved.items()}
        if any(t is None for t in self.sources.values()):
            self.sources = None

    def take(self) -> Adapter:
        """The adapter config and a detached CPU copy of its tensors (PEFT's saved names)."""
        config = self.model.peft_config[self.adapter_name].to_dict()
        if self.sources is None:
            from peft import get_peft_model_state_dict

            sources = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)
        else:
            sources = self.sources
        with torch.no_grad():
            return Adapter(config, {name: t.detach().to("cpu", copy=True) for name, t in sources.items()})

    def deferred_write(self, path: Path) -> Callable[[], None]:
        """Take a snapshot now; return the write of `path` (a Checkpointer save_fn)."""
        adapter = self.take()
        return lambda: write_adapter(path, adapter)


def _key(t: torch.Tensor) -> tuple:
    """Same storage, offset, shape, stride and dtype: the same tensor data."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
