"""The Accelerator for a run, from `hardware`: device, mixed precision, process group."""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig

from loragen.errors import ConfigError

log = logging.getLogger(__name__)
MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(cfg: DictConfig, **kwargs):
    """One Accelerator per run; on CPU (`hardware.device=cpu`) gloo across torchrun processes."""
    from accelerate import Accelerator

    adopt_submitit_env()
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


def adopt_submitit_env() -> None:
    """In a multi-task submitit job (SLURM tasks, or the local executor's), export what torch.distributed's
    env:// init reads (MASTER_ADDR from SLURM's node list, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) so the
    Accelerator forms one group of all tasks. CUDA_VISIBLE_DEVICES stays: Accelerate picks cuda:LOCAL_RANK."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return  # not a submitit job, or torchrun already set the group up
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        log.info("submitit job: rank %d of %d, master %s:%d", dist.rank, dist.world_size, dist.master_addr,
                 dist.master_port)
