"""`loragen [overrides]`: compose the config, snapshot it, dispatch on cfg.stage.name."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from loragen.errors import LoragenError

log = logging.getLogger("loragen")


def _conf_dir() -> str:
    """The repo's conf/ (editable install) or the copy packaged inside loragen/."""
    here = Path(__file__).resolve().parent
    for cand in (here.parents[1] / "conf", here / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise RuntimeError(f"loragen's conf/ directory was not found next to {here}")


STAGES = ("data", "lora", "tokenize", "generator", "generate", "evaluate", "transfer", "pipeline", "report", "export", "chat")


def run_stage(cfg: DictConfig) -> dict:
    """Run the stage named by cfg.stage.name in-process and return its results."""
    name = cfg.stage.name
    if name not in STAGES:
        raise LoragenError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    try:
        module = importlib.import_module(f"loragen.stages.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"loragen.stages.{name}":
            raise
        raise LoragenError(f"stage {name!r} is not implemented yet") from None
    return module.run(cfg)


@hydra.main(config_path=_conf_dir(), config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    from transformers.utils import logging as hf_logging

    from loragen import runtime

    hf_logging.disable_progress_bar()
    out = runtime.start_run(cfg)
    try:
        run_stage(cfg)
    except LoragenError as e:
        log.error("%s", e)
        print(f"loragen: error: {e}", file=sys.stderr)
        sys.exit(2)
    if runtime.is_main():
        log.info("stage %s done; outputs in %s", cfg.stage.name, out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
