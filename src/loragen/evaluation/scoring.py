"""Score multiple-choice requests: summed continuation log-likelihood (causal and seq2seq LMs) or cosine (encoders).

Causal scoring follows lm-evaluation-harness: pairs tokenized as `tokenization.encode_pair`, inputs
`(ctx + cont)[-(max_length + 1):][:-1]`, the log-probabilities of the continuation tokens
summed. Requests are sorted by length and batched with left padding and explicit position ids.
Seq2seq scoring follows lm-evaluation-harness too: the context (cut from the left to max_length) is
the encoder input, the continuation the decoder labels; their log-probabilities summed.

A continuation longer than max_length (the model's context) cannot be scored whole. lm-evaluation-harness
asserts `len(continuation_enc) <= max_length` and stops; `overlong="error"` does the same with an OverlongError
naming the request (`describe(i)`) and the lengths. `overlong="truncate"` scores the continuation's last
max_length tokens: causal, `(ctx + cont)[-(max_length + 1):]` as ever, the first of those (the token before them)
only conditions; seq2seq, the decoder labels `cont[-max_length:]`. The indices of such requests are the result's
`truncated`.

`on_done(indices)`: called after each batch with the request indices it scored (progress by document).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from loragen.errors import DataError, OverlongError
from loragen.evaluation.tokenization import encode_requests, encode_seq2seq_requests
from loragen.models.pooling import embed


def model_max_length(model, tokenizer, default: int = 2048) -> int:
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    tml = getattr(tokenizer, "model_max_length", None)
    return int(tml) if tml and tml < 1e9 else default


OVERLONG = ("error", "truncate")
OnDone = Callable[[Sequence[int]], None]


class Scores(list):
    """One score per request (a plain list), and `truncated`: the requests whose continuation was cut."""

    def __init__(self, values=(), truncated: Sequence[int] = ()):
        super().__init__(values)
        self.truncated = list(truncated)


def fit_continuation(i: int, ctx_ids: list[int], cont_ids: list[int], max_len: int, overlong: str,
                     describe: Callable[[int], str] | None, truncated: list[int]) -> int:
    """How many continuation tokens of request `i` are scored: all, or (overlong=truncate) the last max_len."""
    if len(cont_ids) <= max_len:
        return len(cont_ids)
    if overlong not in OVERLONG:
        raise DataError(f"overlong={overlong!r}; expected one of {OVERLONG}")
    if overlong == "error":
        what = describe(i) if describe is not None else f"request {i}"
        raise OverlongError(
            f"{what}: the continuation is {len(cont_ids)} tokens, longer than the model's context of {max_len} "
            f"(context {len(ctx_ids)} tokens); lm-evaluation-harness refuses such a document too. "
            f"stage=evaluate with eval.overlong=truncate scores its last {max_len} tokens (results.json counts such "
            "documents); or leave the document out (eval.limit, or a split slice such as validation[:300])")
    truncated.append(i)
    return max_len


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int,
                   on_done: OnDone | None = None, overlong: str = "error",
                   describe: Callable[[int], str] | None = None) -> Scores:
    """Summed log-probability of each continuation given its context."""
    max_len = model_max_length(model, tokenizer)
    device = next(model.parameters()).device
    seqs: list[tuple[list[int], int]] = []  # (context + continuation, left-truncated; continuation tokens scored)
    truncated: list[int] = []
    for i, ((ctx, cont), (ctx_ids, cont_ids)) in enumerate(zip(requests, encode_requests(tokenizer, requests))):
        if not cont_ids:
            raise DataError(f"continuation {cont!r} tokenizes to nothing after context ...{ctx[-40:]!r}; "
                            "every choice needs at least one token to be scored")
        n_cont = fit_continuation(i, ctx_ids, cont_ids, max_len, overlong, describe, truncated)
        seqs.append(((ctx_ids + cont_ids)[-(max_len + 1):], n_cont))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = torch.zeros(len(seqs), dtype=torch.float64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        # Left padding: every row ends at the same position, so only the last `keep` positions
        # need logits (the lm_head over the whole sequence is the costly part for large vocabularies).
        width = max(len(seqs[i][0]) - 1 for i in idx)
        keep = max(seqs[i][1] for i in idx)
        inp = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for row, i in enumerate(idx):
            whole, n_cont = seqs[i]
            n_in = len(whole) - 1
            inp[row, width - n_in:] = torch.tensor(whole[:-1])
            att[row, width - n_in:] = 1
            rows += [row] * n_cont
            cols += range(keep - n_cont, keep)  # within the kept positions
            targets += whole[-n_cont:]
            owner += [i] * n_cont
        pos = (att.cumsum(-1) - 1).clamp_min(0)
        logits = last_logits(model, inp.to(device), att.to(device), pos.to(device), keep)
        picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
        logp = torch.log_softmax(picked, dim=-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
        out.index_add_(0, torch.tensor(owner), logp.double().cpu())
        if on_done is not None:
            on_done(idx)
    return Scores(out.tolist(), truncated)


def last_logits(model, inp, att, pos, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions ([B, keep, V])."""
    try:
        logits = model(input_ids=inp, attention_mask=att, position_ids=pos, logits_to_keep=keep).logits
    except TypeError:  # a model class without logits_to_keep
        logits = model(input_ids=inp, attention_mask=att, position_ids=pos).logits
    return logits[:, -keep:]  # also right when logits_to_keep was accepted but ignored


@torch.no_grad()
def seq2seq_loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int,
                           on_done: OnDone | None = None, overlong: str = "error",
                           describe: Callable[[int], str] | None = None) -> Scores:
    """Summed log-probability of each continuation (decoder labels) given its context (encoder input)."""
    max_len = model_max_length(model, tokenizer)
    device = next(model.parameters()).device
    pairs = []
    truncated: list[int] = []
    for i, ((ctx, cont), (ctx_ids, cont_ids)) in enumerate(zip(requests, encode_seq2seq_requests(tokenizer, requests))):
        if not cont_ids:
            raise DataError(f"continuation {cont!r} tokenizes to nothing after context ...{ctx[-40:]!r}; "
                            "every choice needs at least one token to be scored")
        n_cont = fit_continuation(i, ctx_ids, cont_ids, max_len, overlong, describe, truncated)
        pairs.append((ctx_ids[-max_len:], cont_ids[len(cont_ids) - n_cont:]))
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    out = [0.0] * len(pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc, att = right_padded([pairs[i][0] for i in idx], pad)
        labels, keep = right_padded([pairs[i][1] for i in idx], -100)
        logits = model(input_ids=enc.to(device), attention_mask=att.to(device), labels=labels.to(device)).logits.float()
        keep = keep.bool().to(device)
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).to(device)[..., None])[..., 0]
        for row, i in enumerate(idx):
            out[i] = float(logp[row][keep[row]].double().sum())
        if on_done is not None:
            on_done(idx)
    return Scores(out, truncated)


def right_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, longest] ids padded on the right with `pad`, and the [B, longest] mask of real positions."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def cosines(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int,
            on_done: OnDone | None = None, **_) -> Scores:
    """cos(embed(context), embed(continuation)) per request; each distinct text is embedded once.

    (The encoder's tokenizer cuts long texts to its max length: nothing is over-long here.)"""
    texts = list(dict.fromkeys(t for pair in requests for t in (pair[0], pair[1].strip())))
    users: dict[str, list[int]] = {}  # text -> the requests that need it
    for i, (c, x) in enumerate(requests):
        for t in dict.fromkeys((c, x.strip())):
            users.setdefault(t, []).append(i)
    missing = [len({c, x.strip()}) for c, x in requests]  # texts a request still waits for
    texts.sort(key=len)  # similar lengths per batch: less padding
    vecs: dict[str, torch.Tensor] = {}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        done = []
        for t, v in zip(chunk, embed(model, tokenizer, chunk).cpu()):
            vecs[t] = v
            for i in users[t]:
                missing[i] -= 1
                if missing[i] == 0:
                    done.append(i)
        if on_done is not None and done:
            on_done(done)
    return Scores([float(vecs[c] @ vecs[x.strip()]) for c, x in requests])
