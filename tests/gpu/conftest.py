"""GPU tests (`pytest -m gpu`): the real stages on CUDA, checked against the same stages on the CPU.

Every module here sets `pytestmark = [pytest.mark.gpu, RunIf(...)]`: without CUDA each test is reported
skipped with its reason ("no CUDA device", "needs 2 GPUs, found 1", "no bf16 support"). `make test`
(`-m "not slow and not gpu"`) never selects them; `make gpu-check` runs them first on a GPU machine.

The stages run in subprocesses (`tests.conftest.run_cli`), as a user runs them: Accelerate's state is
per process, so one pytest process cannot run a bf16 stage after an fp32 one.
"""

from __future__ import annotations

import pytest
import torch

# The single-GPU preset the users develop on (conf/hardware/rtx4090.yaml: device cuda, precision bf16).
GPU = ["hardware=rtx4090"]
CPU = ["hardware=cpu"]  # device cpu, precision fp32: the reference


def skip_reason(min_gpus: int = 0, bf16: bool = False, *, n_gpus: int, bf16_supported: bool) -> str | None:
    """Why a test needing `min_gpus` CUDA devices (and bf16 when `bf16`) cannot run here; None when it can."""
    if (min_gpus >= 1 or bf16) and n_gpus == 0:
        return "no CUDA device" if min_gpus <= 1 else f"needs {min_gpus} GPUs, found 0"
    if n_gpus < min_gpus:
        return f"needs {min_gpus} GPUs, found {n_gpus}"
    if bf16 and not bf16_supported:
        return "no bf16 support"
    return None


def cuda_facts() -> tuple[int, bool]:
    """(number of visible CUDA devices, whether device 0 supports bf16)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n, bool(n and torch.cuda.is_bf16_supported())


def RunIf(min_gpus: int = 1, bf16: bool = False, **kwargs) -> pytest.MarkDecorator:  # noqa: N802 (a decorator, named as lightning-hydra-template's)
    """`@RunIf(min_gpus=2, bf16=True)`: a `pytest.mark.skipif` whose reason says what is missing."""
    n, ok = cuda_facts()
    reason = skip_reason(min_gpus, bf16, n_gpus=n, bf16_supported=ok)
    return pytest.mark.skipif(reason is not None, reason=reason or "", **kwargs)
