"""One module per stage, each exposing `run(cfg) -> dict` (a recipe: setup, loop, save); `run_stage` dispatches
on cfg.stage.name (the CLI, the pipeline engine and the tests all go through it)."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from loragen.errors import LoragenError

STAGES = ("data", "lora", "tokenize", "generator", "generate", "evaluate", "transfer", "pipeline", "report", "export", "chat")


def run_stage(cfg: DictConfig) -> dict:
    """Run the stage named by cfg.stage.name in-process and return its results."""
    name = cfg.stage.name
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        raise LoragenError(f"seed={cfg.get('seed')!r}; expected an integer")
    if name not in STAGES:
        raise LoragenError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    from loragen.stages.checks import validate

    validate(cfg)  # value ranges and cross-key rules, before anything loads
    try:
        module = importlib.import_module(f"loragen.stages.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"loragen.stages.{name}":
            raise
        raise LoragenError(f"stage {name!r} is not implemented yet") from None
    try:
        return module.run(cfg)
    finally:
        from loragen.models.hyperconv import release_scratch

        release_scratch()  # the decoder's transform buffers (150 MB for small_minilm) are not the next stage's
