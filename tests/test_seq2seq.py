"""Seq2seq (T5) models: tiny_t5, multiple-choice scoring, PEFT task types, adapter-kind mismatch, a LoRA that learns."""

import json
import shutil

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from loragen.data.records import MCRecord, TextRecord
from loragen.errors import CheckpointError
from loragen.evaluation import evaluate_records
from loragen.evaluation.adapters import check_adapter
from loragen.evaluation.scoring import seq2seq_loglikelihoods
from loragen.lora.init import attach_lora
from loragen.models import load_model
from loragen.stages.lora import save_adapter
from loragen.train import fit
from loragen.train.objectives import make_objective
from tests.conftest import CONF
from tests.train_helpers import train_cfg


def mcfg(name):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


@pytest.fixture(scope="module")
def t5(paths):
    return load_model(mcfg("tiny_t5"), paths)


def test_tiny_t5_is_a_standard_flan_t5_shaped_dir(t5):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    cfg = t5.model.config
    assert t5.kind == "seq2seq" and cfg.model_type == "t5" and cfg.is_encoder_decoder
    assert cfg.d_model == 64 and cfg.num_layers == cfg.num_decoder_layers == 2 and cfg.feed_forward_proj == "gated-gelu"
    tok = t5.tokenizer
    assert cfg.decoder_start_token_id == cfg.pad_token_id == tok.pad_token_id  # as T5: PAD starts the decoder
    assert cfg.eos_token_id == tok.eos_token_id and tok("a b")["input_ids"][-1] == tok.eos_token_id
    assert tok("a b", add_special_tokens=False)["input_ids"][-1] != tok.eos_token_id
    again = AutoModelForSeq2SeqLM.from_pretrained(t5.path).eval()
    ids = AutoTokenizer.from_pretrained(t5.path)("The answer is water.", return_tensors="pt").input_ids
    dec = torch.tensor([[cfg.decoder_start_token_id, 5, 6]])
    with torch.no_grad():
        assert torch.equal(t5.model(input_ids=ids, decoder_input_ids=dec).logits,
                           again(input_ids=ids, decoder_input_ids=dec).logits)


def test_flan_t5_configs_name_the_hub_models():
    for size in ("base", "large"):
        cfg = mcfg(f"flan-t5-{size}")
        assert (cfg.kind, cfg.hub_id, list(cfg.lora_targets)) == ("seq2seq", f"google/flan-t5-{size}", ["q", "v"])
        assert list(cfg.linear_modules) == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def test_seq2seq_loglikelihood_is_the_decoder_log_prob_of_the_continuation(t5):
    tok, model = t5.tokenizer, t5.model
    requests = [("Question: what do plants need?\nAnswer:", " light"), ("Question: what do plants need?\nAnswer:", " water and air"),
                ("Is the sky blue? ", "yes")]
    got = seq2seq_loglikelihoods(model, tok, requests, batch_size=2)
    start = model.config.decoder_start_token_id
    for (ctx, cont), value in zip(requests, got):
        # lm-eval's seq2seq encoding: trailing spaces move to the continuation, encoded alone without specials
        n = len(ctx) - len(ctx.rstrip())
        ctx, cont = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
        enc, target = tok(ctx)["input_ids"], tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([enc]),
                         decoder_input_ids=torch.tensor([[start] + target[:-1]])).logits[0].log_softmax(-1)
        assert value == pytest.approx(sum(float(logp[i, t]) for i, t in enumerate(target)), rel=1e-5)


def test_multiple_choice_evaluation_scores_seq2seq_models(t5):
    rec = MCRecord("m", ("Question: what do plants need?\nAnswer:",), (" light", " rocks"), ("light", "rocks"), 0, "q")
    out = evaluate_records(t5.model, t5.tokenizer, "seq2seq", [rec], batch_size=4)
    scores = seq2seq_loglikelihoods(t5.model, t5.tokenizer, rec.requests(), batch_size=4)
    assert out.samples[0]["scores"] == pytest.approx(scores) and out.samples[0]["pred"] == int(scores[1] > scores[0])
    assert out.acc_norm is not None  # per-character normalisation applies to any log-likelihood


@pytest.mark.parametrize("name,targets,task", [("tiny_qwen2", ["q_proj"], "CAUSAL_LM"), ("tiny_t5", ["q", "v"], "SEQ_2_SEQ_LM"),
                                               ("minilm", ["query"], "FEATURE_EXTRACTION")])
def test_saved_adapter_config_names_the_task_type(paths, tmp_path, name, targets, task):
    pm = attach_lora(load_model(mcfg(name), paths).model, r=2, alpha=4, dropout=0.0, target_modules=targets, init_seed=0)
    save_adapter(pm, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] == task


@pytest.fixture(scope="module")
def adapters(paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, targets in [("tiny_qwen2", ["q_proj", "v_proj"]), ("tiny_t5", ["q", "v"])]:
        pm = attach_lora(load_model(mcfg(name), paths).model, r=2, alpha=4, dropout=0.0, target_modules=targets, init_seed=0)
        save_adapter(pm, root / name)
    return root


def test_seq2seq_adapter_on_a_causal_model_is_refused(paths, adapters):
    qwen = load_model(mcfg("tiny_qwen2"), paths).model
    with pytest.raises(CheckpointError, match=r"adapter .*tiny_t5 is for a seq2seq \(encoder-decoder\) LM \(task_type "
                                              r"SEQ_2_SEQ_LM\) but the base model .* is a causal \(decoder-only\) LM "
                                              r"\(Qwen2ForCausalLM\)"):
        check_adapter(qwen, adapters / "tiny_t5")
    check_adapter(qwen, adapters / "tiny_qwen2")  # the right kind passes


def test_causal_adapter_on_a_seq2seq_model_is_refused(t5, adapters):
    with pytest.raises(CheckpointError, match=r"adapter .*tiny_qwen2 is for a causal \(decoder-only\) LM \(task_type "
                                              r"CAUSAL_LM\) but the base model .* is a seq2seq \(encoder-decoder\) LM "
                                              r"\(T5ForConditionalGeneration\)"):
        check_adapter(t5.model, adapters / "tiny_qwen2")
    check_adapter(t5.model, adapters / "tiny_t5")


def test_kind_is_told_by_module_names_without_a_task_type(paths, t5, adapters, tmp_path):
    for name in ("tiny_qwen2", "tiny_t5"):
        shutil.copytree(adapters / name, tmp_path / name)
        cfg_path = tmp_path / name / "adapter_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "task_type": None}))
    with pytest.raises(CheckpointError, match=r"is for a seq2seq \(encoder-decoder\) LM \(modules under both encoder and "
                                              r"decoder\) but the base model .* is a causal"):
        check_adapter(load_model(mcfg("tiny_qwen2"), paths).model, tmp_path / "tiny_t5")
    with pytest.raises(CheckpointError, match=r"is for a causal LM or encoder \(no task_type, and no modules under both an "
                                              r"encoder and a decoder\) but the base model .* is a seq2seq"):
        check_adapter(t5.model, tmp_path / "tiny_qwen2")


def test_a_lora_on_tiny_t5_learns_repeated_examples(paths, tmp_path):
    lm = load_model(mcfg("tiny_t5"), paths)
    model = attach_lora(lm.model, r=8, alpha=32, dropout=0.0, target_modules=["q", "v"], init_seed=0)
    obj = make_objective("seq2seq", lm.tokenizer, max_length=64, temperature=1.0, record_type=TextRecord)
    records = [TextRecord(str(i), p, t) for i, (p, t) in enumerate([("Name a planet.", "Mars"), ("Is water wet?", "Yes."),
                                                                     ("Say hello.", "Hello there."), ("2+2?", "4")])] * 2
    before, _ = obj.loss(model, obj.collate(records))
    res = fit(model, obj.loss, records, obj.collate, train_cfg(max_steps=30, lr=2e-2, per_device_batch=4),
              accelerator=Accelerator(cpu=True), state_dir=tmp_path / "state")
    after, n = obj.loss(model, obj.collate(records))
    assert res.step == 30 and float(after) < 0.5 * float(before), (float(before) / n, float(after) / n)
