"""Training-free LoRA transfer between base models (lora/transfer.py, lora/svd_cache.py, stage=transfer)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel, get_peft_model_state_dict

from loragen.errors import CheckpointError, ConfigError, LoragenError
from loragen.lora.adapter_io import lora_pairs, read_adapter, write_adapter
from loragen.lora.init import attach_lora
from loragen.lora.svd_cache import SVDCache, fix_signs, truncated_svd
from loragen.lora.transfer import (
    ModelWeights,
    TransferSettings,
    layer_mapping,
    model_weights,
    require_some,
    transfer_adapter,
)
from loragen.models import load_model, resolve_model_path
from loragen.stages.transfer import source_model_config, transfer_settings
from tests.conftest import CONF, compose, run_cli

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def model_cfg(name):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


def base(paths, name):
    return load_model(model_cfg(name), paths).model


def make_adapter(paths, name, out, r=4, alpha=8):
    pm = attach_lora(base(paths, name), r=r, alpha=alpha, dropout=0.0, target_modules=TARGETS, init_seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    write_adapter(out, config=pm.peft_config["default"].to_dict(), tensors=get_peft_model_state_dict(pm))
    return pm.eval()


@pytest.fixture(scope="module")
def qwen(paths, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen") / "adapter"
    pm = make_adapter(paths, "tiny_qwen2", d)
    return {"dir": d, "peft": pm, "weights": model_weights(resolve_model_path(model_cfg("tiny_qwen2"), paths))}


@pytest.fixture(scope="module")
def gemma(paths, tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma") / "adapter"
    make_adapter(paths, "tiny_gemma2", d)
    return {"dir": d, "weights": model_weights(resolve_model_path(model_cfg("tiny_gemma2"), paths))}


def deltas(adapter_dir):
    """Module name -> scale·B·A, computed here from the files."""
    ad = read_adapter(adapter_dir)
    return {p.removeprefix("base_model.model."): ad.scale * b @ a for p, (a, b) in lora_pairs(ad.tensors).items()}


def variant(weights, key, fn):
    return ModelWeights.from_tensors(key, {n + ".weight": fn(n, weights.weight(n)) for n in weights.shapes})


def test_layer_mapping():
    assert layer_mapping(3, 2, "depth") == [0, 2]  # first to first, last to last
    assert layer_mapping(2, 3, "depth") == [0, 1, 1]
    assert layer_mapping(4, 4, "depth") == layer_mapping(4, 4, "index") == [0, 1, 2, 3]
    assert layer_mapping(2, 3, "index") == [0, 1, None]


def test_sign_rule_is_deterministic():
    w = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    svd = truncated_svd(w, 5)
    flip = torch.tensor([1.0, -1, -1, 1, -1])
    U, V = fix_signs(svd.U * flip, svd.V * flip)  # what another LAPACK might return
    assert torch.equal(U, svd.U) and torch.equal(V, svd.V)
    top = svd.U.gather(0, svd.U.abs().argmax(0, keepdim=True))
    assert (top > 0).all()
    U5, S5, Vh5 = (x for x in torch.linalg.svd(w, full_matrices=False))
    assert torch.allclose(svd.U * svd.S @ svd.V.T, U5[:, :5] * S5[:5] @ Vh5[:5], atol=1e-5)


def test_self_transfer_full_rank_reproduces_delta_and_logits(paths, qwen, tmp_path):
    ad = read_adapter(qwen["dir"])
    res = transfer_adapter(ad, qwen["weights"], qwen["weights"], TransferSettings(rank_svd=4096))
    write_adapter(tmp_path / "t", config=res.config, tensors=res.tensors)
    src, out = deltas(qwen["dir"]), deltas(tmp_path / "t")
    assert sorted(out) == sorted(src) and len(src) == 2 * len(TARGETS)
    for name, d in src.items():
        assert torch.allclose(out[name], d, atol=1e-5), name
    cfg = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 4 and cfg["target_modules"] == sorted(src)
    assert all(m["similarity"] == 1.0 and m["rel_reconstruction_error"] < 1e-5 for m in res.modules)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base(paths, "tiny_qwen2"), tmp_path / "t").eval()
        assert torch.allclose(loaded(IDS).logits, qwen["peft"](IDS).logits, atol=1e-5)


def test_self_transfer_low_rank_is_the_projection(qwen):
    """U_t U_tᵀ ΔW V_t V_tᵀ with the top-8 singular vectors, computed here independently."""
    ad, w = read_adapter(qwen["dir"]), qwen["weights"]
    res = transfer_adapter(ad, w, w, TransferSettings(rank_svd=8))
    src = deltas(qwen["dir"])
    for m in res.modules:
        name = m["target_module"]
        U, _, Vh = torch.linalg.svd(w.weight(name).float(), full_matrices=False)
        pu = U[:, :8] @ U[:, :8].T if U.shape[0] > 8 else torch.eye(U.shape[0])
        pv = Vh[:8].T @ Vh[:8]
        expected = pu @ src[name] @ pv
        a, b = res.tensors[f"base_model.model.{name}.lora_A.weight"], res.tensors[f"base_model.model.{name}.lora_B.weight"]
        assert torch.allclose(b @ a, expected, atol=1e-5), name
        assert m["similarity"] == pytest.approx(1.0, abs=1e-5) and m["k"] == 8
        assert m["norm_delta_target"] == pytest.approx(float(expected.norm()), rel=1e-4)
        assert m["norm_delta_source"] == pytest.approx(float(src[name].norm()), rel=1e-5)


def test_perturbed_copy_is_close_and_random_target_is_not(qwen):
    ad, w = read_adapter(qwen["dir"]), qwen["weights"]
    g = torch.Generator().manual_seed(3)
    perturbed = variant(w, "perturbed", lambda n, t: t + 1e-2 * t.std() * torch.randn(t.shape, generator=g))
    unrelated = variant(w, "random", lambda n, t: torch.randn(t.shape, generator=g) * t.std())
    settings = TransferSettings(rank_svd=8)
    same = transfer_adapter(ad, w, w, settings)
    near = transfer_adapter(ad, w, perturbed, settings)
    far = transfer_adapter(ad, w, unrelated, settings)
    for s, n, f in zip(same.modules, near.modules, far.modules):
        assert n["similarity"] > 0.95, n
        # random subspaces: E‖U_sᵀU_t‖²/k = k/d on each side; the module takes the smaller side
        assert f["similarity"] < 2.5 * f["random_level"] < 0.5, f
        key = f"base_model.model.{s['target_module']}"
        dw_same = same.tensors[key + ".lora_B.weight"] @ same.tensors[key + ".lora_A.weight"]
        dw_near = near.tensors[key + ".lora_B.weight"] @ near.tensors[key + ".lora_A.weight"]
        assert (dw_near - dw_same).norm() / dw_same.norm() < 0.1
    threshold = TransferSettings(rank_svd=8, similarity_threshold=0.6)
    assert len(transfer_adapter(ad, w, perturbed, threshold).transferred) == len(near.modules)
    far_t = transfer_adapter(ad, w, unrelated, threshold)
    assert far_t.transferred == [] and far_t.config["target_modules"] == []
    assert all("< threshold 0.6" in m["reason"] for m in far_t.modules)
    with pytest.raises(LoragenError, match=r"no module reached transfer.similarity_threshold=0.6 \(highest similarity 0\.\d+"):
        require_some(far_t, 0.6)


def test_partial_transfer_leaves_skipped_modules_out(paths, qwen, tmp_path):
    ad, w = read_adapter(qwen["dir"]), qwen["weights"]
    g = torch.Generator().manual_seed(4)
    mixed = variant(w, "mixed", lambda n, t: torch.randn(t.shape, generator=g) * t.std() if "q_proj" in n else t)
    res = transfer_adapter(ad, w, mixed, TransferSettings(rank_svd=8, similarity_threshold=0.6))
    skipped = {m["target_module"] for m in res.modules if not m["transferred"]}
    assert skipped == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert not set(res.config["target_modules"]) & skipped and len(res.config["target_modules"]) == 8
    write_adapter(tmp_path / "t", config=res.config, tensors=res.tensors)
    loaded = PeftModel.from_pretrained(base(paths, "tiny_qwen2"), tmp_path / "t")
    assert not any("q_proj.lora_A" in n for n, _ in loaded.named_parameters())


def test_gemma2_to_qwen2_loads_on_target(paths, gemma, qwen, tmp_path):
    """Different hidden sizes (48 -> 64) and depths (3 -> 2 layers)."""
    ad = read_adapter(gemma["dir"])
    res = transfer_adapter(ad, gemma["weights"], qwen["weights"], TransferSettings(rank_svd=16))
    pairs = {m["target_module"]: m["source_module"] for m in res.modules}
    assert pairs["model.layers.1.self_attn.q_proj"] == "model.layers.2.self_attn.q_proj"  # by depth
    assert len(res.transferred) == 2 * len(TARGETS)
    # the different-dims formula U_t (U_sᵀ ΔW_s V_s) V_tᵀ for one module, computed here
    name = "model.layers.0.self_attn.q_proj"
    s, t = truncated_svd(gemma["weights"].weight(name), 16), truncated_svd(qwen["weights"].weight(name), 16)
    expected = t.U @ (s.U.T @ deltas(gemma["dir"])[name] @ s.V) @ t.V.T
    a, b = res.tensors[f"base_model.model.{name}.lora_A.weight"], res.tensors[f"base_model.model.{name}.lora_B.weight"]
    row = next(m for m in res.modules if m["target_module"] == name)
    err = float((b @ a - expected).norm() / expected.norm())
    assert err == pytest.approx(row["rel_reconstruction_error"], abs=1e-4) and 0 < err < 1
    write_adapter(tmp_path / "t", config=res.config, tensors=res.tensors)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base(paths, "tiny_qwen2"), tmp_path / "t").eval()
        out, ref = loaded(IDS).logits, base(paths, "tiny_qwen2")(IDS).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-6)


def test_svd_cache_hits_and_invalidates(qwen, tmp_path):
    ad, w = read_adapter(qwen["dir"]), qwen["weights"]
    settings = TransferSettings(rank_svd=8)
    cold = SVDCache(tmp_path)
    first = transfer_adapter(ad, w, w, settings, cold)
    assert cold.misses == 2 * len(TARGETS) and cold.hits == 0
    assert len(list((tmp_path / "svd").rglob("*.safetensors"))) == 2 * len(TARGETS)
    warm = SVDCache(tmp_path)
    second = transfer_adapter(ad, w, w, settings, warm)
    assert warm.hits == 2 * len(TARGETS) and warm.misses == 0
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    changed = variant(w, w.key, lambda n, t: t * 2)  # same path, other weights: the cache must not be trusted
    third = SVDCache(tmp_path)
    transfer_adapter(ad, changed, changed, settings, third)
    assert third.misses == 2 * len(TARGETS)


def test_adapter_not_matching_source_model(gemma, qwen):
    with pytest.raises(CheckpointError, match=r"module model.layers.0.mlp.down_proj has lora_A \(4, 96\) and lora_B "
                                              r"\(48, 4\), which do not fit the source model .*tiny_qwen2.* \(64, 128\)"):
        transfer_adapter(read_adapter(gemma["dir"]), qwen["weights"], qwen["weights"], TransferSettings())


def test_incompatible_module_sets_list_both(qwen):
    settings = TransferSettings(module_map={"q_proj": "qkv_proj"})
    with pytest.raises(ConfigError, match=r"source adapter modules \['mlp.down_proj', .*'self_attn.v_proj'\] "
                                          r"\(\['self_attn.q_proj'\] have no counterpart\); target model .* has linear "
                                          r"modules \['mlp.down_proj', 'mlp.gate_proj', .*'self_attn.v_proj'\]"):
        transfer_adapter(read_adapter(qwen["dir"]), qwen["weights"], qwen["weights"], settings)


@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_threshold_outside_unit_interval(qwen, bad):
    with pytest.raises(ConfigError, match=rf"transfer.similarity_threshold={bad} is outside \[0, 1\]"):
        transfer_adapter(read_adapter(qwen["dir"]), qwen["weights"], qwen["weights"],
                         TransferSettings(similarity_threshold=bad))


def test_cli_transfer(gemma, tmp_path):
    out = tmp_path / "run"
    run_cli(["stage=transfer", "model=tiny_qwen2", "transfer.source_model=tiny_gemma2",
             f"transfer.source_adapter={gemma['dir']}", "transfer.rank_svd=16", f"hydra.run.dir={out}"])
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["num_transferred"] == report["num_modules"] == 2 * len(TARGETS)
    assert {"similarity", "norm_delta_source", "norm_delta_target", "rel_reconstruction_error"} <= set(report["modules"][0])
    assert "| model.layers.1.self_attn.q_proj | model.layers.2.self_attn.q_proj |" in (out / "transfer_report.md").read_text()
    assert read_adapter(out / "adapter").config["lora_alpha"] == 4
    bad = run_cli(["stage=transfer", "model=tiny_qwen2", "transfer.source_model=tiny_gemma2",
                   f"transfer.source_adapter={gemma['dir']}", "transfer.similarity_threshold=2",
                   f"hydra.run.dir={tmp_path / 'bad'}"], check=False)
    assert bad.returncode == 2 and "transfer.similarity_threshold=2 is outside [0, 1]" in bad.stderr


def test_stage_config_errors():
    t = compose(["stage=transfer"]).transfer
    with pytest.raises(ConfigError, match=r"transfer.source_model is not set; usage: loragen stage=transfer"):
        transfer_settings(t)
    t.source_model, t.source_adapter, t.layer_map = "tiny_gemma2", "x", "width"
    with pytest.raises(ConfigError, match=r"transfer.layer_map='width'; expected one of \['index', 'depth'\]"):
        transfer_settings(t)
    with pytest.raises(ConfigError, match=r"transfer.source_model='nope': no .*nope.yaml; valid: \[.*'tiny_qwen2'"):
        source_model_config("nope")
    assert source_model_config("tiny_gemma2").tiny.hidden_size == 48


def test_encoder_decoder_weights_are_refused_naming_both_modules(paths):
    """T5's numbered sub-layers repeat across blocks and stacks: no silent overwrite of one by another."""
    t5 = resolve_model_path(OmegaConf.load(CONF / "model" / "tiny_t5.yaml"), paths)
    with pytest.raises(ConfigError, match=r"coder\.block\.0\.layer\.0\.SelfAttention\.(\w) and "
                                          r"\w+coder\.block\.1\.layer\.0\.SelfAttention\.\1 are both layer 0's "
                                          r"SelfAttention\.\1;.*not encoder-decoder models"):
        ModelWeights.from_dir(t5)
