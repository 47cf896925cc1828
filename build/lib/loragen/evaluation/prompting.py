"""Optional prompt changes on records: few-shot examples and chat templates."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

from loragen.data.records import MCRecord
from loragen.errors import ConfigError

FEWSHOT_DELIM = "\n\n"


def with_fewshot(records: Sequence[MCRecord], pool: Sequence[MCRecord], k: int, seed: int) -> list[MCRecord]:
    """Prefix each record with k solved examples drawn from `pool` (never the record itself).

    Draws are seeded by (seed, record id), so a document gets the same examples whatever the
    slice, limit or process it is scored in.
    """
    if k <= 0:
        return list(records)
    out = []
    for rec in records:
        rng = random.Random(f"{seed}:{rec.id}")
        cands = [p for p in rng.sample(list(pool), min(len(pool), k + 1)) if p.id != rec.id][:k]
        prefix = "".join(ex.context(ex.gold) + ex.continuations[ex.gold] + FEWSHOT_DELIM for ex in cands)
        out.append(replace(rec, contexts=tuple(prefix + c for c in rec.contexts)))
    return out


def with_chat_template(records: Sequence[MCRecord], tokenizer) -> list[MCRecord]:
    """Wrap each context as a user turn with the model's chat template; the answer follows the assistant tag."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("eval.apply_chat_template=true but the model's tokenizer has no chat template")

    def wrap(ctx: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": ctx}], tokenize=False, add_generation_prompt=True)

    return [replace(r, contexts=tuple(wrap(c) for c in r.contexts), continuations=tuple(x.lstrip(" ") for x in r.continuations))
            for r in records]
