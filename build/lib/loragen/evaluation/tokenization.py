"""Context/continuation tokenization exactly as lm-evaluation-harness does it for causal LMs.

Trailing spaces of the context move onto the continuation; continuation tokens are
tok(ctx + cont)[len(tok(ctx)):], each encoded with the tokenizer's default special tokens
(so BOS follows the tokenizer: added for Gemma/Llama, not for Qwen2.5).
"""

from __future__ import annotations

from typing import Sequence


def move_trailing_space(requests: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """lm-eval's rule: a context's trailing whitespace moves onto the start of its continuation."""
    moved = []
    for ctx, cont in requests:
        n = len(ctx) - len(ctx.rstrip())
        moved.append((ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont))
    return moved


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request; batched tokenizer calls, each distinct context once."""
    moved = move_trailing_space(requests)
    contexts = list(dict.fromkeys(c for c, _ in moved))
    ctx_ids = dict(zip(contexts, tokenizer(contexts)["input_ids"]))
    wholes = tokenizer([c + x for c, x in moved])["input_ids"]
    return [(ctx_ids[c], w[len(ctx_ids[c]):]) for (c, _), w in zip(moved, wholes)]


def encode_seq2seq_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(encoder ids, decoder ids) per request, as lm-evaluation-harness for seq2seq models: trailing spaces of
    the context move onto the continuation; the context keeps the tokenizer's special tokens (T5: EOS
    appended), the continuation is encoded alone without them."""
    moved = move_trailing_space(requests)
    contexts = list(dict.fromkeys(c for c, _ in moved))
    ctx_ids = dict(zip(contexts, tokenizer(contexts)["input_ids"]))
    conts = tokenizer([x for _, x in moved], add_special_tokens=False)["input_ids"]
    return [(ctx_ids[c], x) for (c, _), x in zip(moved, conts)]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    return encode_requests(tokenizer, [(context, continuation)])[0]
