"""The HyperConv decoder of DnD: prompt-encoder states [B, N, L, C] -> LoRA token tensors [B, T, h, w].

A layer maps feature maps of shape (C, H, W) to (C', H', W'):
LayerNorm over (H, W); branch A convolves over W (W as the channels) then over H; branch B over H then
over W, then tanh; the two and a learned bias[H', W'] are averaged; a k x k channel conv maps C to C'.
The chain adds a skip connection wherever a layer's input and output shapes match.

Speed (bench `hyperconv`, issue [4/5]): on CPU the five convolutions of a layer are nearly all of a training
step and oneDNN's direct convolution already runs near the core's peak, so the layer does fewer multiplications
instead: a k x k "same" convolution runs as a one-dimensional Winograd convolution F(m, k) (Toom-Cook, points
0, +-1, +-2, +-1/2, infinity; tiles of alpha = m + k - 1 = 8 rows: m = 4 for k = 5, 6 for k = 3) along its longer
spatial axis and a direct 1 x k convolution along the other: alpha / (m k) = 0.4 (k = 5) and 0.44 (k = 3) of the
multiplications. The alpha products are separate 1 x k convolutions in channels-last layout (about 1.5x faster
than one grouped NCHW convolution on the bench's CPU), and the transforms' transient operands live in reused scratch
buffers (a fresh 12 MB buffer costs more in page faults than the transform that fills it). The parameters are the
same nn.Conv2d modules as before (state_dict unchanged, old checkpoints load). The results equal the direct
convolution's to fp32 rounding: in float64 to 1e-10 (tests/test_hyperconv_speed.py); in float32 the bench decoder
is 4.4e-6 of the output scale from the fp32 reference (2.0e-6 with the grouped NCHW products; oneDNN's
channels-last kernel sums the k * channels products of a point in a longer chain; small_minilm's k = 3 decoder:
4.8e-6 from float64, the direct one 1.2e-6). Direct convolution stays where the transforms cost more than they
save (k = 7 and 9, few channels, inputs whose channels are not their innermost dim: a layer's H-axis and channel
convs), off the CPU (cuDNN picks its own algorithms, Winograd included) and for half precision (fp16/bf16 rounding
would be amplified by the transforms).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from itertools import pairwise
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from loragen.errors import ConfigError

Shape = tuple[int, int, int]

WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0)
# kernel size -> output rows m per tile of alpha = m + k - 1 = 8 (alpha 10 grows the fp32 error ~10x). Measured on
# the 2-core CPU of bench `hyperconv` (2 threads, fwd + bwd per conv, the channels-last products): the W-axis convs
# pay for k=5 (2.2x at 384 -> 192 channels, 1.45x at 192 -> 96, 0.91x at 96 -> 48) and k=3 (small_minilm's:
# 1.53x, 1.53x, 1.34x, 1.20x at 73728 down to 6600 in x out channels); k=7 (F(2,7)) broke even with the grouped
# products and stays direct (no config uses it).
WINOGRAD_TILE = {3: 6, 5: 4}
WINOGRAD_MIN_MACS = 6000  # in x out channels below which the transforms cost more than they save


@functools.lru_cache(maxsize=None)
def _winograd_f64(m: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A^T [m, a], G [a, r], B^T [a, a] of the 1-D Winograd correlation F(m, r): y = A^T ((G g) * (B^T d)).

    Toom-Cook by the transposition principle: the product of polynomials of degrees r-1 and m-1 is evaluated
    at a = m + r - 1 points (the last at infinity: the leading coefficients) and interpolated; the correlation
    is the transpose of that linear map in the data.
    """
    a = m + r - 1
    pts = WINOGRAD_POINTS[: a - 1]

    def vander(n: int) -> torch.Tensor:
        rows = [[p**i for i in range(n)] for p in pts] + [[0.0] * (n - 1) + [1.0]]
        return torch.tensor(rows, dtype=torch.float64)

    return vander(m).T.contiguous(), vander(r), torch.linalg.inv(vander(a)).T.contiguous()


@functools.lru_cache(maxsize=64)
def _winograd(m: int, r: int, dtype: torch.dtype, device: torch.device):
    return tuple(t.to(dtype=dtype, device=device) for t in _winograd_f64(m, r))


_SCRATCH: OrderedDict[tuple, torch.Tensor] = OrderedDict()
SCRATCH_BUFFERS = 64  # at most this many kept, least recently used dropped: DnD's small shapes use 19 (96 MB)


def _scratch(role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reused buffer for a transform's transient operand (dead when the call returns), one per role and shape.

    A fresh tensor of this size is paid for in page faults when first written: on the bench's VM a 12 MB
    transform into new memory took 3.7 ms, into a reused buffer 1.5 ms. Keyed by thread as well, so decoders
    run from two threads never share one.
    """
    key = (role, shape, like.dtype, like.device, threading.get_ident())
    buf = _SCRATCH.pop(key, None)
    if buf is None:
        buf = like.new_empty(shape)
    _SCRATCH[key] = buf
    while len(_SCRATCH) > SCRATCH_BUFFERS:
        _SCRATCH.popitem(last=False)
    return buf


def release_scratch() -> None:
    """Drop every scratch buffer (the next Winograd convolution allocates afresh): for the end of a stage."""
    _SCRATCH.clear()


class _WinogradRows(torch.autograd.Function):
    """y = conv2d(x, w, padding='same') with F(m, r) along dim 2 of x [n, ci, s1, s2] and 1 x r along dim 3.

    The a = m + r - 1 products are separate 1 x r convolutions in channels-last layout, point i's input and
    output contiguous slices [n, tiles, s2, channels] of one [a, ...] tensor: on the bench's CPU that is about 1.5x
    faster than one grouped NCHW convolution over all a points (48-54 against 74-79 ms forward + backward for the
    first layer's big conv), and the transforms become single [a, a] x [a, rest] matrix products over the leading
    dim. The W-axis convs of a HyperConv layer have the layer's innermost W as
    their channels, so every gather into and out of this layout copies contiguous runs. Saves the transformed input
    (a / m times the input's size) and weights for backward; no double backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, m: int) -> torch.Tensor:
        n, ci, s1, s2 = x.shape
        co, _, r, _ = weight.shape
        a, p = m + r - 1, r // 2
        at, g, bt = _winograd(m, r, x.dtype, x.device)
        tiles = -(-s1 // m)
        wt = _scratch("w", (r, co, r, ci), weight)
        wt.copy_(weight.permute(2, 0, 3, 1))
        u = (g @ wt.view(r, -1)).view(a, co, 1, r, ci)  # point i: [co, 1, r, ci]
        d = _scratch("in", (a, n, tiles, s2, ci), x)  # d[j, :, t] = row t * m + j - p of x, zero outside
        for j in range(a):
            t0, t1 = max(0, -(-(p - j) // m)), min(tiles, (s1 - 1 - j + p) // m + 1)
            first = t0 * m + j - p
            d[j, :, t0:t1] = x[:, :, first : first + (t1 - t0 - 1) * m + 1 : m].permute(0, 2, 3, 1)
            d[j, :, :t0] = 0
            d[j, :, t1:] = 0
        v = torch.matmul(bt, d.view(a, -1)).view(a, n, tiles, s2, ci)
        prods = _scratch("out", (a, n, tiles, s2, co), x)
        torch.stack([F.conv2d(v[i].permute(0, 3, 1, 2), u[i].permute(0, 3, 1, 2), padding=(0, p)).permute(0, 2, 3, 1)
                     for i in range(a)], out=prods)
        ym = torch.matmul(at, prods.view(a, -1), out=_scratch("rows", (m, n * tiles * s2 * co), x))
        y = x.new_empty(n, s2, tiles * m, co)  # new memory: a reshape could be a view of the scratch buffer
        y.view(n, s2, tiles, m, co).copy_(ym.view(m, n, tiles, s2, co).permute(1, 3, 2, 0, 4))
        y = y[:, :, :s1]
        ctx.save_for_backward(v, u)
        ctx.m, ctx.s1 = m, s1
        return y.permute(0, 3, 2, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor):
        v, u = ctx.saved_tensors
        m, s1 = ctx.m, ctx.s1
        a, n, tiles, s2, ci = v.shape
        co, r = u.shape[1], u.shape[3]
        p = r // 2
        at, g, bt = _winograd(m, r, v.dtype, v.device)
        gq = _scratch("rows", (m, n * tiles * s2 * co), v).view(m, n, tiles, s2, co)
        gy = gy if tiles * m == s1 else F.pad(gy, (0, 0, 0, tiles * m - s1))
        gq[:] = gy.unflatten(2, (tiles, m)).permute(3, 0, 2, 4, 1)
        gp = torch.matmul(at.T, gq.view(m, -1), out=_scratch("out", (a, n, tiles, s2, co), v).view(a, -1))
        gp = gp.view(a, n, tiles, s2, co)
        need_x, need_w = ctx.needs_input_grad[:2]
        gvs, gus = [], []
        for i in range(a):
            gv, gu, _ = torch.ops.aten.convolution_backward(
                gp[i].permute(0, 3, 1, 2), v[i].permute(0, 3, 1, 2), u[i].permute(0, 3, 1, 2), None, [1, 1], [0, p],
                [1, 1], False, [0, 0], 1, [need_x, need_w, False])
            gvs.append(gv)
            gus.append(gu)
        gw = None
        if need_w:  # w[o, c, j, s] = sum_i G[i, j] u_i[o, c, s]
            gu = torch.stack([t.permute(0, 2, 3, 1) for t in gus], out=_scratch("gu", (a, co, 1, r, ci), v))
            gwt = torch.matmul(g.T, gu.view(a, -1), out=_scratch("w", (r, co, r, ci), v).view(r, -1))
            gw = gwt.new_empty(co, ci, r, r)  # contiguous, as the parameter's .grad will be: no copy there
            gw.copy_(gwt.view(r, co, r, ci).permute(1, 3, 0, 2))
        gx = None
        if need_x:
            gv = torch.stack([t.permute(0, 2, 3, 1) for t in gvs], out=_scratch("gin", (a, n, tiles, s2, ci), v))
            gd = torch.matmul(bt.T, gv.view(a, -1), out=_scratch("in", (a, n, tiles, s2, ci), v).view(a, -1))
            gd = gd.view(a, n, tiles, s2, ci)
            # fold the tiles back: row t * m + j of the padded input gets gd[j, :, t]; a tile spans `blocks` blocks
            blocks = -(-a // m)
            gxp = gd.new_empty(n, s2, tiles + blocks - 1, m, ci)
            gxp[:, :, :tiles] = gd[:m].permute(1, 3, 2, 0, 4)
            gxp[:, :, tiles:] = 0
            for b in range(1, blocks):
                rows = min(m, a - b * m)
                gxp[:, :, b : b + tiles, :rows] += gd[b * m : b * m + rows].permute(1, 3, 2, 0, 4)
            gx = gxp.view(n, s2, -1, ci)[:, :, p : p + s1].permute(0, 3, 2, 1)
        return gx, gw, None


def _winograd_rows(x: torch.Tensor, weight: torch.Tensor, m: int) -> torch.Tensor:
    """conv2d(x, weight, padding='same') with F(m, r) along dim 2 and a direct 1 x r conv along dim 3."""
    return _WinogradRows.apply(x, weight, m)


def conv_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding='same') for an odd square kernel, Winograd along the longer axis when it pays.

    It pays only where x's channels are its innermost dim (stride 1; a HyperConv layer's W-axis convs): the
    transforms gather the input into channels-last tiles, which is a run of contiguous copies there and a strided
    gather elsewhere (the H-axis and channel convs: 0.5-0.9x measured)."""
    r = weight.shape[-1]
    m = WINOGRAD_TILE.get(r, 0)
    s1, s2 = x.shape[2:]
    if (m < 2 or max(s1, s2) < m or weight.shape[0] * weight.shape[1] < WINOGRAD_MIN_MACS
            or (x.stride(1) != 1 and x.shape[1] > 1)
            or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)):
        return F.conv2d(x, weight, bias, padding=r // 2)
    if s2 > s1:
        y = _winograd_rows(x.transpose(2, 3), weight.transpose(2, 3), m).transpose(2, 3)
    else:
        y = _winograd_rows(x, weight, m)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


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
        return conv_same(x.transpose(1, dim), conv.weight, conv.bias).transpose(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        a = self._over(self.conv_h_a, self._over(self.conv_w_a, x, 3), 2)
        b = torch.tanh(self._over(self.conv_w_b, self._over(self.conv_h_b, x, 2), 3))
        return conv_same(torch.add(a, b).add_(self.bias).div_(3), self.channel_conv.weight, self.channel_conv.bias)


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
