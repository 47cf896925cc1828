"""Cosine similarity between adapters, measured on the weight update each applies: ΔW = scale · B · A.

ΔW is never materialised: for LoRA pairs, <B_i A_i, B_j A_j>_F = sum((B_iᵀ B_j) ⊙ (A_i A_jᵀ)), so one
Gram matrix of the stacked A's and one of the stacked B's per module give every pair at once
(cheap even for 0.5B-model adapters). Modules are summed, i.e. ΔW is the concatenation over modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loragen.errors import CheckpointError
from loragen.lora.adapter_io import Adapter, lora_pairs, read_adapter


def common_modules(adapters: list[Adapter]) -> list[str]:
    """Modules every adapter holds with the same (in, out) shape."""
    pairs = [lora_pairs(a.tensors) for a in adapters]
    shared = set(pairs[0])
    for p in pairs[1:]:
        shared &= set(p)

    def shape(p: dict, m: str) -> tuple[int, int]:
        a, b = p[m]
        return a.shape[1], b.shape[0]

    return sorted(m for m in shared if len({shape(p, m) for p in pairs}) == 1)


def delta_cosine_matrix(adapters: list[Adapter]) -> np.ndarray:
    """[n, n] cosine similarity of the adapters' ΔW over their common modules."""
    if not adapters:
        return np.zeros((0, 0))
    modules = common_modules(adapters)
    if not modules:
        names = ", ".join(str(a.path) for a in adapters)
        raise CheckpointError(f"adapters {names} share no LoRA module of the same shape: nothing to compare")
    pairs = [lora_pairs(a.tensors) for a in adapters]
    n = len(adapters)
    inner = np.zeros((n, n))
    for m in modules:
        ranks = [p[m][0].shape[0] for p in pairs]
        owner = np.repeat(np.arange(n), ranks)  # which adapter each stacked rank-row belongs to
        scale = torch.tensor(np.repeat([a.scale for a in adapters], ranks), dtype=torch.float64)
        a = torch.cat([p[m][0].double() for p in pairs]) * scale[:, None]  # [sum r, in]
        b = torch.cat([p[m][1].double() for p in pairs], dim=1)            # [out, sum r]
        cross = ((b.T @ b) * (a @ a.T)).numpy()                            # [sum r, sum r]
        np.add.at(inner, (owner[:, None], owner[None, :]), cross)
    norm = np.sqrt(np.clip(np.diag(inner), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = inner / np.outer(norm, norm)
    return np.where(np.outer(norm, norm) > 0, cos, np.nan)


def cosine_of_dirs(paths: list[str | Path]) -> np.ndarray:
    return delta_cosine_matrix([read_adapter(p) for p in paths])
