"""hardware.cpu_linear=onednn: float32 CPU linears through oneDNN give F.linear's values and gradients (checked
against float64), fall back to F.linear where they should, and keep a model's parameters and LoRA wrapping."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from loragen.errors import ConfigError
from loragen.lora.init import attach_lora
from loragen.models import load_model
from loragen.models.cpu_linear import MIN_ROWS, OneDNNLinear, available, onednn_linear, route_linears
from loragen.stages.checks import check_hardware
from tests.conftest import CONF

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN")


def _close(a: torch.Tensor, ref64: torch.Tensor) -> float:
    """Largest error relative to the reference's scale."""
    a, ref64 = a.detach().double(), ref64.detach()
    return float((a - ref64).abs().max() / ref64.abs().max())


@pytest.mark.parametrize("shape", [(40, 96), (3, 50, 96), (2, 7, 96)])
def test_values_and_gradients_match_float64(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(160, 96, requires_grad=True)
    b = torch.randn(160, requires_grad=True)
    g = torch.randn(*shape[:-1], 160)
    y = onednn_linear(x, w, b)
    y.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.linear(x64, w64, b64)
    y64.backward(g.double())
    assert y.shape == y64.shape and y.dtype == torch.float32
    assert _close(y, y64) < 1e-6
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert _close(got, want) < 1e-6


def test_strided_input_and_no_bias():
    torch.manual_seed(1)
    x = torch.randn(8, 30, 128)[:, ::2]  # not contiguous
    w = torch.randn(64, 128)
    assert _close(onednn_linear(x, w), F.linear(x.double(), w.double())) < 1e-6


def test_falls_back_to_f_linear_exactly():
    """Where oneDNN does not pay or does not apply, the result is F.linear's, bit for bit."""
    torch.manual_seed(2)
    w, b = torch.randn(64, 96), torch.randn(64)
    few = torch.randn(MIN_ROWS - 1, 96)
    assert torch.equal(onednn_linear(few, w, b), F.linear(few, w, b))
    x64 = torch.randn(20, 96, dtype=torch.float64)
    assert torch.equal(onednn_linear(x64, w.double(), b.double()), F.linear(x64, w.double(), b.double()))
    xb = torch.randn(20, 96).bfloat16()
    assert torch.equal(onednn_linear(xb, w.bfloat16(), b.bfloat16()), F.linear(xb, w.bfloat16(), b.bfloat16()))


def _tiny(paths, backend: str):
    return load_model(OmegaConf.load(CONF / "model" / "tiny_qwen2.yaml"), paths, "fp32", "cpu", backend)


def test_load_model_routes_and_back(paths, monkeypatch):
    import loragen.models.cpu_linear as cl

    calls = []
    product = cl._product
    monkeypatch.setattr(cl, "_product", lambda *a: calls.append(a[1].shape) or product(*a))
    torch.manual_seed(0)
    plain = _tiny(paths, "torch").model
    routed = _tiny(paths, "onednn").model
    n = sum(type(m) is OneDNNLinear for m in routed.modules())
    assert n > 0 and n == sum(type(m) is torch.nn.Linear and min(m.in_features, m.out_features) >= 32
                              for m in plain.modules())
    assert routed.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, plain.config.vocab_size, (4, 24))
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        assert not calls
        got = routed(input_ids=ids).logits
        assert len(calls) == n  # every routed layer ran oneDNN's product once
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
        assert route_linears(routed, "torch") == 0
        assert not any(type(m) is OneDNNLinear for m in routed.modules())
        assert torch.equal(routed(input_ids=ids).logits, want)


def test_lora_on_routed_model_trains_like_the_plain_one(paths):
    """PEFT wraps the routed layers as it wraps nn.Linear; the LoRA gradients agree with the plain model's."""
    grads = {}
    for backend in ("torch", "onednn"):
        lm = _tiny(paths, backend)
        model = attach_lora(lm.model, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"], init_seed=0)
        with torch.no_grad():  # a nonzero B, so the gradients reach A too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        ids = torch.arange(48).view(2, 24) % lm.model.config.vocab_size
        model(input_ids=ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["torch"].keys() == grads["onednn"].keys() and len(grads["torch"]) > 0
    for name, want in grads["torch"].items():
        got = grads["onednn"][name]
        assert float(want.abs().max()) > 0
        assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max()), name


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match=r"hardware.cpu_linear='mkl'; expected one of \['onednn', 'torch'\]"):
        check_hardware(OmegaConf.create({"precision": "fp32", "cpu_linear": "mkl"}))
    with pytest.raises(ConfigError, match="hardware.cpu_linear"):
        route_linears(torch.nn.Linear(64, 64), "mkl")
