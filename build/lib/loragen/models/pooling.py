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


def embed(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int = 256) -> torch.Tensor:
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
