"""SFT on prompt -> text records: label masking, token counts and truncation for causal and seq2seq models."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from loragen.data.records import MCRecord, TextRecord
from loragen.errors import ConfigError
from loragen.lora.init import attach_lora
from loragen.models import load_model
from loragen.models.chat import PLAIN_TEMPLATE, render_prompt
from loragen.train.objectives import IGNORE, causal_batch, make_objective, seq2seq_batch, text_sft, text_sft_example
from tests.conftest import CONF

RECORDS = [
    TextRecord("a", "Name a planet.", "Mars"),
    TextRecord("b", "What do plants need to grow?\n\nAnswer briefly.", "Light, water and air."),
    TextRecord("c", "Say yes.", ""),  # only EOS is learnt
]


def lm_of(paths, name):
    return load_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), paths)


# hand-made token ids ---------------------------------------------------------------------------

def test_causal_example_masks_the_prompt_and_truncates_prompt_from_the_left():
    assert text_sft_example([5, 6, 7], [8, 9, 2], max_length=10) == ([5, 6, 7, 8, 9, 2], [IGNORE] * 3 + [8, 9, 2])
    # too long: the answer keeps all 3 tokens, the prompt its last 2
    assert text_sft_example([1, 2, 3, 4, 5], [6, 7, 8], max_length=5) == ([4, 5, 6, 7, 8], [IGNORE, IGNORE, 6, 7, 8])
    # an answer longer than max_length - 1 keeps its first tokens; one prompt token stays
    assert text_sft_example([1, 2], [3, 4, 5, 6, 7], max_length=4) == ([2, 3, 4, 5], [IGNORE, 3, 4, 5])
    with pytest.raises(ConfigError, match="max_length=1"):
        text_sft_example([1], [2], max_length=1)


def test_causal_batch_is_left_padded_with_labels_of_the_last_positions():
    seqs = [([5, 6, 7, 8, 9], [IGNORE, IGNORE, IGNORE, 8, 9]),  # 2 answer tokens
            ([4, 3, 2], [IGNORE, 3, 2])]  # 2 answer tokens, shorter prompt
    b = causal_batch(seqs + [([1, 7, 7, 7], [IGNORE, 7, 7, 7])], pad=0)  # 3 answer tokens
    # inputs: each sequence without its last token, right-aligned; width 4 = longest input
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 4, 3], [0, 1, 7, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2]]
    # labels of the last K = 3 input positions (the token each one predicts), IGNORE before a row's answer
    assert b["labels"].tolist() == [[IGNORE, 8, 9], [IGNORE, 3, 2], [7, 7, 7]]
    assert b["num_tokens"] == 5 + 3 + 4


def test_seq2seq_batch_is_right_padded_with_ignored_label_padding():
    b = seq2seq_batch([([11, 12, 1], [21, 1]), ([13, 1], [22, 23, 24, 1])], pad=0)
    assert b["input_ids"].tolist() == [[11, 12, 1], [13, 1, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[21, 1, IGNORE, IGNORE], [22, 23, 24, 1]]
    assert b["num_tokens"] == 5 + 6


# real tokenizers and models --------------------------------------------------------------------

def test_causal_labels_are_the_target_and_eos_after_the_rendered_prompt(paths):
    lm = lm_of(paths, "tiny_qwen2")
    tok = lm.tokenizer
    obj = make_objective("causal", tok, max_length=512, temperature=1.0, record_type=TextRecord)
    batch = obj.collate(RECORDS)
    eos = tok.eos_token_id
    for row, r in enumerate(RECORDS):
        prompt = tok(PLAIN_TEMPLATE.format(prompt=r.prompt))["input_ids"]  # tiny tokenizers have no chat template
        answer = tok(r.target, add_special_tokens=False)["input_ids"] + [eos]
        labels = [t for t in batch["labels"][row].tolist() if t != IGNORE]
        assert labels == answer
        real = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert real == (prompt + answer)[:-1]  # the input: prompt then answer, without the last token
    assert batch["labels"].shape[1] == max(len(tok(r.target, add_special_tokens=False)["input_ids"]) + 1 for r in RECORDS)
    assert RECORDS[2].target == "" and [t for t in batch["labels"][2].tolist() if t != IGNORE] == [eos]


def test_causal_loss_is_the_mean_ce_over_target_tokens(paths):
    lm = lm_of(paths, "tiny_qwen2")
    tok = lm.tokenizer
    model = attach_lora(lm.model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], init_seed=0)
    obj = make_objective("causal", tok, max_length=512, temperature=1.0, record_type=TextRecord)
    loss_sum, units = obj.loss(model, obj.collate(RECORDS))
    losses = []  # independently: one unpadded sequence at a time, CE at the positions before each answer token
    for r in RECORDS:
        prompt = tok(render_prompt(tok, r.prompt, kind="causal"))["input_ids"]
        answer = tok(r.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(ids).logits[0]
        losses.append(F.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(answer), reduction="none"))
    every = torch.cat(losses)
    assert units == len(every)
    assert float(loss_sum) / units == pytest.approx(float(every.mean()), rel=1e-5)


def test_seq2seq_labels_are_target_and_eos_and_loss_is_the_mean_ce(paths):
    lm = lm_of(paths, "tiny_t5")
    tok = lm.tokenizer
    model = attach_lora(lm.model, r=4, alpha=8, dropout=0.0, target_modules=["q", "v"], init_seed=0)
    obj = make_objective("seq2seq", tok, max_length=512, temperature=1.0, record_type=TextRecord)
    batch = obj.collate(RECORDS)
    eos, start = tok.eos_token_id, lm.model.config.decoder_start_token_id
    losses = []
    for row, r in enumerate(RECORDS):
        enc = tok(r.prompt)["input_ids"]  # seq2seq: the prompt as is; the T5 tokenizer appends EOS
        assert enc[-1] == eos
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() == enc
        answer = tok(r.target, add_special_tokens=False)["input_ids"] + [eos]
        assert [t for t in batch["labels"][row].tolist() if t != IGNORE] == answer
        with torch.no_grad():  # independently: decoder inputs = start token + answer shifted right
            logits = model(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([[start] + answer[:-1]])).logits[0]
        losses.append(F.cross_entropy(logits, torch.tensor(answer), reduction="none"))
    every = torch.cat(losses)
    loss_sum, units = obj.loss(model, batch)
    assert units == len(every) == sum(len(tok(r.target, add_special_tokens=False)["input_ids"]) + 1 for r in RECORDS)
    assert float(loss_sum) / units == pytest.approx(float(every.mean()), rel=1e-5)


def test_seq2seq_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_target(paths):
    tok = lm_of(paths, "tiny_t5").tokenizer
    rec = TextRecord("x", "The temperature of the air decreases as the altitude increases.", "Energy from the sun is stored.")
    batch = text_sft(tok, kind="seq2seq", max_length=4).collate([rec])
    assert batch["input_ids"][0].tolist() == tok(rec.prompt)["input_ids"][-4:]
    assert batch["labels"][0].tolist() == tok(rec.target, add_special_tokens=False)["input_ids"][:4]


def test_the_prompt_is_rendered_with_the_chat_template_when_there_is_one(paths):
    tok = lm_of(paths, "tiny_qwen2").tokenizer
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    rec = TextRecord("a", "Name a planet.", "Mars")
    for chat_template, system, text in [("auto", None, "<user>Name a planet.\n<assistant>"),
                                        ("auto", "Be brief.", "<system>Be brief.\n<user>Name a planet.\n<assistant>"),
                                        (False, None, PLAIN_TEMPLATE.format(prompt="Name a planet."))]:
        obj = make_objective("causal", tok, max_length=512, temperature=1.0, record_type=TextRecord,
                             chat_template=chat_template, system=system)
        b = obj.collate([rec])
        expected = tok(text)["input_ids"] + tok("Mars", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert b["input_ids"][0].tolist() == expected[:-1]


def test_objective_follows_the_record_type(paths):
    minilm = lm_of(paths, "minilm").tokenizer
    with pytest.raises(ConfigError, match="prompt -> text .* causal or seq2seq models; this model is 'encoder'"):
        make_objective("encoder", minilm, max_length=64, temperature=1.0, record_type=TextRecord)
    tok = lm_of(paths, "tiny_qwen2").tokenizer
    mc = MCRecord("m", ("Question: 1+1?\nAnswer:",), (" 2", " 3"), ("2", "3"), 0, "1+1?")
    b = make_objective("causal", tok, max_length=64, temperature=1.0).collate([mc])  # default: multiple choice
    assert [t for t in b["labels"][0].tolist() if t != IGNORE] == tok("Question: 1+1?\nAnswer: 2")["input_ids"][
        len(tok("Question: 1+1?\nAnswer:")["input_ids"]):]


def test_chat_template_bos_is_not_doubled(paths):
    """A template that writes BOS itself, on a tokenizer that adds BOS (Llama-3, Gemma): one BOS, not two."""
    tok = load_model(OmegaConf.load(CONF / "model" / "tiny_llama.yaml"), paths).tokenizer
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # this tokenizer adds BOS
    tok.chat_template = "{{ bos_token }}{% for m in messages %}<u>{{ m['content'] }}{% endfor %}<a>"
    text = render_prompt(tok, "hi", kind="causal")
    assert text == "<u>hi<a>"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
