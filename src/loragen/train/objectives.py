"""Training objectives on multiple-choice records; each is a collate function and a summed loss.

- causal SFT: the gold request (context, " " + gold choice) tokenized exactly as the scorer does
  (lm-eval's encode_pair), loss on the answer tokens only; one loss unit per answer token.
- encoder (MiniLM): cross-entropy over cosine(question, choice) / temperature, embedded as the
  scorer embeds them (models.pooling.embed); one loss unit per question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from loragen.data.records import MCRecord
from loragen.errors import ConfigError
from loragen.evaluation.tokenization import encode_requests
from loragen.models.pooling import embed

IGNORE = -100


@dataclass
class Objective:
    collate: Callable[[list[MCRecord]], dict[str, Any]]
    loss: Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, int]]


def make_objective(kind: str, tokenizer, *, max_length: int, temperature: float) -> Objective:
    if kind == "causal":
        return causal_sft(tokenizer, max_length=max_length)
    if kind == "encoder":
        return encoder_choice_ce(tokenizer, max_length=max_length, temperature=temperature)
    raise ConfigError(f"no training objective for model kind {kind!r} (causal | encoder)")


# causal LMs ------------------------------------------------------------------------------------

def causal_sft(tokenizer, *, max_length: int) -> Objective:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(records: list[MCRecord]) -> dict[str, Any]:
        pairs = encode_requests(tokenizer, [(r.context(r.gold), r.continuations[r.gold]) for r in records])
        seqs = [sft_example(ctx, cont, max_length) for ctx, cont in pairs]
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(seqs):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(lab)] = torch.tensor(lab)
            mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "num_tokens": int(mask.sum())}

    def loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        device = next(model.parameters()).device
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        targets = batch["labels"][:, 1:].to(device)
        keep = targets != IGNORE  # only answer positions reach the vocabulary-sized cross-entropy
        picked = logits[:, :-1][keep].float()
        return F.cross_entropy(picked, targets[keep], reduction="sum"), int(keep.sum())

    return Objective(collate, loss)


def sft_example(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): context then answer, labels IGNORE on the context; the context is cut from the left."""
    if not cont:
        raise ConfigError("a gold continuation tokenized to no tokens; cannot train on it")
    cont = list(cont)[-max_length + 1:] if len(cont) >= max_length else list(cont)
    ctx = list(ctx)[max(len(ctx) - (max_length - len(cont)), 0):]
    if not ctx:  # the first answer token needs something to be predicted from
        ctx, cont = cont[:1], cont[1:]
    return ctx + cont, [IGNORE] * len(ctx) + cont


# encoders --------------------------------------------------------------------------------------

def encoder_choice_ce(tokenizer, *, max_length: int, temperature: float) -> Objective:
    if temperature <= 0:
        raise ConfigError(f"lora.temperature={temperature}; expected > 0")

    def collate(records: list[MCRecord]) -> dict[str, Any]:
        ctxs: dict[str, int] = {}
        conts: dict[str, int] = {}
        pairs, owner, gold = [], [], []
        for i, rec in enumerate(records):
            for ctx, cont in rec.requests():  # cos(context_k, choice_k), as the scorer
                pairs.append((ctxs.setdefault(ctx, len(ctxs)), conts.setdefault(cont.strip(), len(conts))))
                owner.append(i)
            gold.append(rec.gold)
        # questions and the (much shorter) choices are embedded in two passes: far less padding
        pairs = [(c, len(ctxs) + x) for c, x in pairs]
        width = max(r.num_choices for r in records)
        slot = torch.tensor([k for rec in records for k in range(rec.num_choices)])
        return {"texts": list(ctxs), "choice_texts": list(conts), "pairs": torch.tensor(pairs),
                "owner": torch.tensor(owner), "slot": slot, "gold": torch.tensor(gold), "width": width, "num_tokens": 0}

    def loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        emb = torch.cat([embed(model, tokenizer, batch["texts"], max_length=max_length),
                         embed(model, tokenizer, batch["choice_texts"], max_length=max_length)])
        pairs = batch["pairs"].to(emb.device)
        cos = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(-1)
        logits = torch.full((len(batch["gold"]), batch["width"]), float("-inf"), device=emb.device)
        logits = logits.index_put((batch["owner"].to(emb.device), batch["slot"].to(emb.device)), cos / temperature)
        return F.cross_entropy(logits, batch["gold"].to(emb.device), reduction="sum"), len(batch["gold"])

    return Objective(collate, loss)
