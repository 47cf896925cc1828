"""The Accelerator for a run, from `hardware`: device, mixed precision, process group."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from loragen.errors import ConfigError

log = logging.getLogger(__name__)
MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(cfg: DictConfig, **kwargs):
    """One Accelerator per run; on CPU (`hardware.device=cpu`) gloo across torchrun processes."""
    from accelerate import Accelerator

    hw = cfg.hardware
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"hardware={hw.name} asks for CUDA but no GPU is visible; use hardware=cpu")
    if hw.precision not in MIXED:
        raise ConfigError(f"hardware.precision={hw.precision!r}; expected one of {sorted(MIXED)}")
    acc = Accelerator(cpu=hw.device == "cpu", mixed_precision=MIXED[hw.precision], **kwargs)
    try:
        from loragen import runtime

        runtime.share_run_dir(acc)
    except ValueError:  # no Hydra app running (library use)
        pass
    if acc.num_processes != int(hw.num_processes) and acc.is_main_process:
        log.warning("hardware=%s expects %d processes but this run has %d", hw.name, hw.num_processes, acc.num_processes)
    return acc
