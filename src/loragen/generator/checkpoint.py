"""The generator's saved form: weights (safetensors), the generator config and the token layout.

A generator run dir holds `generator/model.safetensors`, `generator/generator.json` (the resolved
`generator` config, the layout of its output tokens, the datasets and the held-out one). Loading it
under a different `generator` config is refused with the keys that differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loragen import io
from loragen.errors import CheckpointError
from loragen.lora.tokenize import Layout
from loragen.models.hyperconv import HyperConvDecoder

SUBDIR = "generator"
WEIGHTS = "model.safetensors"
META = "generator.json"


# The keys that define the decoder and its input; the others (datasets, noise, pool size) only shape training.
ARCH_KEYS = ("encoder", "num_prompts", "prompt_len", "features", "kernel_size", "residual", "border_bound")


def generator_config(cfg: DictConfig) -> dict[str, Any]:
    """The architecture part of `cfg.generator`, resolved."""
    full = OmegaConf.to_container(cfg.generator, resolve=True)
    return {k: full[k] for k in ARCH_KEYS}


def save_generator(run_dir: str | Path, model: HyperConvDecoder, gen_cfg: dict[str, Any], layout: Layout,
                   extra: dict[str, Any]) -> Path:
    out = Path(run_dir) / SUBDIR
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with io.atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    io.write_json(out / META, {"generator": gen_cfg, "layout": layout.to_dict(), **extra})
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    d = _dir(path)
    if not (d / META).is_file() or not (d / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a generator run: expected {d / WEIGHTS} and {d / META} "
                              f"(generate.checkpoint=<the run dir of stage=generator>)")
    return io.read_json(d / META)


def config_diff(saved: Any, current: Any, prefix: str = "generator") -> list[str]:
    """The keys whose values differ, as `key: saved -> current`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current), key=str):
            out += config_diff(saved.get(k, "<missing>"), current.get(k, "<missing>"), f"{prefix}.{k}")
        return out
    return [] if saved == current else [f"{prefix}: {saved} -> {current}"]


def load_generator(path: str | Path, gen_cfg: dict[str, Any]) -> tuple[HyperConvDecoder, Layout, dict[str, Any]]:
    """The trained decoder, its layout and metadata; refuses a checkpoint made with another generator config."""
    meta = read_meta(path)
    meta["generator"].setdefault("border_bound", None)  # checkpoints from before the key
    diff = config_diff(meta["generator"], gen_cfg)
    if diff:
        raise CheckpointError(f"generator checkpoint {path} was trained with another generator config; "
                              f"differing keys (checkpoint -> now): {'; '.join(diff)}")
    d = _dir(path)
    try:
        state = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{d / WEIGHTS}: cannot read the generator weights ({e})") from None
    base = state.get("base")
    model = HyperConvDecoder(gen_cfg["features"], gen_cfg["kernel_size"], base=base,
                             border_bound=gen_cfg["border_bound"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{d / WEIGHTS} does not fit generator.features {gen_cfg['features']}: {e}") from None
    return model.eval(), Layout.from_dict(meta["layout"]), meta


def _dir(path: str | Path) -> Path:
    p = Path(path)
    return p if (p / META).is_file() else p / SUBDIR
