"""Score multiple-choice requests: summed continuation log-likelihood (causal and seq2seq LMs) or cosine (encoders).

Causal scoring follows lm-evaluation-harness: pairs tokenized as `tokenization.encode_pair`, inputs
`(ctx + cont)[-(max_length + 1):][:-1]`, the log-probabilities of the continuation tokens
summed. Requests are sorted by length and batched with left padding and explicit position ids; where the model
allows, the requests sharing a context (a document's choices) share one row, the context encoded once (see
`loglikelihoods`): exact for causal attention, so the scores are lm-eval's up to float rounding.
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
from loragen.models.pooling import EMBED_MAX_LENGTH, embed_encoded


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
    """Summed log-probability of each continuation given its context.

    Each request is (prefix, scored tokens): `(ctx + cont)[-(max_length + 1):]` split before its last n_cont tokens.
    Where the model allows (`packable`), the requests sharing a prefix (a document's choices) are one row: the
    prefix once, then each continuation without its last token, with position ids continuing from the prefix
    and an attention mask that lets each continuation see the prefix and itself only: for a causal LM exactly
    the computation of one row per request, with the prefix encoded once. A forward never holds more than
    `batch_size` requests. Otherwise one left-padded row per request.
    """
    max_len = model_max_length(model, tokenizer)
    device = next(model.parameters()).device
    items: list[tuple[list[int], list[int]]] = []  # (prefix the scored tokens follow, scored tokens) per request
    truncated: list[int] = []
    for i, ((ctx, cont), (ctx_ids, cont_ids)) in enumerate(zip(requests, encode_requests(tokenizer, requests))):
        if not cont_ids:
            raise DataError(f"continuation {cont!r} tokenizes to nothing after context ...{ctx[-40:]!r}; "
                            "every choice needs at least one token to be scored")
        n_cont = fit_continuation(i, ctx_ids, cont_ids, max_len, overlong, describe, truncated)
        whole = (ctx_ids + cont_ids)[-(max_len + 1):]
        items.append((whole[:-n_cont], whole[-n_cont:]))
    out = [0.0] * len(items)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if items and packable(model, items):
        batches = _packed_batches(items, batch_size)
        score = _score_packed
    else:
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        score = _score_rows
    for batch in batches:
        done = score(model, items, batch, pad, device, out)
        if on_done is not None:
            on_done(done)
    return Scores(out, truncated)


PACKABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")  # rotary positions from position_ids, 4D masks


def packable(model, items: Sequence[tuple[list[int], list[int]]]) -> bool:
    """Whether requests with a shared prefix may share a row: a model family known to take position ids and a
    custom 4D attention mask as they are (sdpa or eager attention), every prefix non-empty, and no request
    longer than a sliding attention window (the custom mask is plain causal)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in PACKABLE or getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if any(not prefix for prefix, _ in items):
        return False
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    sliding = "sliding_attention" in types if types else window is not None and getattr(cfg, "use_sliding_window", True)
    return not sliding or max(len(p) + len(x) for p, x in items) <= int(window)


Row = tuple[list[int], list[int]]  # (shared prefix, the requests scored after it)


def _packed_batches(items: Sequence[tuple[list[int], list[int]]], batch_size: int) -> list[list[Row]]:
    """Rows of requests sharing a prefix (at most batch_size each), longest first, in batches of at most batch_size
    requests."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (prefix, _) in enumerate(items):
        groups.setdefault(tuple(prefix), []).append(i)
    rows = [(list(p), idx[s:s + batch_size]) for p, idx in groups.items() for s in range(0, len(idx), batch_size)]
    rows.sort(key=lambda r: -_row_width(items, r))
    batches, n = [], batch_size
    for row in rows:
        if n + len(row[1]) > batch_size:
            batches.append([])
            n = 0
        batches[-1].append(row)
        n += len(row[1])
    return batches


def _row_width(items, row: Row) -> int:
    return len(row[0]) + sum(len(items[i][1]) - 1 for i in row[1])


def _score_packed(model, items, batch: list[Row], pad: int, device, out: list[float]) -> list[int]:
    """Score one batch of packed rows into `out`; return the request indices scored. A batch that shares no prefix
    goes the plain way (no [B, W, W] mask to build)."""
    if all(len(idx) == 1 for _, idx in batch):
        return _score_rows(model, items, [idx[0] for _, idx in batch], pad, device, out)
    widths = [_row_width(items, r) for r in batch]
    width = max(widths)
    keep = max(w - len(r[0]) + 1 for w, r in zip(widths, batch))  # from the last prefix position to the end
    off = width - keep
    inp = torch.full((len(batch), width), pad, dtype=torch.long)
    seg = torch.full((len(batch), width), -1, dtype=torch.long)  # -1 padding, 0 prefix, k the k-th continuation
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols, targets, spans, done = [], [], [], [], []
    for b, ((prefix, idx), w) in enumerate(zip(batch, widths)):
        start, n_pre = width - w, len(prefix)
        ids, segs, posl = list(prefix), [0] * n_pre, list(range(n_pre))
        for k, i in enumerate(idx, 1):
            scored = items[i][1]
            first = start + len(ids)  # where this continuation's inputs begin
            ids += scored[:-1]
            segs += [k] * (len(scored) - 1)
            posl += range(n_pre, n_pre + len(scored) - 1)
            rows += [b] * len(scored)
            cols += [start + n_pre - 1 - off, *range(first - off, first - off + len(scored) - 1)]
            targets += scored
            spans.append((i, len(scored)))
            done.append(i)
        inp[b, start:] = torch.tensor(ids)
        seg[b, start:] = torch.tensor(segs)
        pos[b, start:] = torch.tensor(posl)
    ar = torch.arange(width)
    sq, sk = seg[:, :, None], seg[:, None, :]
    allowed = (ar[None, :] <= ar[:, None]) & (sk >= 0) & ((sk == 0) | (sk == sq))
    allowed |= torch.eye(width, dtype=torch.bool)  # a padding position sees itself: no row is fully masked
    # Additive, in the model's dtype: what eager attention adds to its scores, and faster than a boolean one in sdpa.
    dtype = model.get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    logits = last_logits(model, inp.to(device), mask.to(device), pos.to(device), keep)
    _sum_into(out, logits, rows, cols, targets, spans, device)
    return done


def _score_rows(model, items, idx: list[int], pad: int, device, out: list[float]) -> list[int]:
    """Score one batch of requests, one left-padded row each, into `out`; return the request indices scored."""
    # Left padding: every row ends at the same position, so only the last `keep` positions
    # need logits (the lm_head over the whole sequence is the costly part for large vocabularies).
    width = max(len(items[i][0]) + len(items[i][1]) - 1 for i in idx)
    keep = max(len(items[i][1]) for i in idx)
    inp = torch.full((len(idx), width), pad, dtype=torch.long)
    att = torch.zeros((len(idx), width), dtype=torch.long)
    rows, cols, targets, spans = [], [], [], []
    for row, i in enumerate(idx):
        prefix, scored = items[i]
        whole, n_cont = prefix + scored, len(scored)
        n_in = len(whole) - 1
        inp[row, width - n_in:] = torch.tensor(whole[:-1])
        att[row, width - n_in:] = 1
        rows += [row] * n_cont
        cols += range(keep - n_cont, keep)  # within the kept positions
        targets += scored
        spans.append((i, n_cont))
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    logits = last_logits(model, inp.to(device), att.to(device), pos.to(device), keep)
    _sum_into(out, logits, rows, cols, targets, spans, device)
    return idx


def _sum_into(out: list[float], logits, rows, cols, targets, spans, device) -> None:
    """out[i] = the summed log-probabilities of request i's scored tokens, (i, n_tokens) in `spans` in token order."""
    picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    picked = picked if picked.dtype == torch.float64 else picked.float()
    logp = torch.log_softmax(picked, dim=-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
    vals, k = logp.double().cpu().tolist(), 0
    for i, n in spans:
        out[i] = sum(vals[k:k + n])  # in float64
        k += n


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

    The texts are tokenized once and batched in order of their token count, so a batch pads little (ARC-Challenge:
    29% fewer tokens through the model than batches sorted by characters); a padded position is masked out of
    attention and pooling, so the embeddings are the same up to float rounding.
    (The encoder's tokenizer cuts long texts to its max length: nothing is over-long here.)"""
    texts = list(dict.fromkeys(t for pair in requests for t in (pair[0], pair[1].strip())))
    users: dict[str, list[int]] = {}  # text -> the requests that need it
    for i, (c, x) in enumerate(requests):
        for t in dict.fromkeys((c, x.strip())):
            users.setdefault(t, []).append(i)
    missing = [len({c, x.strip()}) for c, x in requests]  # texts a request still waits for
    features = tokenizer(texts, truncation=True, max_length=EMBED_MAX_LENGTH) if texts else {}
    features = [{k: v[i] for k, v in features.items()} for i in range(len(texts))]
    order = sorted(range(len(texts)), key=lambda i: len(features[i]["input_ids"]))
    vecs: dict[str, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        enc = dict(tokenizer.pad([features[i] for i in chunk], return_tensors="pt"))
        done = []
        for i, v in zip(chunk, embed_encoded(model, enc).cpu()):
            vecs[texts[i]] = v
            for r in users[texts[i]]:
                missing[r] -= 1
                if missing[r] == 0:
                    done.append(r)
        if on_done is not None and done:
            on_done(done)
    return Scores([float(vecs[c] @ vecs[x.strip()]) for c, x in requests])
