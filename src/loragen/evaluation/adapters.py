"""Adapters on one loaded base model: check them all before scoring, then swap without reloading the base."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loragen.errors import CheckpointError
from loragen.lora.adapter_io import (
    PEFT_PREFIX,
    Adapter,
    base_mismatch,
    is_adapter_dir,
    lora_pairs,
    not_an_adapter,
    read_adapter,
)
from loragen.models.registry import model_kind

log = logging.getLogger(__name__)
TASK_KINDS = {"CAUSAL_LM": "causal", "SEQ_2_SEQ_LM": "seq2seq", "FEATURE_EXTRACTION": "encoder"}
KIND_NAMES = {"causal": "causal (decoder-only) LM", "seq2seq": "seq2seq (encoder-decoder) LM", "encoder": "encoder",
              "not seq2seq": "causal LM or encoder"}


def check_adapter(base: torch.nn.Module, adapter_dir: str | Path, *, model_name: str | None = None,
                  model_path: str | None = None, allow_base_mismatch: bool = False,
                  override: str | None = None) -> None:
    """Raise CheckpointError naming the adapter and the first mismatch if it does not fit `base`.

    In order: a PEFT adapter dir (a loragen run dir is pointed to its adapter), its kind (causal, seq2seq,
    encoder), its modules and shapes, then its base model (check_base: the adapter's record against `base`,
    loaded from `model_path` as loragen model `model_name`)."""
    if not is_adapter_dir(adapter_dir):
        raise CheckpointError(not_an_adapter(adapter_dir))
    ad = read_adapter(adapter_dir)
    check_adapter_kind(base, ad)
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
    check_base(base, adapter_dir, model_name=model_name, model_path=model_path, allow=allow_base_mismatch,
               override=override)


def check_base(base: torch.nn.Module, adapter_dir: str | Path, *, model_name: str | None = None,
               model_path: str | None = None, allow: bool = False, override: str | None = None) -> None:
    """The adapter's recorded base model (loragen's record, else PEFT's base_model_name_or_path) against `base`:
    a CheckpointError naming both when they differ, a warning instead when `allow`."""
    config = getattr(base, "config", None)
    path = model_path or getattr(base, "name_or_path", None) or getattr(config, "_name_or_path", None)
    found = base_mismatch(adapter_dir, config, path)
    if found is None:
        return
    theirs, why = found
    current = f"{model_name} ({path})" if model_name else str(path)
    msg = f"adapter {adapter_dir} was written for base model {theirs}, not {current}: {why}"
    if allow:
        log.warning("%s; loaded anyway (%s)", msg, override or "base mismatch allowed")
        return
    way = f"set {override} to load it anyway" if override else "this command has no override for it"
    raise CheckpointError(f"{msg}. Use the base model it was trained on, or {way} (its shapes fit)")


def adapter_kind(ad: Adapter) -> tuple[str | None, str]:
    """(causal | seq2seq | encoder | None, how it was told): adapter_config.json's task_type, else its module names.

    Without a task_type only seq2seq is recognisable from names (modules under both an encoder and a decoder).
    """
    task = ad.config.get("task_type")
    if task in TASK_KINDS:
        return TASK_KINDS[task], f"task_type {task}"
    parts = {p for name in ad.tensors for p in name.split(".")}
    if "encoder" in parts and "decoder" in parts:
        return "seq2seq", "modules under both encoder and decoder"
    return None, "unknown"


def check_adapter_kind(base: torch.nn.Module, ad: Adapter) -> None:
    """A seq2seq adapter on a causal model (or the reverse) is refused, naming both."""
    have = model_kind(base)
    kind, why = adapter_kind(ad)
    if kind is None and have == "seq2seq":
        kind, why = "not seq2seq", "no task_type, and no modules under both an encoder and a decoder"
    if kind is not None and kind != have:
        base_name = getattr(getattr(base, "config", None), "name_or_path", "") or type(base).__name__
        raise CheckpointError(
            f"adapter {ad.path} is for a {KIND_NAMES[kind]} ({why}) but the base model {base_name} is a "
            f"{KIND_NAMES[have]} ({type(base).__name__}); use a base model of the kind the adapter was trained on"
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
