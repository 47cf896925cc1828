"""The generator's loss and metrics over LoRA token tensors [B, T, h, w].

Only real cells count (padding cells of the last token of a tensor are masked out), and each token is
weighted by its std across the training checkpoints: tokens that move during LoRA training matter more
than tokens that stay put.
"""

from __future__ import annotations

import torch

from loragen.errors import ConfigError


def token_weights(token_std: torch.Tensor) -> torch.Tensor:
    """[T] per-token std across checkpoints -> [T] loss weights with mean 1 (uniform if all std are 0)."""
    std = token_std.detach().float().clamp_min(0)
    if std.ndim != 1:
        raise ConfigError(f"per-token std has shape {list(token_std.shape)}; expected [num_tokens]")
    mean = std.mean()
    return std / mean if mean > 0 else torch.ones_like(std)


def _check(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor | None) -> None:
    if pred.shape != target.shape:
        raise ConfigError(f"generated tokens have shape {list(pred.shape)}; the targets {list(target.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(target.shape[-3:]):
        raise ConfigError(f"real-cell mask has shape {list(mask.shape)}; expected the token shape {list(target.shape[-3:])}")
    if weights is not None and tuple(weights.shape) != (target.shape[-3],):
        raise ConfigError(f"token weights have shape {list(weights.shape)}; expected [{target.shape[-3]}]")


def _cell_weights(target: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor:
    """[T, h, w] weight of each cell: the token's weight on real cells, 0 on padding."""
    cells = torch.ones(target.shape[-3:], dtype=torch.float32, device=target.device)
    if mask is not None:
        cells = cells * mask.to(cells)
    if weights is not None:
        cells = cells * weights.to(cells).view(-1, 1, 1)
    return cells


def token_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    *,
    mse_weight: float = 1.0,
    l1_weight: float = 0.0,
) -> torch.Tensor:
    """mse_weight * weighted mean squared error + l1_weight * weighted mean absolute error, over real cells."""
    _check(pred, target, mask, weights)
    cells = _cell_weights(target, mask, weights)
    norm = cells.sum().clamp_min(1e-12) * pred.shape[0]
    diff = pred.float() - target.float()
    loss = mse_weight * (diff.square() * cells).sum() / norm
    if l1_weight:
        loss = loss + l1_weight * (diff.abs() * cells).sum() / norm
    return loss


@torch.no_grad()
def token_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Unweighted errors over real cells: mse, mae, rmse, and relative error ||pred - target|| / ||target||."""
    _check(pred, target, mask, None)
    cells = _cell_weights(target, mask, None).expand_as(target)
    diff = (pred.float() - target.float()) * cells
    n = cells.sum().clamp_min(1)
    mse = diff.square().sum() / n
    return {
        "mse": float(mse),
        "mae": float(diff.abs().sum() / n),
        "rmse": float(mse.sqrt()),
        "rel_error": float(diff.norm() / (target.float() * cells).norm().clamp_min(1e-12)),
    }


def add_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + N(0, std^2) noise (the condition and target noise of training); x itself when std is 0."""
    if not std:
        return x
    return x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
