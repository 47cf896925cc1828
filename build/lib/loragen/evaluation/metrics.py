"""Accuracy metrics as lm-evaluation-harness computes them, and a paired bootstrap for differences."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def argmax(xs: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, as lm-eval)."""
    return int(np.argmax(np.asarray(xs, dtype=np.float64)))


def norm_scores(scores: Sequence[float], choices: Sequence[str]) -> list[float]:
    """acc_norm's scores: summed log-likelihood divided by the choice text's length in characters."""
    return [s / max(len(c), 1) for s, c in zip(scores, choices)]


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample (n-1) variance, as lm-eval's acc_stderr."""
    n = len(values)
    if n < 2:
        return float("nan")
    arr = np.asarray(values, dtype=np.float64)
    return float(math.sqrt(arr.var(ddof=1) / n))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over documents and its 95% paired-bootstrap interval."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    boots = diff[idx].mean(1)
    return float(diff.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))
