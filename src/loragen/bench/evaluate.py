"""Evaluation speed: stage=evaluate's scorer vs lm-evaluation-harness's HF model, side by side in one process.

Both score the same 500 ARC-Easy test documents (4 choices each, lm-eval's 0-shot prompt
"Question: ...\\nAnswer:" and " choice" continuations) with the same tiny causal model object and
tokenizer, at the same batch size (32). lm-eval reads the local jsonl through a task YAML written to
a temporary directory (as tests/test_lm_eval_parity.py does), so nothing is downloaded.

Timed, alternating the sides (a warm-up each, then REPEATS each):
- loragen: `evaluate_records(model, tok, "causal", records, batch_size=32)`: tokenization, scoring, acc.
- lm-eval: `HFLM.loglikelihood` inside `lm_eval.simple_evaluate` (its tokenization, sorting and batching,
  forwards, per-request results); the task building, request construction and metric aggregation of
  simple_evaluate around it are not timed.
Checks, or run() raises: per document and choice, the log-likelihoods of the timed (float32) runs agree to TOL
per continuation token (|diff| / tokens: an ARC choice sums up to ~60 token log-probabilities of about -6 on the
tiny model, and float32 resolves such sums only to ~3e-5, so lm-eval's own float32 sums are ~3e-5 from exact),
and those of one more, untimed, run of both sides with the same model in float64 agree to TOL absolutely;
acc and acc_norm are identical per document.

A second row compares with a plain loop that scores each (context, choice) pair alone (one repeat).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from loragen.data import load_split
from loragen.evaluation import evaluate_records
from loragen.evaluation.metrics import argmax
from loragen.evaluation.tokenization import encode_pair, encode_requests
from loragen.models import load_model

CONF = Path(__file__).resolve().parents[3] / "conf"
N_DOCS, REPEATS, BATCH, TOL = 500, 3, 32, 1e-5
TASK = "lg_bench_arc_easy"


def _paths():
    cache = os.environ.get("LORAGEN_CACHE_DIR") or str(Path.home() / ".cache" / "loragen")
    return OmegaConf.create({"data_dir": os.environ.get("LORAGEN_DATA_DIR"), "models_dir": None, "cache_dir": cache})


def write_task(d: Path, data_dir: str) -> None:
    """lm-eval's own arc_easy 0-shot config, restated against the local test.jsonl."""
    (d / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data_dir}/arc_easy/test.jsonl
        output_type: multiple_choice
        test_split: test
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
        doc_to_choice: "{{{{choices.text}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))


class LmEvalSide:
    """An HFLM around the loaded model, a TaskManager on the local task, and the time spent in loglikelihood()."""

    def __init__(self, model, tokenizer, task_dir: Path):
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        self.hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH)
        self.tasks = TaskManager(include_path=str(task_dir))
        self.seconds = 0.0
        inner = self.hflm.loglikelihood

        def timed(requests, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(requests, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        self.hflm.loglikelihood = timed  # simple_evaluate calls getattr(lm, "loglikelihood")

    def run(self) -> tuple[float, list[dict]]:
        """(seconds in loglikelihood, the samples sorted by doc_id)."""
        import lm_eval

        self.seconds = 0.0
        out = lm_eval.simple_evaluate(model=self.hflm, tasks=[TASK], limit=N_DOCS, log_samples=True,
                                      task_manager=self.tasks, verbosity="ERROR")
        return self.seconds, sorted(out["samples"][TASK], key=lambda s: s["doc_id"])


@torch.no_grad()
def plain_loop(model, tokenizer, records) -> list[list[float]]:
    """Each (context, choice) pair alone, one forward each, no padding."""
    out = []
    for rec in records:
        scores = []
        for ctx, cont in rec.requests():
            c, x = encode_pair(tokenizer, ctx, cont)
            whole = torch.tensor([c + x])
            logp = torch.log_softmax(model(input_ids=whole[:, :-1]).logits[0].float(), -1)
            scores.append(float(logp[len(c) - 1:].gather(-1, whole[0, len(c):, None]).sum()))
        out.append(scores)
    return out


def max_diff(a: list[list[float]], b: list[list[float]], n_tokens: list[list[int]] | None = None) -> float:
    """max |a - b| over all (document, choice); with n_tokens, of |a - b| / (continuation tokens)."""
    if [len(x) for x in a] != [len(x) for x in b]:
        raise AssertionError("different numbers of documents or choices")
    n_tokens = n_tokens or [[1] * len(x) for x in a]
    return max(abs(x - y) / n for u, v, w in zip(a, b, n_tokens) for x, y, n in zip(u, v, w))


def continuation_tokens(tokenizer, records) -> list[list[int]]:
    return [[len(x) for _, x in encode_requests(tokenizer, rec.requests())] for rec in records]


def _lls(outcome, samples) -> tuple[list[list[float]], list[list[float]]]:
    """(loragen's, lm-eval's) per-document per-choice log-likelihoods, after checking they are the same documents."""
    if len(samples) != N_DOCS or [s["id"] for s in outcome.samples] != [s["doc"]["id"] for s in samples]:
        raise AssertionError("loragen and lm-eval scored different documents")
    return [s["scores"] for s in outcome.samples], [[r[0] for r in s["filtered_resps"]] for s in samples]


def _same_acc(outcome, samples) -> None:
    for key in ("acc", "acc_norm"):
        if [s[key] for s in outcome.samples] != [s[key] for s in samples]:
            raise AssertionError(f"per-document {key} differ: loragen {getattr(outcome, key)}, "
                                 f"lm-eval {sum(s[key] for s in samples) / len(samples)}")


def _span(ts: list[float]) -> str:
    return f"median {statistics.median(ts):.2f}s, min-max {min(ts):.2f}-{max(ts):.2f}s"


def run() -> list[dict]:
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    paths = _paths()
    lm = load_model(OmegaConf.load(CONF / "model" / "tiny_qwen2.yaml"), paths)
    records = load_split(OmegaConf.load(CONF / "dataset" / "arc_easy.yaml"), "test", data_dir=paths.data_dir,
                         limit=N_DOCS).records
    if len(records) != N_DOCS:
        raise AssertionError(f"expected {N_DOCS} ARC-Easy test documents, got {len(records)}")

    def ours():
        t0 = time.perf_counter()
        out = evaluate_records(lm.model, lm.tokenizer, "causal", records, batch_size=BATCH)
        return time.perf_counter() - t0, out

    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp), paths.data_dir)
        side = LmEvalSide(lm.model, lm.tokenizer, Path(tmp))
        ours(), side.run()  # warm-up (lm-eval: also builds and caches the local dataset)
        t_ours, t_ref = [], []
        for _ in range(REPEATS):
            t, outcome = ours()
            t_ours.append(t)
            t, samples = side.run()
            t_ref.append(t)
        lm.model.double()  # untimed: the same model in float64, where both sides' sums are exact to ~1e-12
        try:
            outcome64, samples64 = ours()[1], side.run()[1]
        finally:
            lm.model.float()

    ntok = continuation_tokens(lm.tokenizer, records)
    mine, theirs = _lls(outcome, samples)
    diff, diff_abs = max_diff(mine, theirs, ntok), max_diff(mine, theirs)
    if diff > TOL:
        raise AssertionError(f"per-choice log-likelihoods differ from lm-eval's by up to {diff:.3g} per continuation "
                             f"token (> {TOL}; {diff_abs:.3g} in total)")
    diff64 = max_diff(*_lls(outcome64, samples64))
    if diff64 > TOL:
        raise AssertionError(f"float64: per-choice log-likelihoods differ from lm-eval's by up to {diff64:.3g} (> {TOL})")
    _same_acc(outcome64, samples64)
    _same_acc(outcome, samples)
    a, b = N_DOCS / statistics.median(t_ours), N_DOCS / statistics.median(t_ref)
    threads = torch.get_num_threads()
    rows = [{"name": "evaluate", "metric": "docs/s (tiny_qwen2, 500 ARC-E docs, batch 32)", "loragen": a,
             "reference": b, "ratio": a / b, "target": ">= 1.5",
             "notes": (f"vs lm-eval {_lm_eval_version()} HFLM on the same model object; per-choice log-likelihoods agree "
                       f"to {diff:.2g} per continuation token (<= {TOL}; max |diff| {diff_abs:.2g} on sums up to "
                       f"{max(abs(x) for u in theirs for x in u):.0f}, float32 resolution), and to {diff64:.2g} "
                       f"(<= {TOL}) with the model in float64 (untimed); acc {outcome.acc:.4f} and "
                       f"acc_norm {outcome.acc_norm:.4f} identical per document; loragen evaluate_records "
                       f"{_span(t_ours)}; lm-eval HFLM.loglikelihood (tokenize, sort, forward; not the task building, "
                       f"request construction, metrics) {_span(t_ref)}; {REPEATS} alternating repeats after a warm-up; "
                       f"torch threads {threads}")}]
    t0 = time.perf_counter()
    plain = plain_loop(lm.model, lm.tokenizer, records)
    t_plain = time.perf_counter() - t0
    d_plain = max_diff(mine, plain, ntok)
    if d_plain > TOL or [argmax(s) for s in plain] != [s["pred"] for s in outcome.samples]:
        raise AssertionError(f"plain loop disagrees with loragen ({d_plain:.3g} per token)")
    c = N_DOCS / t_plain
    rows.append({"name": "evaluate_plain_loop", "metric": "docs/s (tiny_qwen2, 500 ARC-E docs)", "loragen": a,
                 "reference": c, "ratio": a / c, "target": ">= 2",
                 "notes": f"vs one forward per (context, choice) pair, one run ({t_plain:.2f}s); agree to {d_plain:.2g} "
                          f"per token; torch threads {threads}"})
    return rows


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
