"""The one adapter writer/reader and the shared LoRA init."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel, get_peft_model_state_dict

from loragen.errors import CheckpointError, ConfigError
from loragen.lora.adapter_io import lora_pairs, read_adapter, write_adapter
from loragen.lora.init import attach_lora
from loragen.models import load_model
from tests.conftest import CONF


def base(paths, name="tiny_qwen2"):
    return load_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), paths)


def test_init_seed_is_shared_across_target_sets(paths):
    a = attach_lora(base(paths).model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], init_seed=7)
    b = attach_lora(base(paths).model, r=4, alpha=8, dropout=0.0, target_modules=["v_proj"], init_seed=7)
    c = attach_lora(base(paths).model, r=4, alpha=8, dropout=0.0, target_modules=["v_proj"], init_seed=8)
    sa, sb, sc = (get_peft_model_state_dict(m) for m in (a, b, c))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    assert torch.equal(sa[key], sb[key]) and not torch.equal(sa[key], sc[key])
    assert all(v.abs().sum() == 0 for k, v in sa.items() if "lora_B" in k)
    assert sa[key].abs().max() <= 1 / sa[key].shape[1] ** 0.5


def test_unknown_target_module_lists_linear_modules(paths):
    with pytest.raises(ConfigError, match=r"\['query'\] match no module.*'self_attn.q_proj'"):
        attach_lora(base(paths).model, r=4, alpha=8, dropout=0.0, target_modules=["query"], init_seed=0)


def test_written_adapter_loads_with_peft(paths, tmp_path):
    pm = attach_lora(base(paths).model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "down_proj"], init_seed=0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(1))
    config = pm.peft_config["default"].to_dict()
    write_adapter(tmp_path / "ad", config=config, tensors=get_peft_model_state_dict(pm))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = pm(ids).logits
        loaded = PeftModel.from_pretrained(base(paths).model, tmp_path / "ad").eval()
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-6)
        assert not torch.allclose(base(paths).model(ids).logits, expected, atol=1e-4)
    ad = read_adapter(tmp_path / "ad")
    assert ad.r == 4 and ad.scale == 2.0 and len(lora_pairs(ad.tensors)) == 2 * 2
    assert not list(tmp_path.glob(".*"))


def test_bad_adapters_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        read_adapter(tmp_path)
    write_adapter(tmp_path / "a", config={"r": 2, "target_modules": ["q_proj"], "lora_alpha": 2},
                  tensors={"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.ones(3, 2)})
    f = tmp_path / "a" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=f"{f}: cannot read safetensors file"):
        read_adapter(tmp_path / "a")
    write_adapter(tmp_path / "b", config={"r": 2, "target_modules": ["q_proj"]},
                  tensors={"x.lora_A.weight": torch.tensor([[float("nan")]])})
    with pytest.raises(CheckpointError, match="tensor x.lora_A.weight has non-finite values"):
        read_adapter(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps({"target_modules": ["q"]}))
    with pytest.raises(CheckpointError, match="missing key 'r'"):
        read_adapter(tmp_path / "c")
