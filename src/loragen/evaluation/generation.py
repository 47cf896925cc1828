"""eval.method=generate: a lettered-options prompt, greedy decoding, the answer letter parsed.

This is how the LoRA-transfer papers score instruction-tuned models. An answer with no valid
letter is counted as unparseable and scored wrong (prediction -1).
"""

from __future__ import annotations

import os
import re
import string
from typing import Sequence

import torch

from loragen.data.records import MCRecord
from loragen.runtime import ProgressBar

LETTERS = string.ascii_uppercase


def lettered_prompt(rec: MCRecord) -> str:
    if len(rec.contexts) > 1:  # winogrande: options are what differs between the contexts
        stem = os.path.commonprefix(list(rec.contexts))
        question = rec.prompt
        options = [c[len(stem):] for c in rec.contexts]
    else:
        question = re.sub(r"\s*Answer:\s*$", "", rec.contexts[0])
        options = list(rec.choices)
    lines = [question] + [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def parse_letter(text: str, n: int) -> int:
    m = re.search(rf"\b([{LETTERS[:n]}])\b", text)
    return LETTERS.index(m.group(1)) if m else -1


@torch.no_grad()
def lettered_predictions(model, tokenizer, records: Sequence[MCRecord], *, batch_size: int, desc: str = "",
                         max_new_tokens: int = 5) -> list[int]:
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    preds: list[int] = []
    bar = ProgressBar(len(records), desc or "generating")
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            enc = tokenizer([lettered_prompt(r) for r in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            preds += [parse_letter(t, r.num_choices) for t, r in zip(texts, chunk)]
            bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        bar.close()
    return preds
