"""Context/continuation tokenization exactly as lm-evaluation-harness does it for causal LMs.

Trailing spaces of the context move onto the continuation; continuation tokens are
tok(ctx + cont)[len(tok(ctx)):], each encoded with the tokenizer's default special tokens
(so BOS follows the tokenizer: added for Gemma/Llama, not for Qwen2.5).
"""

from __future__ import annotations


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]
