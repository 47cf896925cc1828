"""Sentence embeddings from an encoder: mean pooling over real tokens, L2-normalised.

Shared by the encoder scorer (evaluation), the encoder LoRA objective (training) and the
generator's prompt encoder, so all three see the same geometry.
"""

from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, C] states and [B, L] mask -> [B, C] mean over the masked-in tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


EMBED_MAX_LENGTH = 256  # tokens of a text the encoder sees (longer ones are cut)


def embed(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int = EMBED_MAX_LENGTH) -> torch.Tensor:
    """[len(texts), C] unit-norm sentence embeddings (differentiable; wrap in no_grad to score)."""
    return embed_encoded(model, encode_texts(tokenizer, texts, max_length))


def encode_texts(tokenizer, texts: list[str], max_length: int = 256) -> dict[str, torch.Tensor]:
    """The model inputs `embed` feeds for `texts` (padded, truncated to max_length): tokenize ahead, e.g. in a collate."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def embed_encoded(model: torch.nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """`embed` of texts already tokenized by encode_texts."""
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    hidden = model(**enc).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]).float(), dim=-1)


# A forward call costs about this many tokens of padding; `length_groups` cuts a batch where the padding saved exceeds
# it. MiniLM LoRA steps of 16 on 2 CPU cores with oneDNN's linears (hardware.cpu_linear): each call streams the
# encoder's 42 MB of weights again and oneDNN's product gets faster with rows, so 64 beat 16 by ~15% a step
# (ARC-Easy, PIQA; 32 in between, 128 level with 64). With torch's own (MKL) linears 16 and 48 were level.
CALL_COST_TOKENS = 64


def length_groups(lengths: list[int], call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length, minimising padded tokens + call_cost per group.

    Optimal over contiguous runs of the length-sorted order (dynamic programming, O(n^2) for a batch)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sl = [lengths[i] for i in order]
    best, cut = [0] + [None] * len(sl), [0] * (len(sl) + 1)
    for j in range(1, len(sl) + 1):  # best[j]: cost of the first j; a group (i, j] pads to sl[j-1]
        best[j], cut[j] = min((best[i] + (j - i) * sl[j - 1] + call_cost, i) for i in range(j))
    groups, j = [], len(sl)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def encode_groups(tokenizer, texts: list[str], max_length: int = 256,
                  call_cost: int = CALL_COST_TOKENS) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """`encode_texts` in groups of similar length (`length_groups`): (indices into texts, inputs) per group.

    One padded batch of questions wastes about half its tokens (ARC-Easy, batch 16: 425 real of 992); the
    embeddings are the same up to float rounding (a padded position is masked out of attention and pooling)."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    return [(idx, encode_texts(tokenizer, [texts[i] for i in idx], max_length))
            for idx in length_groups(lengths, call_cost)]


def embed_groups(model: torch.nn.Module, groups: list[tuple[list[int], dict[str, torch.Tensor]]]) -> torch.Tensor:
    """[n, C] embeddings of texts encoded by `encode_groups`, in the texts' order (differentiable)."""
    order = torch.tensor([i for idx, _ in groups for i in idx])
    emb = torch.cat([embed_encoded(model, enc) for _, enc in groups])
    return emb[torch.argsort(order).to(emb.device)]
