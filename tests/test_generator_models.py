"""The generator's parts: HyperConv layer and chain, token loss, prompt encoder and its cache, configs."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from loragen.errors import ConfigError
from loragen.models.hyperconv import HyperConv, HyperConvDecoder, param_count
from loragen.models.token_loss import add_noise, token_loss, token_metrics, token_weights
from tests.conftest import compose

CHAIN = [[4, 8, 12], [6, 5, 7], [6, 5, 7], [3, 4, 6]]


def test_shapes_through_a_chain():
    torch.manual_seed(0)
    dec = HyperConvDecoder(CHAIN, kernel_size=3)
    seen = []
    for layer in dec.layers:
        layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    out = dec(torch.randn(2, 4, 8, 12))
    assert tuple(out.shape) == (2, 3, 4, 6)
    assert seen == [(2, 6, 5, 7), (2, 6, 5, 7), (2, 3, 4, 6)]
    assert sum(p.numel() for p in dec.parameters()) == param_count(CHAIN, 3)


def test_residual_only_where_shapes_match():
    torch.manual_seed(0)
    dec = HyperConvDecoder(CHAIN, kernel_size=3)
    assert dec.skips == [False, True, False]
    x = torch.randn(2, 4, 8, 12)
    h1 = dec.layers[0](x)
    h2 = h1 + dec.layers[1](h1)
    expected = dec.layers[2](h2)
    torch.testing.assert_close(dec(x), expected)
    # a chain whose last layer keeps the shape still has no skip there: its output is the tokens
    assert HyperConvDecoder([[3, 4, 5], [3, 4, 5]], 1).skips == [False]


def test_layer_is_the_design_formula():
    """With kernel 1 every conv is a matrix over one axis, so the layer can be written as einsums."""
    torch.manual_seed(1)
    layer = HyperConv((3, 4, 5), (2, 6, 7), kernel_size=1)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 4, 5)
    mu = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    xn = (x - mu) / torch.sqrt(var + 1e-5) * layer.norm.weight + layer.norm.bias
    m = lambda conv: conv.weight[:, :, 0, 0]  # noqa: E731  [out, in]
    a = torch.einsum("bchw,vw->bchv", xn, m(layer.conv_w_a))
    a = torch.einsum("bchv,gh->bcgv", a, m(layer.conv_h_a))
    b = torch.einsum("bchw,gh->bcgw", xn, m(layer.conv_h_b))
    b = torch.tanh(torch.einsum("bcgw,vw->bcgv", b, m(layer.conv_w_b)))
    mixed = (a + b + layer.bias) / 3
    expected = torch.einsum("bcgv,dc->bdgv", mixed, m(layer.channel_conv)) + layer.channel_conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_residual_mode_starts_at_the_mean_and_learns():
    torch.manual_seed(0)
    base = torch.randn(3, 4, 6)
    dec = HyperConvDecoder(CHAIN, kernel_size=3, base=base)
    out = dec(torch.randn(2, 4, 8, 12))
    assert torch.equal(out, base.expand(2, -1, -1, -1))
    out.square().sum().backward()
    assert dec.layers[-1].channel_conv.weight.grad.abs().sum() > 0
    assert "base" in dec.state_dict()


def test_border_bound_squashes_only_the_border_codes():
    """dnd tokens (r+2) x (c+2): top row + left column hold the mean code, bottom row + right column the std
    code. The bound must cap the moves of exactly those cells at +-m / +-s and leave the data cells alone."""
    from loragen.lora.tokenize.codec import decode_stats
    from loragen.models.hyperconv import bound_borders

    r, c, m, s = 2, 3, 0.1, 0.5
    x = torch.full((1, r + 2, c + 2), 50.0, requires_grad=True)
    y = bound_borders(x, m, s)
    mean_cells = [(0, j) for j in range(c + 2)] + [(i, 0) for i in range(1, r + 1)]
    std_cells = [(r + 1, j) for j in range(c + 2)] + [(i, c + 1) for i in range(1, r + 1)]
    for i, j in mean_cells:
        assert 0.099 < float(y[0, i, j]) <= m + 1e-6
    for i, j in std_cells:
        assert 0.49 < float(y[0, i, j]) <= s + 1e-6
    data = y[0, 1 : r + 1, 1 : c + 1]
    assert torch.equal(data, torch.full_like(data, 50.0))
    # near zero the bound is the identity (tanh'(0) = 1): an untrained residual generator is unchanged
    small = torch.full((1, r + 2, c + 2), 1e-4)
    torch.testing.assert_close(bound_borders(small, m, s), small, rtol=1e-6, atol=0)
    # gradients still flow through a saturated-but-finite border
    bound_borders(torch.full((1, r + 2, c + 2), 0.3, requires_grad=True), m, s).sum().backward()
    # a bounded move of the lora_B std code (init code at the floor) keeps the chunk's std below ~0.07
    floor_code = torch.tensor(-0.7025850929940455)
    _, std = decode_stats(torch.tensor(0.0), floor_code + s)
    assert float(std) < 0.08


def test_decoder_with_border_bound_keeps_the_residual_start_and_rejects_bad_bounds():
    torch.manual_seed(0)
    base = torch.randn(3, 4, 6)
    dec = HyperConvDecoder(CHAIN, kernel_size=3, base=base, border_bound=[0.1, 0.5])
    assert torch.equal(dec(torch.randn(2, 4, 8, 12)), base.expand(2, -1, -1, -1))
    with torch.no_grad():
        dec.layers[-1].channel_conv.bias.fill_(100.0)
    delta = dec(torch.randn(1, 4, 8, 12))[0] - base
    assert float(delta[:, 0, :].abs().max()) <= 0.1 + 1e-5  # mean codes
    assert float(delta[:, -1, :].abs().max()) <= 0.5 + 1e-5  # std codes
    assert float(delta[:, 1:-1, 1:-1].abs().min()) > 1.0  # data cells unbounded
    with pytest.raises(ConfigError, match="border_bound"):
        HyperConvDecoder(CHAIN, kernel_size=3, border_bound=[0.1])
    with pytest.raises(ConfigError, match="border_bound"):
        HyperConvDecoder(CHAIN, kernel_size=3, border_bound=[0.1, -1.0])


def test_shape_errors_name_both_shapes():
    dec = HyperConvDecoder(CHAIN, kernel_size=3)
    with pytest.raises(ConfigError, match=r"\[4, 9, 12\].*\[4, 8, 12\]"):
        dec(torch.randn(1, 4, 9, 12))
    with pytest.raises(ConfigError, match=r"ends with \[3, 4, 6\].*\[3, 4, 5\]"):
        HyperConvDecoder(CHAIN, kernel_size=3, base=torch.zeros(3, 4, 5))
    with pytest.raises(ConfigError, match=r"features\[1\] = \[6, 5\]"):
        HyperConvDecoder([[4, 8, 12], [6, 5]], kernel_size=3)
    with pytest.raises(ConfigError, match="kernel_size = 4"):
        param_count(CHAIN, 4)


def test_loss_ignores_padding_cells():
    target = torch.zeros(1, 2, 2, 3)
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[1, 1, :] = False  # the last token's last row is padding
    pred = target.clone()
    pred[0, 1, 1, :] = 100.0
    assert token_loss(pred, target, mask).item() == 0.0
    assert token_metrics(pred, target, mask)["mse"] == 0.0
    pred[0, 0, 0, 0] = 3.0  # one real cell off by 3: 9 / 9 real cells
    assert token_loss(pred, target, mask).item() == pytest.approx(1.0)
    assert token_loss(pred, target, None).item() == pytest.approx((9 + 3 * 100**2) / 12)


def test_per_token_weighting():
    w = token_weights(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(token_weights(torch.zeros(3)), torch.ones(3))
    target = torch.zeros(2, 2, 1, 4)
    pred = target.clone()
    pred[:, 1] = 1.0  # every cell of token 1 off by 1
    # weighted mean over cells: (1.5 * 4 * 1) / (0.5 * 4 + 1.5 * 4) per sample
    assert token_loss(pred, target, weights=w).item() == pytest.approx(0.75)
    pred[:, 1] = 2.0
    loss = token_loss(pred, target, weights=w, mse_weight=0.5, l1_weight=2.0)
    assert loss.item() == pytest.approx(0.5 * 0.75 * 4 + 2.0 * 0.75 * 2)


def test_metrics_by_hand():
    target = torch.tensor([[[[3.0, 4.0]]]])
    pred = torch.tensor([[[[3.0, 1.0]]]])
    m = token_metrics(pred, target)
    assert m["mse"] == pytest.approx(4.5) and m["mae"] == pytest.approx(1.5)
    assert m["rmse"] == pytest.approx(4.5**0.5) and m["rel_error"] == pytest.approx(3 / 5)


def test_noise():
    x = torch.zeros(10_000)
    assert add_noise(x, 0.0) is x
    assert add_noise(x, 1e-2, torch.Generator().manual_seed(0)).std().item() == pytest.approx(1e-2, rel=0.05)


def test_overfits_one_pair():
    torch.manual_seed(0)
    features = [[8, 16, 32], [16, 8, 16], [12, 6, 10]]
    dec = HyperConvDecoder(features, kernel_size=3)
    cond = torch.randn(1, 8, 16, 32)
    target = torch.randn(1, 12, 6, 10)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    first = token_loss(dec(cond), target).item()
    for _ in range(300):
        opt.zero_grad()
        loss = token_loss(dec(cond), target)
        loss.backward()
        opt.step()
    assert first > 0.5 and loss.item() < 1e-3 * first


def test_generator_configs():
    small = compose(["stage=generator"]).generator
    feats = OmegaConf.to_container(small.features, resolve=True)
    assert feats[0] == [small.num_prompts, small.prompt_len, 384] and small.num_prompts <= 32 and small.prompt_len == 64
    assert small.kernel_size == 3 and feats[-1] == [144, 10, 66]
    assert 1e6 < param_count(feats, small.kernel_size) < 5e6
    big = compose(["stage=generator", "generator=dnd_qwen0.5b"]).generator
    feats = OmegaConf.to_container(big.features, resolve=True)
    assert feats[0] == [128, 384, 384] and feats[-1] == [4296, 10, 130] and big.kernel_size == 9
    total = param_count(feats, 9)
    last = param_count(feats[-2:], 9)
    # DESIGN.md says "about 1.0B (713M in the last layer)"; the layer as specified gives 1.113B, 716.9M
    assert 1.0e9 < total < 1.2e9 and 7.1e8 < last < 7.2e8
    # the MiniLM-sized input matches the encoder's hidden size
    assert compose(["stage=generator", "generator.num_prompts=8"]).generator.features[0][0] == 8
    assert small.encoder.name == "minilm" and small.encoder.kind == "encoder"


@pytest.fixture(scope="module")
def encoder(paths):
    from loragen.models.text_encoder import load_text_encoder

    return load_text_encoder(compose(["stage=generator"]).generator.encoder, paths, prompt_len=16)


def test_encoder_states(encoder):
    from loragen.models.registry import resolve_model_path

    cfg = compose(["stage=generator"]).generator.encoder
    hidden = json.loads((Path(resolve_model_path(cfg, OmegaConf.create({"cache_dir": "."}))) / "config.json").read_text())
    assert encoder.hidden_size == hidden["hidden_size"] == 384
    long = "word " * 40
    states = encoder.encode(["a short question?", long])
    assert tuple(states.shape) == (2, 16, 384)
    n_short = len(encoder.tokenizer("a short question?")["input_ids"])
    assert n_short < 16
    assert states[0, n_short:].abs().sum() == 0 and states[0, :n_short].abs().min() >= 0
    assert states[0, : n_short].norm(dim=-1).min() > 0 and states[1].norm(dim=-1).min() > 0
    torch.testing.assert_close(encoder.encode(["a short question?"])[0], states[0], rtol=1e-4, atol=1e-5)


def test_prompt_cache_hit_and_miss(encoder, tmp_path):
    from loragen.models.prompt_cache import PromptStateCache, prompt_pool
    from loragen.models.text_encoder import TextEncoder

    pool = prompt_pool([f"question {i}?" for i in range(20)] + ["question 3?", "  "], size=8, seed=0)
    assert len(pool) == len(set(pool)) == 8 and pool == prompt_pool([f"question {i}?" for i in range(20)], 8, 0)
    cache = PromptStateCache(tmp_path, encoder)
    first = cache.states(pool)
    assert (cache.hits, cache.misses) == (0, 1) and first.dtype == torch.float16
    torch.testing.assert_close(first.float(), encoder.encode(pool), rtol=2e-3, atol=2e-3)

    calls = []
    orig = encoder.encode
    encoder.encode = lambda prompts: calls.append(prompts) or orig(prompts)
    try:
        again = PromptStateCache(tmp_path, encoder)
        assert torch.equal(again.states(pool), first) and (again.hits, again.misses) == (1, 0) and calls == []
        again.states(pool[:4])  # other prompt texts: a miss
        assert again.misses == 1 and calls == [pool[:4]]
        files = sorted((tmp_path / "prompt_states").rglob("*.safetensors"))
        assert len(files) == 2 and all(f.parent.name == "L16" for f in files)
        cache.path_for(pool).write_bytes(b"garbage")  # a corrupt entry is re-encoded, not trusted
        torch.testing.assert_close(again.states(pool), first)
        assert again.misses == 2 and len(calls) == 2
        shorter = PromptStateCache(tmp_path, TextEncoder(encoder.loaded, prompt_len=8))  # another L: a miss
        assert tuple(shorter.states(pool).shape) == (8, 8, 384) and shorter.misses == 1
    finally:
        encoder.encode = orig
