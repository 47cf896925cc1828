"""The one adapter reader and writer. Every adapter loragen writes is a standard PEFT directory.

`PeftModel.from_pretrained(base, dir)`, vLLM's `--enable-lora` and lm-evaluation-harness's `peft=`
load what `write_adapter` writes. Keys are PEFT's saved names, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (no adapter name).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loragen import io
from loragen.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # saved tensor names start with it, then the base model's module path


@dataclass
class Adapter:
    config: dict[str, Any]  # adapter_config.json as a dict
    tensors: dict[str, torch.Tensor]  # PEFT saved names -> tensors
    path: str | None = None

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def scale(self) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA): the factor PEFT applies to B @ A."""
        alpha = float(self.config.get("lora_alpha", self.r))
        return alpha / math.sqrt(self.r) if self.config.get("use_rslora") else alpha / self.r


def is_adapter_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and ((p / WEIGHTS_NAME).is_file() or (p / LEGACY_WEIGHTS_NAME).is_file())


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / CONFIG_NAME
    if not p.is_file():
        raise CheckpointError(f"{path} is not a PEFT adapter directory: no {CONFIG_NAME}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: malformed JSON ({e.msg}, line {e.lineno})") from None
    for key in ("r", "target_modules"):
        if key not in cfg:
            raise CheckpointError(f"{p}: missing key {key!r}; is this a LoRA adapter?")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{p}: peft_type {cfg.get('peft_type')!r}, expected LORA")
    return cfg


def read_adapter(path: str | os.PathLike, device: str = "cpu", check_finite: bool = True) -> Adapter:
    """Load a PEFT adapter directory; errors name the file and tensor that are wrong."""
    path = Path(path)
    config = read_adapter_config(path)
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        try:
            tensors = load_file(str(weights), device=device)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{weights}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    elif (path / LEGACY_WEIGHTS_NAME).is_file():
        try:  # pickle-based: only ever with weights_only=True
            tensors = torch.load(path / LEGACY_WEIGHTS_NAME, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"{path / LEGACY_WEIGHTS_NAME}: cannot load with weights_only=True: {e}") from None
    else:
        raise CheckpointError(f"{path} is not a PEFT adapter directory: no {WEIGHTS_NAME}")
    if not tensors:
        raise CheckpointError(f"{weights}: holds no tensors")
    if check_finite:
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{weights}: tensor {name} has non-finite values")
    return Adapter(config, tensors, str(path))


def write_adapter(path: str | os.PathLike, adapter: Adapter | None = None, *, config: dict | None = None,
                  tensors: dict[str, torch.Tensor] | None = None, extra_files: dict[str, Any] | None = None) -> Path:
    """Write a PEFT adapter directory atomically (the whole dir appears at once, or not at all).

    `extra_files` maps file names to JSON-serialisable objects written alongside (e.g. provenance).
    """
    if adapter is not None:
        config, tensors = adapter.config, adapter.tensors
    assert config is not None and tensors is not None
    with io.atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path (PEFT saved prefix) -> (lora_A (r, in), lora_B (out, r))."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            prefix = name[: -len(".lora_A.weight")]
            b = tensors.get(prefix + ".lora_B.weight")
            if b is None:
                raise CheckpointError(f"adapter tensor {name} has no matching {prefix}.lora_B.weight")
            out[prefix] = (a, b)
    return out
