"""The generator's task objective: generated tokens -> LoRA -> the frozen base model -> stage=lora's own loss.

Text-to-LoRA's "SFT" training in DnD's token layout: the decoder's output tokens go through
`codec.decode_differentiable` (the code path of `detokenize`) into lora_A / lora_B per module, and those
tensors replace the LoRA parameters of a PEFT-wrapped, frozen base model for one forward pass
(`torch.func.functional_call`: the base is wrapped once, nothing is re-wrapped per step). The loss is
`make_objective(kind, ...)` for the model kind and record type, the one `stage=lora` optimises, summed
with its number of loss units so the training loop normalises it exactly as it normalises a LoRA run.
Only the generator has gradients and optimizer state.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from loragen.errors import ConfigError
from loragen.lora.adapter_io import PEFT_PREFIX
from loragen.lora.init import attach_lora, disable_dropout
from loragen.lora.tokenize import Layout
from loragen.lora.tokenize.codec import decode_differentiable, encode_dnd, encode_stats, padded_tokens
from loragen.models.registry import LoadedModel
from loragen.train.objectives import Objective, make_objective


class _LossOf(torch.nn.Module):
    """objective.loss(model, batch) as a module's forward, so functional_call can swap the model's tensors."""

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return self.objective.loss(self.model, batch)


class FunctionalLoRA:
    """A frozen base model wrapped once in PEFT with the layout's LoRA config; `loss(tokens, batch)` runs the
    objective with the LoRA tensors decoded from `tokens` [T, h, w] (differentiably)."""

    def __init__(self, lm: LoadedModel, layout: Layout, objective: Objective, init_seed: int = 0):
        adapter_config = layout.adapter_config
        r = int(adapter_config["r"])
        disable_dropout(lm.model)
        self.peft = attach_lora(lm.model, r=r, alpha=float(adapter_config.get("lora_alpha", r)), dropout=0.0,
                                target_modules=sorted(adapter_config["target_modules"]), init_seed=init_seed)
        for p in self.peft.parameters():
            p.requires_grad_(False)
        self.peft.eval()
        self.layout, self.objective = layout, objective
        self.names = param_names(self.peft, layout)
        self._module = _LossOf(self.peft, objective)

    def tensors(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoded LoRA tensors keyed by the wrapped model's parameter names."""
        return {self.names[k]: v for k, v in decode_differentiable(tokens, self.layout).items()}

    def loss(self, tokens: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        params = {f"model.{k}": v for k, v in self.tensors(tokens).items()}
        return torch.func.functional_call(self._module, params, (batch,), strict=False)

    def init_tokens(self, zero_std: float = 0.0) -> torch.Tensor:
        """The tokens of the adapter as attached (lora_A from the shared init seed, lora_B zero): the task
        objective's residual base, so an untrained generator returns the common starting point of every LoRA.

        A zero chunk (lora_B) encodes with the std floor, and its data cells decode as `mean + cell * std`: at
        std 1e-8 they carry no gradient, so the only way to move lora_B would be its chunks' mean codes (a uniform
        shift of 64 weights at once; the collapse in the README). `zero_std` > 0 gives zero chunks that std code
        instead: they still decode to exactly zero (their data cells are 0), and a data cell's move of 1 is a
        move of `zero_std` in one weight."""
        if self.layout.scheme != "dnd":
            raise ConfigError("the task objective's residual base needs tokenize.scheme=dnd (self-describing tokens)")
        params = dict(self.peft.named_parameters())
        state = {saved: params[name].detach().float() for saved, name in self.names.items()}
        out = torch.zeros(self.layout.shape)
        _, std = encode_dnd(state, self.layout, out, padded_tokens(self.layout))
        if zero_std > 0:
            zero = std < 1e-6  # the floor as it decodes from an fp32 code (not exactly STD_FLOOR)
            _, code = encode_stats(torch.zeros(()), torch.tensor(float(zero_std)))
            r, c = self.layout.rank, self.layout.chunk
            out[zero, r + 1, :] = code
            out[zero, 1 : r + 1, c + 1] = code
        return out


def param_names(peft_model: torch.nn.Module, layout: Layout) -> dict[str, str]:
    """PEFT saved key (`base_model.model.X.lora_A.weight`) -> the wrapped model's parameter name
    (`base_model.model.X.lora_A.default.weight`); every layout tensor must have one, with the same shape."""
    params = dict(peft_model.named_parameters())
    out = {}
    for s in layout.tensors:
        stem, leaf = s.name.rsplit(".", 1)
        name = f"{stem}.default.{leaf}"
        if name not in params:
            raise ConfigError(f"the layout's tensor {s.name} has no parameter {name} in the LoRA-wrapped base model "
                              f"(is the layout from LoRAs of this model? its modules start with {PEFT_PREFIX})")
        if list(params[name].shape) != list(s.shape):
            raise ConfigError(f"the layout's tensor {s.name} has shape {s.shape}; the base model's LoRA parameter "
                              f"has {list(params[name].shape)}: the token sets come from another model")
        out[s.name] = name
    return out


def task_objective(lm: LoadedModel, task_cfg: DictConfig, records: Sequence) -> Objective:
    """stage=lora's objective for this model kind and record type, with generator.task's max_length/temperature."""
    from loragen.train.objectives import record_type_of

    return make_objective(lm.kind, lm.tokenizer, max_length=int(task_cfg.max_length),
                          temperature=float(task_cfg.temperature), record_type=record_type_of(records))
