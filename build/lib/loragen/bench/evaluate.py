"""Evaluation speed: loragen's batched scorer vs a plain loop that scores each (context, choice) pair alone.

Same tiny causal model, same 500 ARC-Easy test documents (4 choices); accuracies must agree.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from loragen.data import load_split
from loragen.evaluation import evaluate_records
from loragen.evaluation.metrics import argmax
from loragen.evaluation.tokenization import encode_pair
from loragen.models import load_model

CONF = Path(__file__).resolve().parents[3] / "conf"
N_DOCS, REPEATS = 500, 3


def _paths():
    cache = os.environ.get("LORAGEN_CACHE_DIR") or str(Path.home() / ".cache" / "loragen")
    return OmegaConf.create({"data_dir": os.environ.get("LORAGEN_DATA_DIR"), "models_dir": None, "cache_dir": cache})


@torch.no_grad()
def plain_loop(model, tokenizer, records) -> float:
    correct = 0
    for rec in records:
        scores = []
        for ctx, cont in rec.requests():
            c, x = encode_pair(tokenizer, ctx, cont)
            whole = torch.tensor([c + x])
            logp = torch.log_softmax(model(input_ids=whole[:, :-1]).logits[0].float(), -1)
            scores.append(float(logp[len(c) - 1:].gather(-1, whole[0, len(c):, None]).sum()))
        correct += argmax(scores) == rec.gold
    return correct / len(records)


def run() -> dict:
    paths = _paths()
    lm = load_model(OmegaConf.load(CONF / "model" / "tiny_qwen2.yaml"), paths)
    records = load_split(OmegaConf.load(CONF / "dataset" / "arc_easy.yaml"), "test", data_dir=paths.data_dir, limit=N_DOCS).records
    ours, ref = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        acc = evaluate_records(lm.model, lm.tokenizer, "causal", records, batch_size=32).acc
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref_acc = plain_loop(lm.model, lm.tokenizer, records)
        ref.append(time.perf_counter() - t0)
    if abs(acc - ref_acc) > 1e-9:
        raise AssertionError(f"accuracies differ: loragen {acc} vs plain loop {ref_acc}")
    a, b = N_DOCS / statistics.median(ours), N_DOCS / statistics.median(ref)
    return {"name": "evaluate", "metric": "docs/s (tiny_qwen2, 500 ARC-E docs)", "loragen": a, "reference": b,
            "ratio": a / b, "target": ">= 2", "notes": f"acc {acc:.4f} identical; median of {REPEATS}"}
