"""results.json / samples.jsonl / results.csv / results.md: the shared results contract (DESIGN.md)."""

from __future__ import annotations

import csv
import io as _io
from pathlib import Path
from typing import Sequence

from loragen import io
from loragen.data.registry import LoadedSplit
from loragen.evaluation.evaluator import EvalOutcome

FIELDS = ["label", "adapter_path", "model", "model_path", "dataset", "split", "n", "acc", "acc_stderr", "acc_norm", "seconds"]


def result_entry(label: str, adapter_path: str | None, model: str, model_path: str, split: LoadedSplit,
                 outcome: EvalOutcome) -> dict:
    entry = {
        "label": label, "adapter_path": adapter_path, "model": model, "model_path": model_path,
        "dataset": split.dataset, "split": split.split, "n": outcome.n, "acc": outcome.acc,
        "acc_stderr": outcome.acc_stderr, "acc_norm": outcome.acc_norm, "seconds": round(outcome.seconds, 3),
    }
    if outcome.unparseable is not None:
        entry["unparseable"] = outcome.unparseable
    return entry


def sample_rows(label: str, dataset: str, outcome: EvalOutcome) -> list[dict]:
    return [{"label": label, "dataset": dataset, **s} for s in outcome.samples]


def write_results(out_dir: str | Path, entries: Sequence[dict], samples: Sequence[dict], provenance: dict) -> Path:
    out = Path(out_dir)
    io.write_jsonl(out / "samples.jsonl", list(samples))
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(entries)
    io.write_text(out / "results.csv", buf.getvalue())
    io.write_text(out / "results.md", render_markdown(entries))
    return io.write_json(out / "results.json", {"results": list(entries), "provenance": provenance})


def render_markdown(entries: Sequence[dict]) -> str:
    """Rows: base and adapters; columns: datasets and their mean. acc first, acc_norm in its own table."""
    labels = list(dict.fromkeys(e["label"] for e in entries))
    datasets = list(dict.fromkeys(e["dataset"] for e in entries))
    by = {(e["label"], e["dataset"]): e for e in entries}
    splits = {e["dataset"]: e["split"] for e in entries}
    ns = {e["dataset"]: e["n"] for e in entries}

    def table(metric: str, cols: list[str]) -> list[str]:
        head = "| | " + " | ".join(f"{d} ({splits[d]}, n={ns[d]})" for d in cols) + " | mean |"
        rows = [head, "|---" * (len(cols) + 2) + "|"]
        for lab in labels:
            vals = [by.get((lab, d), {}).get(metric) for d in cols]
            cells = []
            for d, v in zip(cols, vals):
                se = by.get((lab, d), {}).get("acc_stderr")
                cells.append("–" if v is None else (f"{v:.4f} ± {se:.4f}" if metric == "acc" and se == se else f"{v:.4f}"))
            got = [v for v in vals if v is not None]
            mean = f"{sum(got) / len(got):.4f}" if got and len(got) == len(vals) else "–"
            rows.append(f"| {lab} | " + " | ".join(cells) + f" | {mean} |")
        return rows

    lines = ["## acc (± stderr)", ""] + table("acc", datasets)
    norm_cols = [d for d in datasets if any(by.get((lab, d), {}).get("acc_norm") is not None for lab in labels)]
    if norm_cols:
        lines += ["", "## acc_norm (by characters of the choice)", ""] + table("acc_norm", norm_cols)
    return "\n".join(lines) + "\n"
