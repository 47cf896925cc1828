"""The HyperConv decoder's training step: loragen's HyperConvDecoder vs a straightforward reference decoder.

The reference below is written from DESIGN.md ("HyperConv generator"), the plain DnD way: every conv is an
nn.Conv2d called on a transposed view (the axis it mixes as the channels, the other two as its k x k
spatial window), LayerNorm over (H, W), branch A = conv over W then over H, branch B = conv over H then
over W then tanh, (A + B + bias[H', W']) / 3, a k x k channel conv, a skip connection where a layer's
input and output shapes match (never on the last layer). Its parameters have the same names and shapes as
loragen's, so one state_dict loads into both.

Measured: one full training step (forward, MSE loss, backward, AdamW step) at DnD's small shapes
(16,64,384) -> (32,32,192) -> (64,16,96) -> (192,8,48), kernel 5, batch 4, the two sides alternated after
a warm-up; ratio = reference median / loragen median. run() first checks that both give the same output on
the same weights (and raises if not) and that they have the same parameter count.
"""

from __future__ import annotations

import statistics
import time
from itertools import pairwise
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loragen.models.hyperconv import HyperConvDecoder

FEATURES = [(16, 64, 384), (32, 32, 192), (64, 16, 96), (192, 8, 48)]
KERNEL, BATCH = 5, 4
WARMUP, REPEATS = 2, 15
RTOL = 1e-5  # max |ours - reference| allowed, relative to max |reference| (fp32 rounding of ~10^4-term sums)


class ReferenceHyperConv(nn.Module):
    """One layer, (B, C, H, W) -> (B, C', H', W'), as DESIGN.md describes it."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], kernel_size: int):
        super().__init__()
        (c, h, w), (c2, h2, w2), k = in_shape, out_shape, kernel_size
        self.norm = nn.LayerNorm([h, w])
        self.conv_w_a = nn.Conv2d(w, w2, k, padding=k // 2, bias=False)  # W as channels, (H, C) spatial
        self.conv_h_a = nn.Conv2d(h, h2, k, padding=k // 2, bias=False)  # H as channels, (C, W) spatial
        self.conv_h_b = nn.Conv2d(h, h2, k, padding=k // 2, bias=False)
        self.conv_w_b = nn.Conv2d(w, w2, k, padding=k // 2, bias=False)
        self.bias = nn.Parameter(torch.zeros(h2, w2))
        self.channel_conv = nn.Conv2d(c, c2, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)                                                   # (B, C, H, W)
        a = self.conv_w_a(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)      # (B, C, H, W')
        a = self.conv_h_a(a.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)      # (B, C, H', W')
        b = self.conv_h_b(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)      # (B, C, H', W)
        b = self.conv_w_b(b.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)      # (B, C, H', W')
        return self.channel_conv((a + torch.tanh(b) + self.bias) / 3)


class ReferenceDecoder(nn.Module):
    """The chain through `features`; base (optional) is added to the output, as with generator.residual."""

    def __init__(self, features: Sequence[Sequence[int]], kernel_size: int, base: torch.Tensor | None = None):
        super().__init__()
        shapes = [tuple(int(v) for v in f) for f in features]
        self.layers = nn.ModuleList(ReferenceHyperConv(i, o, kernel_size) for i, o in pairwise(shapes))
        self.skips = [i == o for i, o in pairwise(shapes)][:-1] + [False]
        if base is not None:
            self.register_buffer("base", base.detach().float().clone())
        else:
            self.base = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, skip in zip(self.layers, self.skips, strict=True):
            x = x + layer(x) if skip else layer(x)
        return x if self.base is None else x + self.base


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach(), ref.detach()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _stepper(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.1)

    def step() -> float:
        t0 = time.perf_counter()
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def _spread(times: list[float]) -> str:
    return f"median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def run() -> list[dict]:
    torch.manual_seed(0)
    ours = HyperConvDecoder(FEATURES, KERNEL)
    ref = ReferenceDecoder(FEATURES, KERNEL)
    ref.load_state_dict(ours.state_dict())
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    assert n_ours == n_ref, f"parameter counts differ: loragen {n_ours}, reference {n_ref}"
    x = torch.randn(BATCH, *FEATURES[0])
    target = torch.randn(BATCH, *FEATURES[-1])
    with torch.no_grad():
        err = relative_error(ours(x), ref(x))
    if not err <= RTOL:
        raise RuntimeError(f"loragen's HyperConvDecoder and the reference differ on the same weights: max |diff| = "
                           f"{err:.2e} of the output scale (allowed {RTOL:.0e})")

    steps = {"reference": _stepper(ref, x, target), "loragen": _stepper(ours, x, target)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(WARMUP):
        for step in steps.values():
            step()
    for _ in range(REPEATS):
        for name, step in steps.items():  # alternated: ref, ours, ref, ours, ...
            times[name].append(step())
    ref_s, ours_s = statistics.median(times["reference"]), statistics.median(times["loragen"])
    return [{
        "name": "hyperconv_train_step",
        "metric": f"s per training step (features {[list(f) for f in FEATURES]}, kernel {KERNEL}, batch {BATCH}, "
                  f"{n_ours / 1e6:.2f}M params, fwd+MSE+bwd+AdamW)",
        "loragen": ours_s, "reference": ref_s, "ratio": ref_s / ours_s, "target": ">= 1.3",
        "notes": f"{REPEATS} alternated steps each after {WARMUP} warm-up, torch threads {torch.get_num_threads()}; "
                 f"loragen {_spread(times['loragen'])}; reference {_spread(times['reference'])}; "
                 f"same output on the same weights: max |diff| {err:.1e} of the output scale",
    }]
