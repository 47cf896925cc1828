"""Evaluate one model (base or with an adapter active) on one list of records: the one scorer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from loragen.data.records import MCRecord
from loragen.evaluation.generation import GenerationSettings
from loragen.evaluation.metrics import argmax, mean_stderr, norm_scores
from loragen.evaluation.scoring import cosines, loglikelihoods, seq2seq_loglikelihoods
from loragen.runtime import ProgressBar

LOGLIKELIHOOD = ("causal", "seq2seq")  # scored by continuation log-likelihood (acc_norm defined); encoders by cosine


@dataclass
class EvalOutcome:
    acc: float
    acc_stderr: float
    acc_norm: float | None
    n: int
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    unparseable: int | None = None  # eval.method=generate only
    truncated: int | None = None  # overlong="truncate" only: documents with a choice cut to the model's context


def evaluate_records(model, tokenizer, kind: str, records: Sequence[MCRecord], *, batch_size: int,
                     accelerator=None, desc: str = "", has_acc_norm: bool = True,
                     method: str = "loglikelihood", generation: GenerationSettings | None = None,
                     overlong: str = "error", where: str = "") -> EvalOutcome:
    """Score every record and compute acc, its stderr and acc_norm (causal and seq2seq LMs, where defined).

    method=generate: lettered options with `generation`'s decoding settings (default: greedy, 5 new tokens).
    With an accelerator each process scores an interleaved slice and all processes get the
    gathered, identical result. `overlong`: a choice longer than the model's context is an error naming the
    document (`where` first, e.g. "dataset piqa split validation"), or "truncate"d (see scoring); then the
    samples of such documents carry `truncated: true` and the outcome counts them.
    """
    t0 = time.perf_counter()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = list(range(rank, len(records), world))
    if method == "generate":
        from loragen.evaluation.generation import lettered_predictions

        g = generation or GenerationSettings(max_new_tokens=5)
        preds = lettered_predictions(model, tokenizer, [records[i] for i in mine], batch_size=batch_size, desc=desc,
                                     max_new_tokens=g.max_new_tokens, do_sample=g.do_sample,
                                     temperature=g.temperature, top_p=g.top_p, seed=g.seed + rank)
        local = [(i, [], p, False) for i, p in zip(mine, preds)]
    else:
        scores, cut = _score(model, tokenizer, kind, [records[i] for i in mine], mine, batch_size, desc, overlong, where)
        local = [(i, s, None, j in cut) for j, (i, s) in enumerate(zip(mine, scores))]
    if world > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)
    local.sort(key=lambda t: t[0])
    samples = []
    for i, scores, gen_pred, was_cut in local:
        rec = records[i]
        s = {"id": rec.id, "gold": rec.gold}
        if was_cut:
            s["truncated"] = True
        if method == "generate":
            s.update(pred=gen_pred, acc=float(gen_pred == rec.gold))
        else:
            pred = argmax(scores)
            s.update(scores=scores, pred=pred, acc=float(pred == rec.gold))
            if kind in LOGLIKELIHOOD and has_acc_norm:
                s["pred_norm"] = argmax(norm_scores(scores, rec.choices))
                s["acc_norm"] = float(s["pred_norm"] == rec.gold)
        samples.append(s)
    accs = [s["acc"] for s in samples]
    norms = [s["acc_norm"] for s in samples if "acc_norm" in s]
    return EvalOutcome(
        acc=sum(accs) / len(accs),
        acc_stderr=mean_stderr(accs),
        acc_norm=sum(norms) / len(norms) if norms else None,
        n=len(samples),
        samples=samples,
        seconds=time.perf_counter() - t0,
        unparseable=sum(s["pred"] < 0 for s in samples) if method == "generate" else None,
        truncated=sum(bool(s.get("truncated")) for s in samples) if overlong == "truncate" and method != "generate" else None,
    )


def _score(model, tokenizer, kind: str, records: Sequence[MCRecord], index: Sequence[int], batch_size: int,
           desc: str, overlong: str, where: str) -> tuple[list[list[float]], set[int]]:
    """(each record's scores, the positions in `records` of those with a truncated choice). The progress bar counts
    documents: one is done when all its choices are scored. `index`: the records' indices in the whole split."""
    owner = [(j, k) for j, rec in enumerate(records) for k in range(rec.num_choices)]
    requests = [req for rec in records for req in rec.requests()]
    bar = ProgressBar(len(records), desc or "scoring", unit="doc")
    waiting = [rec.num_choices for rec in records]

    def on_done(done: Sequence[int]) -> None:
        finished = 0
        for i in done:
            waiting[owner[i][0]] -= 1
            finished += waiting[owner[i][0]] == 0
        if finished:
            bar.update(finished)

    def describe(i: int) -> str:
        j, k = owner[i]
        return f"{where + ', ' if where else ''}document {index[j]} (id {records[j].id}), choice {k}"

    fn = {"causal": loglikelihoods, "seq2seq": seq2seq_loglikelihoods}.get(kind, cosines)
    try:
        flat = fn(model, tokenizer, requests, batch_size=batch_size, on_done=on_done, overlong=overlong,
                  describe=describe) if requests else []
    finally:
        bar.close()
    out, k = [], 0
    for rec in records:
        out.append(list(flat[k:k + rec.num_choices]))
        k += rec.num_choices
    return out, {owner[i][0] for i in getattr(flat, "truncated", [])}
