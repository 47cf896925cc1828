"""Training objectives; each is a collate function and a summed loss with its number of loss units.

Multiple-choice records (MCRecord):
- causal SFT: the gold request (context, " " + gold choice) tokenized exactly as the scorer does
  (lm-eval's encode_pair), loss on the answer tokens only; one loss unit per answer token.
- seq2seq SFT: the context as the encoder input, the gold continuation as the decoder labels, tokenized
  as the seq2seq scorer does; one unit per answer token.
- encoder (MiniLM): cross-entropy over cosine(question, choice) / temperature, embedded as the
  scorer embeds them (models.pooling.embed); one loss unit per question.

Prompt -> text records (TextRecord, instruction data): the prompt is rendered by
models.chat.render_prompt and tokenized exactly as generation tokenizes it (tokenizer(text), default
special tokens); the target is tokenizer(target, add_special_tokens=False) + EOS, so the model learns
to stop. Causal: prompt then target in one sequence, labels IGNORE on the prompt. Seq2seq: the prompt
is the encoder input, target + EOS the decoder labels. Loss on the target tokens (and EOS) only; one
unit per target token.

Truncation to `max_length` tokens: the answer (target + EOS) keeps its first tokens (at most
max_length - 1 for causal models, max_length for seq2seq labels; EOS is lost when the target is cut), the
prompt keeps its last tokens (cut from the left), as the multiple-choice causal SFT does with its context.

Causal batches are left-padded with explicit position ids, so every row's answer ends at the last
position and only the last K positions (K: the longest answer in the batch) reach the vocabulary
projection (transformers' logits_to_keep), as in the scorer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from loragen.data.records import MCRecord, TextRecord
from loragen.errors import ConfigError, DataError
from loragen.evaluation.scoring import last_logits, right_padded
from loragen.evaluation.tokenization import encode_requests, encode_seq2seq_requests
from loragen.models.chat import render_prompt
from loragen.models.pooling import embed_groups, encode_groups

IGNORE = -100


@dataclass
class Objective:
    collate: Callable[[list], dict[str, Any]]
    loss: Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, int]]


def make_objective(kind: str, tokenizer, *, max_length: int, temperature: float, record_type: type = MCRecord,
                   chat_template: bool | str = "auto", system: str | None = None) -> Objective:
    """The objective for a model kind (causal | seq2seq | encoder) and a record type (MCRecord | TextRecord).

    chat_template and system apply to TextRecords only (how render_prompt wraps the prompt).
    """
    if record_type is TextRecord:
        if kind in ("causal", "seq2seq"):
            return text_sft(tokenizer, kind=kind, max_length=max_length, chat_template=chat_template, system=system)
        raise ConfigError(f"prompt -> text (instruction) data trains causal or seq2seq models; this model is {kind!r}")
    if record_type is not MCRecord:
        raise ConfigError(f"no training objective for records of type {record_type.__name__} (MCRecord | TextRecord)")
    if kind == "causal":
        return causal_sft(tokenizer, max_length=max_length)
    if kind == "seq2seq":
        return seq2seq_mc_sft(tokenizer, max_length=max_length)
    if kind == "encoder":
        return encoder_choice_ce(tokenizer, max_length=max_length, temperature=temperature)
    raise ConfigError(f"no training objective for model kind {kind!r} (causal | seq2seq | encoder)")


def record_type_of(records: Sequence) -> type:
    """The one record type of a training set (MCRecord or TextRecord); a mixture is an error."""
    types = {type(r) for r in records}
    if len(types) != 1:
        raise DataError(f"training records mix types {sorted(t.__name__ for t in types)}; expected one")
    return types.pop()


# causal LMs ------------------------------------------------------------------------------------

def causal_sft(tokenizer, *, max_length: int) -> Objective:
    pad = _pad_id(tokenizer)

    def collate(records: list[MCRecord]) -> dict[str, Any]:
        pairs = encode_requests(tokenizer, [(r.context(r.gold), r.continuations[r.gold]) for r in records])
        return causal_batch([sft_example(ctx, cont, max_length) for ctx, cont in pairs], pad)

    return Objective(collate, causal_loss)


def sft_example(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): context then answer, labels IGNORE on the context; the context is cut from the left."""
    if not cont:
        raise ConfigError("a gold continuation tokenized to no tokens; cannot train on it")
    cont = list(cont)[-max_length + 1:] if len(cont) >= max_length else list(cont)
    ctx = list(ctx)[max(len(ctx) - (max_length - len(cont)), 0):]
    if not ctx:  # the first answer token needs something to be predicted from
        ctx, cont = cont[:1], cont[1:]
    return ctx + cont, [IGNORE] * len(ctx) + cont


def text_sft_example(prompt: Sequence[int], answer: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a causal prompt -> text example: the answer keeps its first max_length - 1
    tokens, the prompt its last tokens that still fit (at least one)."""
    if max_length < 2:
        raise ConfigError(f"lora.max_length={max_length}; a causal example needs at least 2 tokens")
    answer = list(answer)[:max_length - 1]
    prompt = list(prompt)[len(prompt) - (max_length - len(answer)):] if len(prompt) + len(answer) > max_length else list(prompt)
    if not prompt:  # the first answer token needs something to be predicted from
        prompt, answer = answer[:1], answer[1:]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def causal_batch(seqs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Any]:
    """Left-padded inputs (each sequence but its last token), position ids, and the labels of the last K
    input positions [B, K] (IGNORE where a row's answer is shorter than K)."""
    keep = max(sum(t != IGNORE for t in lab[1:]) for _, lab in seqs)
    width = max(len(ids) - 1 for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), keep), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        n = len(ids) - 1
        input_ids[i, width - n:] = torch.tensor(ids[:-1])
        mask[i, width - n:] = 1
        tail = lab[1:][-keep:]
        labels[i, keep - len(tail):] = torch.tensor(tail)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels,
            "num_tokens": sum(len(ids) for ids, _ in seqs)}


def causal_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    logits = last_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                         batch["position_ids"].to(device), labels.shape[1])
    keep = labels != IGNORE
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"), int(keep.sum())


# seq2seq LMs -----------------------------------------------------------------------------------

def seq2seq_mc_sft(tokenizer, *, max_length: int) -> Objective:
    pad = _pad_id(tokenizer)

    def collate(records: list[MCRecord]) -> dict[str, Any]:
        pairs = encode_seq2seq_requests(tokenizer, [(r.context(r.gold), r.continuations[r.gold]) for r in records])
        if any(not cont for _, cont in pairs):
            raise ConfigError("a gold continuation tokenized to no tokens; cannot train on it")
        return seq2seq_batch([(ctx[-max_length:], cont[:max_length]) for ctx, cont in pairs], pad)

    return Objective(collate, seq2seq_loss)


def seq2seq_batch(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Any]:
    """Right-padded encoder inputs and decoder labels (IGNORE on padding)."""
    input_ids, mask = right_padded([enc for enc, _ in pairs], pad)
    labels, _ = right_padded([dec for _, dec in pairs], IGNORE)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "num_tokens": sum(len(enc) + len(dec) for enc, dec in pairs)}


def seq2seq_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """The model shifts the labels into decoder inputs itself (decoder start token first); its mean loss is unused."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   labels=labels).logits
    keep = labels != IGNORE
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"), int(keep.sum())


# prompt -> text (instruction data) -------------------------------------------------------------

def text_sft(tokenizer, *, kind: str, max_length: int, chat_template: bool | str = "auto",
             system: str | None = None) -> Objective:
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; prompt -> text training needs one to teach the model to stop")

    def encode(records: list[TextRecord]) -> list[tuple[list[int], list[int]]]:
        prompts = [render_prompt(tokenizer, r.prompt, kind=kind, chat_template=chat_template, system=system)
                   for r in records]
        answers = [ids + [eos] for ids in tokenizer([r.target for r in records], add_special_tokens=False)["input_ids"]]
        return list(zip(tokenizer(prompts)["input_ids"], answers))

    def collate(records: list[TextRecord]) -> dict[str, Any]:
        if kind == "causal":
            return causal_batch([text_sft_example(p, a, max_length) for p, a in encode(records)], pad)
        return seq2seq_batch([(p[-max_length:], a[:max_length]) for p, a in encode(records)], pad)

    return Objective(collate, causal_loss if kind == "causal" else seq2seq_loss)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, objective: Objective, records: Sequence, *, batch_size: int,
              accelerator=None) -> float:
    """Loss per unit (target token) over `records`, e.g. a validation slice; each process takes an
    interleaved slice and all processes get the same gathered value."""
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = [records[i] for i in range(rank, len(records), world)]
    total, units = 0.0, 0
    for start in range(0, len(mine), batch_size):
        loss, n = objective.loss(model, objective.collate(mine[start:start + batch_size]))
        total, units = total + float(loss), units + int(n)
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(total, units)])
        total, units = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return total / max(units, 1)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# encoders --------------------------------------------------------------------------------------

def encoder_choice_ce(tokenizer, *, max_length: int, temperature: float, encode=encode_groups) -> Objective:
    """Cross-entropy over cos(question, choice_k) / temperature. `encode(tokenizer, texts, max_length)` ->
    [(indices, inputs)]: by default groups of similar length (`pooling.encode_groups`); the bench's reference
    passes one padded batch."""
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
        # questions and the (much shorter) choices are embedded in groups of similar length: far less padding.
        # Both are tokenized here, not in the loss: the loop builds the next batch while this one trains
        pairs = [(c, len(ctxs) + x) for c, x in pairs]
        width = max(r.num_choices for r in records)
        slot = torch.tensor([k for rec in records for k in range(rec.num_choices)])
        return {"questions": encode(tokenizer, list(ctxs), max_length),
                "choices": encode(tokenizer, list(conts), max_length), "pairs": torch.tensor(pairs),
                "owner": torch.tensor(owner), "slot": slot, "gold": torch.tensor(gold), "width": width, "num_tokens": 0}

    def loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        emb = torch.cat([embed_groups(model, batch["questions"]), embed_groups(model, batch["choices"])])
        pairs = batch["pairs"].to(emb.device)
        cos = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(-1)
        logits = torch.full((len(batch["gold"]), batch["width"]), float("-inf"), device=emb.device)
        logits = logits.index_put((batch["owner"].to(emb.device), batch["slot"].to(emb.device)), cos / temperature)
        return F.cross_entropy(logits, batch["gold"].to(emb.device), reduction="sum"), len(batch["gold"])

    return Objective(collate, loss)
