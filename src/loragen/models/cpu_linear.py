"""float32 linear layers on the CPU through oneDNN instead of torch's default BLAS (`hardware.cpu_linear`).

torch's CPU wheels compute a float32 `F.linear` with MKL's sgemm, which takes its AVX2 code path on AMD CPUs.
On this project's EPYC (Zen 5, full-width AVX-512) that is half of what the cores do: 160 GFLOPS on 2 cores for
MiniLM's products, where oneDNN's matrix product (it dispatches on the instruction set, not the vendor) runs the
same products at 310-380 GFLOPS, down to a few rows (the 100-token groups of a training step). torch reaches
oneDNN's product through `torch.ops.mkldnn._linear_pointwise` (the op its own compiler emits for CPU linears),
which takes plain tensors and a transposed weight as a strided view, so nothing is copied or repacked. It has no
autograd formula; `OneDNNLinearFn` gives it one: the input's gradient is the same product with the transposed
weight, the weight's (only when it trains) and the bias's are torch's.

The same sums of the same products in another order: results move by float32 rounding only (tested against
float64). Only where it pays: float32 on the CPU outside autocast, at least MIN_ROWS rows and MIN_FEATURES input
and output features. Everything else (CUDA, half precision, a generation step's single row, a LoRA's rank-8
factors, a torch without oneDNN) is `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

BACKENDS = ("onednn", "torch")
MIN_ROWS = 8        # fewer rows: oneDNN's ~20 us call overhead outweighs its faster kernel (1-2 rows: 2x slower)
MIN_FEATURES = 32   # rank-8 LoRA factors: MKL's 10 us calls beat oneDNN's 25 us


def _product(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


class OneDNNLinearFn(torch.autograd.Function):
    """`F.linear` for float32 CPU tensors through oneDNN's product, forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2d if weight.requires_grad else None, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return _product(x2d, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1]).contiguous()
        gx = _product(g2d, weight.t(), None).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        gw = g2d.t() @ x2d if ctx.needs_input_grad[1] else None
        gb = g2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN where it pays (see the module's docstring)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.dim() >= 1 and x.numel() >= MIN_ROWS * x.shape[-1]
            and not torch.is_autocast_enabled("cpu")):
        return OneDNNLinearFn.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(torch.nn.Linear):
    """An nn.Linear (same parameters, state_dict and isinstance) whose forward is `onednn_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def route_linears(model: torch.nn.Module, backend: str) -> int:
    """Set every plain nn.Linear of `model` with at least MIN_FEATURES in and out to `backend` (onednn | torch),
    in place; returns how many layers run oneDNN now. Subclasses of nn.Linear (e.g. quantised layers) are left
    alone, and so are a rank-8 LoRA's factors (too few features)."""
    if backend not in BACKENDS:
        from loragen.errors import ConfigError

        raise ConfigError(f"hardware.cpu_linear={backend!r}; expected one of {BACKENDS}")
    target = OneDNNLinear if backend == "onednn" and available() else torch.nn.Linear
    count = 0
    for module in model.modules():
        if type(module) not in (torch.nn.Linear, OneDNNLinear):
            continue
        if min(module.in_features, module.out_features) >= MIN_FEATURES:
            module.__class__ = target
            count += target is OneDNNLinear
    return count
