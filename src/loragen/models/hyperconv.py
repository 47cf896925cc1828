"""The HyperConv decoder of DnD: prompt-encoder states [B, N, L, C] -> LoRA token tensors [B, T, h, w].

A layer maps feature maps of shape (C, H, W) to (C', H', W'):
LayerNorm over (H, W); branch A convolves over W (W as the channels) then over H; branch B over H then
over W, then tanh; the two and a learned bias[H', W'] are averaged; a k x k channel conv maps C to C'.
The chain adds a skip connection wherever a layer's input and output shapes match.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Sequence

import torch
from torch import nn

from loragen.errors import ConfigError

Shape = tuple[int, int, int]


class HyperConv(nn.Module):
    """One HyperConv layer, (B, C, H, W) -> (B, C', H', W')."""

    def __init__(self, in_shape: Shape, out_shape: Shape, kernel_size: int):
        super().__init__()
        c_in, h_in, w_in = in_shape
        c_out, h_out, w_out = out_shape
        k = kernel_size
        self.norm = nn.LayerNorm([h_in, w_in])
        self.conv_w_a = nn.Conv2d(w_in, w_out, k, padding="same", bias=False)
        self.conv_h_a = nn.Conv2d(h_in, h_out, k, padding="same", bias=False)
        self.conv_h_b = nn.Conv2d(h_in, h_out, k, padding="same", bias=False)
        self.conv_w_b = nn.Conv2d(w_in, w_out, k, padding="same", bias=False)
        self.bias = nn.Parameter(torch.empty(h_out, w_out).uniform_(-1.0 / (h_out * w_out), 1.0 / (h_out * w_out)))
        self.channel_conv = nn.Conv2d(c_in, c_out, k, padding="same")

    @staticmethod
    def _over(conv: nn.Conv2d, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Apply `conv` with axis `dim` of (B, C, H, W) as its channels; the other two are spatial."""
        return conv(x.transpose(1, dim)).transpose(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        a = self._over(self.conv_h_a, self._over(self.conv_w_a, x, 3), 2)
        b = torch.tanh(self._over(self.conv_w_b, self._over(self.conv_h_b, x, 2), 3))
        return self.channel_conv((a + b + self.bias) / 3)


class HyperConvDecoder(nn.Module):
    """The chain of HyperConv layers through `features`; optionally a residual over a base token tensor.

    With `base` (the mean training checkpoint's tokens), the output is base + decoder(x) and the last
    layer's channel conv starts at zero, so an untrained generator returns the mean adapter. The last
    layer never has a skip connection: its output is the token tensor (or its difference from base).
    """

    def __init__(self, features: Sequence[Sequence[int]], kernel_size: int, base: torch.Tensor | None = None,
                 border_bound: Sequence[float] | None = None):
        super().__init__()
        self.features = check_features(features, kernel_size)
        self.border_bound = None if border_bound is None else check_border_bound(border_bound, self.features[-1])
        self.layers = nn.ModuleList(
            HyperConv(i, o, kernel_size) for i, o in pairwise(self.features)
        )
        self.skips = [i == o for i, o in pairwise(self.features)]
        self.skips[-1] = False
        if base is not None:
            if tuple(base.shape) != self.features[-1]:
                raise ConfigError(
                    f"generator.features ends with {list(self.features[-1])} but the mean checkpoint's tokens "
                    f"have shape {list(base.shape)}"
                )
            nn.init.zeros_(self.layers[-1].channel_conv.weight)
            nn.init.zeros_(self.layers[-1].channel_conv.bias)
            self.register_buffer("base", base.detach().float().clone())
        else:
            self.base = None

    @property
    def in_shape(self) -> Shape:
        return self.features[0]

    @property
    def out_shape(self) -> Shape:
        return self.features[-1]

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if tuple(cond.shape[1:]) != self.in_shape:
            raise ConfigError(
                f"generator input has shape {list(cond.shape[1:])} per sample; generator.features[0] "
                f"expects {list(self.in_shape)} (num_prompts, prompt_len, encoder hidden size)"
            )
        x = cond
        for layer, skip in zip(self.layers, self.skips, strict=True):
            y = layer(x)
            x = x + y if skip else y
        if self.border_bound is not None:
            x = bound_borders(x, *self.border_bound)
        return x + self.base if self.base is not None else x


def check_border_bound(bound: Sequence[float], out_shape: Shape) -> tuple[float, float]:
    if len(bound) != 2 or min(float(b) for b in bound) <= 0:
        raise ConfigError(f"generator.border_bound = {list(bound)}; expected [mean code, std code] half-widths > 0 "
                          f"(or null)")
    if min(out_shape[1:]) < 3:
        raise ConfigError(f"generator.border_bound needs dnd tokens ((r+2) x (c+2) with a border); the output "
                          f"tokens are {list(out_shape[1:])}")
    return float(bound[0]), float(bound[1])


def bound_borders(x: torch.Tensor, mean_width: float, std_width: float) -> torch.Tensor:
    """Squash the dnd border cells of `x` [..., r+2, c+2] smoothly into +-width (`w * tanh(v / w)`).

    The border cells are the mean code (top row, left column) and the std code (bottom row, right column) of
    each token's chunk; decoding turns the std code into exp(code), so an unbounded move of a few units
    multiplies a whole chunk of the adapter by orders of magnitude (the collapse of the task-objective
    generators in the README). The data cells (z-scores) stay as they are.
    """
    h, w = x.shape[-2:]
    mean_mask = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    mean_mask[0, :] = True
    mean_mask[1 : h - 1, 0] = True
    std_mask = torch.zeros_like(mean_mask)
    std_mask[h - 1, :] = True
    std_mask[1 : h - 1, w - 1] = True
    x = torch.where(mean_mask, mean_width * torch.tanh(x / mean_width), x)
    return torch.where(std_mask, std_width * torch.tanh(x / std_width), x)


def check_features(features: Sequence[Sequence[int]], kernel_size: int) -> list[Shape]:
    shapes = []
    for i, f in enumerate(features):
        f = tuple(int(v) for v in f)
        if len(f) != 3 or min(f) < 1:
            raise ConfigError(f"generator.features[{i}] = {list(f)}; expected [channels, H, W] of positive ints")
        shapes.append(f)
    if len(shapes) < 2:
        raise ConfigError(f"generator.features has {len(shapes)} shape(s); expected at least 2 (input and output)")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"generator.kernel_size = {kernel_size}; expected an odd positive int (same padding)")
    return shapes


def param_count(features: Sequence[Sequence[int]], kernel_size: int) -> int:
    """Parameters of HyperConvDecoder(features, kernel_size), computed without building it."""
    shapes = check_features(features, kernel_size)
    k2 = kernel_size * kernel_size
    total = 0
    for (c, h, w), (c2, h2, w2) in pairwise(shapes):
        total += 2 * h * w  # LayerNorm weight and bias
        total += 2 * (w * w2 + h * h2) * k2  # the W and H convs of both branches
        total += h2 * w2  # bias[H', W']
        total += c * c2 * k2 + c2  # channel conv
    return total
