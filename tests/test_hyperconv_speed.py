"""The Winograd HyperConv decoder computes the same function as the straightforward reference (bench/hyperconv.py).

Tiny CPU shapes; WINOGRAD_MIN_MACS is lowered where needed so that the fast path really runs on them.
"""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from loragen.bench.hyperconv import ReferenceDecoder, relative_error
from loragen.models import hyperconv
from loragen.models.hyperconv import HyperConvDecoder, conv_same


@pytest.fixture
def always_winograd(monkeypatch):
    """The transforms for every kernel size the code supports (k=3 and 7 are off by default: they did not pay)."""
    monkeypatch.setattr(hyperconv, "WINOGRAD_MIN_MACS", 0)
    monkeypatch.setattr(hyperconv, "WINOGRAD_TILE", {3: 6, 5: 4, 7: 2})


def _channels_last(shape, generator=None, dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    """A tensor of `shape` (n, c, h, w) whose channels are its innermost dim, as a HyperConv W-axis conv's input
    is (the Winograd path's layout condition)."""
    n, c, h, w = shape
    x = torch.randn(n, h, w, c, generator=generator, dtype=dtype, requires_grad=requires_grad)
    return x.permute(0, 3, 1, 2)


def _count_winograd(monkeypatch) -> list[int]:
    calls = []
    apply = hyperconv._WinogradRows.apply
    monkeypatch.setattr(hyperconv._WinogradRows, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", [(2, 3, 13, 6), (1, 2, 5, 17), (2, 4, 8, 8)])
def test_conv_same_is_conv2d_in_float64(always_winograd, monkeypatch, k, shape):
    """In float64 the Winograd rounding vanishes: equal to F.conv2d to 1e-10, odd lengths and both axes included."""
    calls = _count_winograd(monkeypatch)
    g = torch.Generator().manual_seed(k)
    x = _channels_last(shape, g, torch.float64, requires_grad=True)
    w = torch.randn(5, shape[1], k, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    y, ref = conv_same(x, w, b), F.conv2d(x, w, b, padding=k // 2)
    assert calls, "the Winograd path did not run"
    assert y.shape == ref.shape and relative_error(y, ref) < 1e-10
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for ours, theirs in zip(torch.autograd.grad(y, (x, w), go), torch.autograd.grad(ref, (x, w), go), strict=True):
        assert relative_error(ours, theirs) < 1e-10


def test_conv_same_falls_back_to_conv2d(monkeypatch):
    calls = _count_winograd(monkeypatch)
    x = _channels_last((1, 4, 6, 6))
    for k in (1, 3, 5, 7, 9):  # 3 x 4 channels: too few to pay; k = 1, 7, 9: direct
        w = torch.randn(3, 4, k, k)
        assert torch.equal(conv_same(x, w), F.conv2d(x, w, padding=k // 2))
    x, w = _channels_last((1, 128, 8, 8), dtype=torch.bfloat16), torch.randn(128, 128, 5, 5, dtype=torch.bfloat16)
    assert torch.equal(conv_same(x, w), F.conv2d(x, w, padding=2))  # half precision: transforms would cost accuracy
    x = x.float()
    assert torch.equal(conv_same(x.contiguous(), w.float()), F.conv2d(x.contiguous(), w.float(), padding=2))  # NCHW
    assert not calls
    conv_same(x, w.float())
    assert calls  # the same shape in fp32 with channels innermost does take the Winograd path


@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (2, 6, 9, 5)])  # one tile (s1 = m) and a ragged last tile
def test_scratch_buffers_never_leak_into_results(always_winograd, monkeypatch, shape):
    """The transforms reuse scratch buffers between calls: two convs of the same shapes, run forward one after the
    other and then backward, keep outputs and gradients equal to F.conv2d's (each computed alone in float64)."""
    calls = _count_winograd(monkeypatch)
    g = torch.Generator().manual_seed(shape[2])
    xs = [_channels_last(shape, g, torch.float64, requires_grad=True) for _ in range(2)]
    ws = [torch.randn(4, shape[1], 5, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ys = [conv_same(x, w) for x, w in zip(xs, ws)]
    assert len(calls) == 2
    gos = [torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ys]
    grads = [torch.autograd.grad(y, (x, w), go) for y, x, w, go in zip(ys, xs, ws, gos)]
    for y, x, w, go, got in zip(ys, xs, ws, gos, grads):
        ref = F.conv2d(x, w, padding=2)
        assert relative_error(y, ref) < 1e-10
        for ours, theirs in zip(got, torch.autograd.grad(ref, (x, w), go), strict=True):
            assert relative_error(ours, theirs) < 1e-10


def _random_params(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 4 else 1.0))


CHAIN = [[3, 10, 12], [4, 9, 10], [4, 9, 10], [5, 6, 7]]  # layer 2 keeps its shape: a skip connection


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("residual", [False, True])
def test_decoder_equals_reference_outputs_and_gradients(always_winograd, monkeypatch, k, residual):
    calls = _count_winograd(monkeypatch)
    g = torch.Generator().manual_seed(10 * k + residual)
    base = torch.randn(*CHAIN[-1], generator=g) if residual else None
    ours = HyperConvDecoder(CHAIN, k, base=base)
    _random_params(ours, k)
    ref = ReferenceDecoder(CHAIN, k, base=base)
    ref.load_state_dict(ours.state_dict())
    assert ours.skips == ref.skips == [False, True, False]
    x = torch.randn(2, *CHAIN[0], generator=g)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    assert calls, "the Winograd path did not run"
    assert yo.shape == yr.shape == (2, *CHAIN[-1])
    assert relative_error(yo, yr) < 1e-5
    go = torch.randn(yr.shape, generator=g)
    (yo * go).sum().backward()
    (yr * go).sum().backward()
    assert relative_error(xo.grad, xr.grad) < 1e-5
    scale = max(q.grad.abs().max() for q in ref.parameters())
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        # relative to the grad's own size, or 1% of the largest one: a layer's channel-conv bias feeds the next
        # LayerNorm, which cancels it, so its grad is rounding noise around 0
        assert (p.grad - q.grad).abs().max() <= 1e-4 * max(q.grad.abs().max(), 1e-2 * scale), name


def test_a_stage_releases_the_scratch_buffers(always_winograd, monkeypatch):
    """run_stage drops the transforms' buffers when a stage ends, a failing one too (the pipeline runs the next
    stage in the same process)."""
    import sys
    import types

    from omegaconf import OmegaConf

    from loragen.stages import checks, run_stage

    def fake_run(cfg):
        conv_same(_channels_last((1, 4, 8, 8)), torch.randn(3, 4, 5, 5))
        assert hyperconv._SCRATCH
        raise RuntimeError("boom")

    monkeypatch.setitem(sys.modules, "loragen.stages.report", types.SimpleNamespace(run=fake_run))
    monkeypatch.setattr(checks, "validate", lambda cfg: None)
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(OmegaConf.create({"seed": 0, "stage": {"name": "report"}}))
    assert not hyperconv._SCRATCH


SMALL_MINILM = [(32, 64, 384), (64, 32, 192), (128, 16, 100), (128, 16, 100), (144, 10, 66)]  # conf/generator


@pytest.mark.parametrize("features, kernel, expected", [
    (None, 5, 4),  # bench FEATURES: the W convs of layers 1-2; layer 3's (96 x 48 channels) lost, 0.91x
    (SMALL_MINILM, 3, 8),  # the demo's generator: all four layers' W convs (6600-73728 channels), F(6, 3)
])
def test_default_shapes_take_the_winograd_path_on_w_convs_only(monkeypatch, features, kernel, expected):
    """The default thresholds send the W-axis convs that paid in the bench through Winograd, and no H-axis or
    channel conv (their inputs do not have channels innermost: the gathers cost more than the transforms save)."""
    calls = _count_winograd(monkeypatch)
    from loragen.bench.hyperconv import FEATURES

    features = features or FEATURES
    dec = HyperConvDecoder(features, kernel)
    with torch.no_grad():
        dec(torch.randn(1, *features[0]))
    assert len(calls) == expected


def test_state_dict_of_the_reference_layout_loads(tmp_path):
    """Parameter names and shapes are those of the straightforward layout (nn.Conv2d per conv), so generator
    checkpoints written before the Winograd path load unchanged, through safetensors as stage=generator saves them."""
    torch.manual_seed(0)
    ref = ReferenceDecoder(CHAIN, 3, base=torch.randn(*CHAIN[-1]))
    _random_params(ref, 1)
    ours = HyperConvDecoder(CHAIN, 3, base=torch.zeros(*CHAIN[-1]))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    ours.load_state_dict(load_file(str(tmp_path / "model.safetensors")))  # strict
    x = torch.randn(2, *CHAIN[0])
    with torch.no_grad():
        assert relative_error(ours(x), ref(x)) < 1e-5
