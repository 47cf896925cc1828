"""`loragen [overrides]`: compose the config, snapshot it, dispatch on cfg.stage.name."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from loragen.config_dir import conf_dir
from loragen.errors import LoragenError
from loragen.stages import run_stage

log = logging.getLogger("loragen")


@hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")
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
