"""The causal scorer's fast path (the requests sharing a prefix packed in one row: the prefix encoded once, each
continuation after it under a custom attention mask) gives the log-likelihoods of scoring each (context,
continuation) pair alone, one forward each: ragged lengths, shared contexts, batch sizes 1, 3 and more.
No timing here: bench/evaluate measures the speed against lm-evaluation-harness."""

import pytest
import torch

from loragen.evaluation import scoring
from loragen.evaluation.scoring import loglikelihoods, packable
from loragen.evaluation.tokenization import encode_pair, encode_requests
from tests.test_evaluate import tiny

Q1 = "Question: Which of these is a source of light?\nAnswer:"
Q2 = "Question: What do plants need to grow?\nAnswer:"
REQUESTS = [
    (Q1, " the sun"), (Q1, " a very long and winding answer about the moon reflecting light"), (Q1, " a"),
    (Q1, " rocks"),
    ("The cat sat on the", " mat"),  # a context of its own
    (Q2, " water and light"), (Q2, " sand"),
    ("Trailing space ", "x"), ("Trailing space ", "yy and more"),  # the space moves onto the continuation
    (Q1, " fire"),  # shares Q1's prefix without being next to its other choices
    ("A much longer context, " * 6 + "and then the question:", " yes"),
]


def one_pair(model, tok, ctx, cont, max_len=None):
    """One request alone, straight from lm-eval's definition: inputs (ctx + cont)[-(max_len + 1):][:-1], no padding,
    no mask; the last len(cont) (at most max_len) tokens' log-probabilities summed in float64."""
    c, x = encode_pair(tok, ctx, cont)
    max_len = max_len or scoring.model_max_length(model, tok)
    n = min(len(x), max_len)
    whole = (c + x)[-(max_len + 1):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[len(whole) - 1 - n + j, t]) for j, t in enumerate(whole[-n:]))


@pytest.fixture(scope="module")
def models(paths):
    loaded = {}

    def get(name, dtype):
        if (name, dtype) not in loaded:
            lm = tiny(paths, name)
            lm.model.to(dtype)
            loaded[name, dtype] = lm
        return loaded[name, dtype]

    return get


def items(tok, requests):
    return [(c, x) for c, x in encode_requests(tok, requests)]


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_packed_scores_equal_one_pair_at_a_time(models, name, dtype, batch_size):
    lm = models(name, dtype)
    assert packable(lm.model, items(lm.tokenizer, REQUESTS))  # the fast path is the one under test
    done = []
    got = loglikelihoods(lm.model, lm.tokenizer, REQUESTS, batch_size=batch_size, on_done=done.extend)
    ref = [one_pair(lm.model, lm.tokenizer, c, x) for c, x in REQUESTS]
    assert got == pytest.approx(ref, abs=1e-5, rel=0)
    if dtype == torch.float64 and name == "tiny_qwen2":  # (Gemma2's RMSNorm rounds through float32 in any dtype)
        assert got == pytest.approx(ref, abs=1e-10, rel=0)
    assert sorted(done) == list(range(len(REQUESTS)))


def test_same_scores_without_packing(models, monkeypatch):
    lm = models("tiny_qwen2", torch.float32)
    packed = loglikelihoods(lm.model, lm.tokenizer, REQUESTS, batch_size=3)
    monkeypatch.setattr(scoring, "PACKABLE", ())
    assert not packable(lm.model, items(lm.tokenizer, REQUESTS))
    rows = loglikelihoods(lm.model, lm.tokenizer, REQUESTS, batch_size=3)
    assert rows == pytest.approx(packed, abs=1e-5, rel=0)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_truncated_requests_packed_like_lm_eval(models, monkeypatch, batch_size):
    """overlong=truncate with a short context: contexts cut from the left, an over-long continuation to its last
    max_len tokens; requests whose cut prefixes coincide share a row."""
    lm = models("tiny_qwen2", torch.float64)
    max_len = 12
    monkeypatch.setattr(scoring, "model_max_length", lambda model, tokenizer, default=2048: max_len)
    got = loglikelihoods(lm.model, lm.tokenizer, REQUESTS, batch_size=batch_size, overlong="truncate")
    ref = [one_pair(lm.model, lm.tokenizer, c, x, max_len) for c, x in REQUESTS]
    assert got == pytest.approx(ref, abs=1e-10, rel=0)
    long = [i for i, (c, x) in enumerate(encode_requests(lm.tokenizer, REQUESTS)) if len(x) > max_len]
    assert long and got.truncated == long


def test_longer_than_the_sliding_window_is_not_packed(models):
    """Gemma2's sliding layers: the packed mask is plain causal, so a request longer than the window is scored by
    the one-row-per-request path (which gets the sliding mask from the model)."""
    lm = models("tiny_gemma2", torch.float32)
    window = lm.model.config.sliding_window
    requests = REQUESTS[:3] + [("word " * (window + 10), " end")]
    assert not packable(lm.model, items(lm.tokenizer, requests))
    assert packable(lm.model, items(lm.tokenizer, requests[:3]))


def test_encoder_cosines_equal_one_text_at_a_time_and_batch_by_token_count(paths, monkeypatch):
    """The encoder scorer's batches (texts in order of token count) give each request the cosine of its two texts
    embedded alone, without padding; and a batch pads to at most its own longest text, in increasing lengths."""
    from omegaconf import OmegaConf

    from loragen.models import load_model, pooling
    from tests.conftest import CONF

    lm = load_model(OmegaConf.load(CONF / "model" / "minilm.yaml"), paths)
    requests = [(q, " " + c) for q, c in (
        ("Which of these is a source of light?", "the sun"), ("Which of these is a source of light?", "rocks"),
        ("What do plants need to grow? " * 5, "water and light and a long list of other things they need"),
        ("What do plants need to grow? " * 5, "sand"), ("Is it raining?", "yes"), ("Is it raining?", "no"),
        ("short", "a much longer continuation than its context, and then some more words"),
        ("understanding", "a b c d e"))]  # fewer characters, more tokens: the order is by tokens
    batches = []
    embed_encoded = pooling.embed_encoded
    monkeypatch.setattr(scoring, "embed_encoded",
                        lambda m, enc: batches.append(enc["attention_mask"]) or embed_encoded(m, enc))
    got = scoring.cosines(lm.model, lm.tokenizer, requests, batch_size=3)
    lengths = [int(n) for mask in batches for n in mask.sum(1)]
    assert lengths == sorted(lengths) and len(lengths) == len({t for r in requests for t in (r[0], r[1].strip())})
    assert all(mask.shape[1] == int(mask.sum(1).max()) for mask in batches)
    for (c, x), score in zip(requests, got, strict=True):
        with torch.no_grad():
            one = [pooling.embed(lm.model, lm.tokenizer, [t])[0] for t in (c, x.strip())]
        assert abs(score - float(one[0] @ one[1])) < 1e-5
