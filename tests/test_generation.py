"""generate_texts: trimming at end-of-sequence, padding, seq2seq decoding, greedy vs seeded sampling;
evaluate_texts: metrics of hand-made outputs; the lettered multiple-choice path on top of it."""

import math
from types import SimpleNamespace

import pytest
import torch

from loragen.data.records import MCRecord, TextRecord
from loragen.evaluation import GenerationSettings, evaluate_texts, generate_texts, text_evaluator
from loragen.evaluation.generation import Generation, lettered_predictions
from loragen.models.chat import PLAIN_TEMPLATE
from tests.conftest import compose


@pytest.fixture(scope="module")
def tiny(paths):
    from loragen.models import load_model

    return load_model(compose(["model=tiny_qwen2"]).model, paths)


class StubLM(torch.nn.Module):
    """A 'model' whose generate appends fixed new tokens per row; records what it was called with."""

    def __init__(self, new_rows, *, encoder_decoder=False, eos=0, tokenizer=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.new_rows = new_rows
        self.config = SimpleNamespace(is_encoder_decoder=encoder_decoder)
        self.generation_config = SimpleNamespace(eos_token_id=eos)
        self.tokenizer = tokenizer
        self.calls = []

    def generate(self, input_ids, attention_mask, **kw):
        side = self.tokenizer.padding_side if self.tokenizer is not None else None
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "padding_side": side, **kw})
        new = torch.tensor(self.new_rows[: len(input_ids)])
        if self.config.is_encoder_decoder:
            return new  # decoder output only, starting with the decoder start token
        return torch.cat([input_ids, new], dim=1)


def test_causal_generation_trims_at_eos_with_left_padding(tiny):
    tok = tiny.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    yes = tok("Yes", add_special_tokens=False)["input_ids"]
    other = tok(" and more words here", add_special_tokens=False)["input_ids"]
    width = len(other)
    assert len(yes) + 1 < width
    rows = [yes + [eos] + [pad] * (width - len(yes) - 1), other]  # row 1 never ends
    model = StubLM(rows, eos=eos, tokenizer=tok)
    before = tok.padding_side
    gens = generate_texts(model, tok, ["a much longer prompt than the other one", "short"], kind="causal",
                          batch_size=4, max_new_tokens=width)
    assert gens[0].text == "Yes" and gens[0].tokens == len(yes) and gens[0].terminated
    assert gens[1].text == " and more words here" and gens[1].tokens == width and not gens[1].terminated
    call = model.calls[0]
    assert call["padding_side"] == "left" and tok.padding_side == before
    assert call["attention_mask"][1, 0] == 0 and call["attention_mask"][1, -1] == 1  # the short prompt is left-padded
    assert call["do_sample"] is False and call["max_new_tokens"] == width
    assert gens[0].seconds == gens[1].seconds > 0  # one batch: its time shared


def test_seq2seq_decodes_only_the_decoder_output(tiny):
    tok = tiny.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ok = tok("Bonjour", add_special_tokens=False)["input_ids"]
    model = StubLM([[pad] + ok + [eos, pad]], encoder_decoder=True, eos=eos, tokenizer=tok)
    gens = generate_texts(model, tok, ["Translate: hello"], kind="seq2seq", batch_size=1, max_new_tokens=8)
    assert gens == [Generation("Bonjour", len(ok), True, gens[0].seconds)]
    assert model.calls[0]["padding_side"] == tok.padding_side  # seq2seq keeps the tokenizer's side


def test_sampling_settings_are_passed_and_kind_is_checked(tiny):
    tok = tiny.tokenizer
    model = StubLM([[tok.eos_token_id]], eos=tok.eos_token_id, tokenizer=tok)
    generate_texts(model, tok, ["x"], kind="causal", batch_size=1, max_new_tokens=3, do_sample=True,
                   temperature=0.7, top_p=0.9)
    assert model.calls[0]["do_sample"] is True and model.calls[0]["temperature"] == 0.7 and model.calls[0]["top_p"] == 0.9
    from loragen.errors import ConfigError

    with pytest.raises(ConfigError, match="seq2seq"):
        generate_texts(model, tok, ["x"], kind="seq2seq", batch_size=1, max_new_tokens=3)
    with pytest.raises(ConfigError, match="top_p"):
        GenerationSettings(top_p=0).check()


def test_real_model_batched_greedy_equals_one_by_one_and_sampling_is_seeded(tiny):
    prompts = ["hello there", "what is the capital of France? tell me", "a"]
    kw = dict(kind="causal", max_new_tokens=10)
    batched = generate_texts(tiny.model, tiny.tokenizer, prompts, batch_size=3, **kw)
    single = [generate_texts(tiny.model, tiny.tokenizer, [p], batch_size=1, **kw)[0] for p in prompts]
    assert [(g.text, g.tokens, g.terminated) for g in batched] == [(g.text, g.tokens, g.terminated) for g in single]
    assert all(g.tokens == 10 or g.terminated for g in batched)

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    s1 = generate_texts(tiny.model, tiny.tokenizer, prompts, batch_size=2, do_sample=True, temperature=1.0,
                        top_p=0.95, seed=7, **kw)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is untouched
    s2 = generate_texts(tiny.model, tiny.tokenizer, prompts, batch_size=2, do_sample=True, temperature=1.0,
                        top_p=0.95, seed=7, **kw)
    s3 = generate_texts(tiny.model, tiny.tokenizer, prompts, batch_size=2, do_sample=True, temperature=1.0,
                        top_p=0.95, seed=8, **kw)
    assert [g.text for g in s1] == [g.text for g in s2]
    assert [g.text for g in s1] != [g.text for g in s3]


def test_lettered_predictions_parse_the_generated_letter(tiny):
    tok = tiny.tokenizer
    b = tok(" B", add_special_tokens=False)["input_ids"]
    none = tok(" maybe", add_special_tokens=False)["input_ids"]
    width = max(len(b), len(none)) + 1
    rows = [b + [tok.eos_token_id] * (width - len(b)), none + [tok.eos_token_id] * (width - len(none))]
    model = StubLM(rows, eos=tok.eos_token_id, tokenizer=tok)
    recs = [MCRecord(str(i), ("Question: q?\nAnswer:",), (" x", " y", " z"), ("x", "y", "z"), 1, "q?") for i in range(2)]
    assert lettered_predictions(model, tok, recs, batch_size=2, max_new_tokens=width) == [1, -1]
    assert model.calls[0]["max_new_tokens"] == width


def test_evaluate_texts_metrics_of_hand_made_outputs(monkeypatch):
    made = {  # output, tokens, terminated, seconds
        "the cat is on the mat": Generation("the cat sat on the mat", 6, True, 0.5),
        "Paris": Generation("Paris", 1, True, 0.1),
        "London": Generation("", 8, False, 0.3),
    }
    records = [TextRecord("r1", "Where is the cat?", "the cat is on the mat"),
               TextRecord("r2", "Capital of France?", "Paris"),
               TextRecord("r3", "Capital of the UK?", "London")]
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen["prompts"], seen["kw"] = prompts, kw
        return [made[r.target] for r in records]

    monkeypatch.setattr(text_evaluator, "generate_texts", fake_generate)
    tok = SimpleNamespace(chat_template=None)
    out = evaluate_texts(torch.nn.Linear(1, 1), tok, "causal", records,
                         generation=GenerationSettings(max_new_tokens=8), batch_size=2)
    assert seen["prompts"] == [PLAIN_TEMPLATE.format(prompt=r.prompt) for r in records]  # rendered by render_prompt
    assert seen["kw"]["max_new_tokens"] == 8 and seen["kw"]["batch_size"] == 2
    m = out.metrics
    # corpus BLEU over the three: hyp 6+1+0 = 7 tokens, ref 6+1+1 = 8; 1-grams 6/7, 2-grams 3/5, 3-grams 1/4,
    # 4-grams 0/3 -> exp smoothing 1/(2*3); BP = exp(1 - 8/7)
    bleu = 100 * math.exp(1 - 8 / 7) * (6 / 7 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert m["bleu"] == pytest.approx(bleu, abs=1e-6)
    assert m["rouge_l"] == pytest.approx((5 / 6 + 1 + 0) / 3)
    assert m["exact_match"] == pytest.approx(1 / 3) and m["success_rate"] == pytest.approx(2 / 3)
    assert m["gen_seconds"] == pytest.approx(0.3) and m["gen_tokens"] == pytest.approx(5.0)
    assert m["language"] == "en" and m["bleu_tokenize"] == "13a" and m["embed_sim_english_only"] is False
    assert out.n == 3 and [r["id"] for r in out.rows] == ["r1", "r2", "r3"]
    assert out.rows[1]["embed_sim"] == pytest.approx(1.0, abs=1e-5) and out.rows[1]["exact_match"] == 1.0
    assert set(out.rows[0]) >= {"prompt", "output", "reference", "tokens", "terminated", "seconds", "bleu", "rouge_l",
                                "exact_match", "embed_sim", "success"}


def test_evaluate_texts_chinese_uses_zh_tokens_and_flags_minilm(monkeypatch):
    records = [TextRecord("z1", "北京是哪个国家的首都？", "我爱北京天安门")]
    monkeypatch.setattr(text_evaluator, "generate_texts", lambda *a, **k: [Generation("我爱北京", 4, True, 0.2)])
    out = evaluate_texts(torch.nn.Linear(1, 1), SimpleNamespace(chat_template=None), "seq2seq", records)
    m = out.metrics
    assert m["language"] == "zh" and m["bleu_tokenize"] == "zh" and m["embed_sim_english_only"] is True
    assert m["bleu"] == pytest.approx(100 * math.exp(-0.75), abs=1e-6)  # as in test_text_metrics
    assert m["rouge_l"] == pytest.approx(8 / 11)
    en = evaluate_texts(torch.nn.Linear(1, 1), SimpleNamespace(chat_template=None), "seq2seq", records, language="en")
    assert en.metrics["bleu_tokenize"] == "13a"  # a declared language wins over detection
