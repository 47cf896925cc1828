"""Learning-rate schedules: linear warmup, then cosine or linear decay to `min_lr_ratio` · lr."""

from __future__ import annotations

import math

import torch

from loragen.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based: the lr used by the step-th update)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule={schedule!r}; expected one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int, schedule: str,
                   min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule)  # validates the name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule, min_lr_ratio=min_lr_ratio),
    )
