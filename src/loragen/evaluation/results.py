"""results.json / samples.jsonl / results.csv / results.md: the shared results contract (DESIGN.md).

Multiple-choice entries carry acc, acc_stderr, acc_norm; prompt->text entries (eval.method=generate on
instruction data) carry the text metrics of loragen.evaluation.text_evaluator instead.
"""

from __future__ import annotations

import csv
import io as _io
from pathlib import Path
from typing import Sequence

from loragen import io, rundir
from loragen.data.registry import LoadedSplit
from loragen.evaluation import text_metrics
from loragen.evaluation.evaluator import EvalOutcome
from loragen.evaluation.text_evaluator import METRICS as TEXT_METRICS
from loragen.evaluation.text_evaluator import TextEvalOutcome

FIELDS = ["label", "adapter_path", "model", "model_path", "dataset", "split", "n", "acc", "acc_stderr", "acc_norm", "seconds"]
TEXT_FIELDS = [*TEXT_METRICS, "language", "bleu_tokenize", "embed_sim_english_only"]
TEXT_HEADERS = {"bleu": "BLEU-4", "rouge_l": "ROUGE-L F1", "exact_match": "exact match", "embed_sim": "embed sim",
                "success_rate": "success", "gen_seconds": "s / doc", "gen_tokens": "tokens / doc"}


def result_entry(label: str, adapter_path: str | None, model: str, model_path: str, split: LoadedSplit,
                 outcome: EvalOutcome | TextEvalOutcome) -> dict:
    entry = {
        "label": label, "adapter_path": adapter_path, "model": model, "model_path": model_path,
        "dataset": split.dataset, "split": split.split, "n": outcome.n,
    }
    if isinstance(outcome, TextEvalOutcome):
        entry.update({k: outcome.metrics[k] for k in TEXT_FIELDS})
    else:
        entry.update(acc=outcome.acc, acc_stderr=outcome.acc_stderr, acc_norm=outcome.acc_norm)
    entry["seconds"] = round(outcome.seconds, 3)
    if getattr(outcome, "unparseable", None) is not None:
        entry["unparseable"] = outcome.unparseable
    if getattr(outcome, "truncated", None) is not None:  # eval.overlong=truncate: documents with a choice cut
        entry["truncated"] = outcome.truncated
    return entry


def sample_rows(label: str, dataset: str, outcome: EvalOutcome | TextEvalOutcome) -> list[dict]:
    rows = outcome.rows if isinstance(outcome, TextEvalOutcome) else outcome.samples
    return [{"label": label, "dataset": dataset, **s} for s in rows]


def write_results(out_dir: str | Path, entries: Sequence[dict], samples: Sequence[dict], provenance: dict) -> Path:
    out = Path(out_dir)
    io.write_jsonl(out / rundir.SAMPLES, list(samples))
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_fields(entries), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(entries)
    io.write_text(out / rundir.RESULTS_CSV, buf.getvalue())
    io.write_text(out / rundir.RESULTS_MD, render_markdown(entries))
    return io.write_json(out / rundir.RESULTS, {"results": list(entries), "provenance": provenance})


def csv_fields(entries: Sequence[dict]) -> list[str]:
    """FIELDS, without the accuracy columns when every entry is prompt->text, with the text metrics when any is."""
    mc = not entries or any("acc" in e for e in entries)
    fields = [f for f in FIELDS[:-1] if mc or f not in ("acc", "acc_stderr", "acc_norm")]
    return fields + (TEXT_FIELDS if any("bleu" in e for e in entries) else []) + ["seconds"]


def render_markdown(entries: Sequence[dict]) -> str:
    """Multiple-choice tables (render_accuracy), then one table of text metrics per prompt->text dataset."""
    mc = [e for e in entries if "acc" in e]
    text = [e for e in entries if "acc" not in e]
    parts = ([render_accuracy(mc)] if mc else []) + ([render_text_metrics(text)] if text else [])
    return "\n".join(parts)


def render_text_metrics(entries: Sequence[dict]) -> str:
    """Per dataset: rows base and adapters, columns the text metrics; then how each metric was computed."""
    lines: list[str] = []
    for d in dict.fromkeys(e["dataset"] for e in entries):
        rows = [e for e in entries if e["dataset"] == d]
        first = rows[0]
        lines += [f"## generation: {d} ({first['split']}, n={first['n']}, language {first['language']})", "",
                  "| | " + " | ".join(TEXT_HEADERS[m] for m in TEXT_METRICS) + " |", "|---" * (len(TEXT_METRICS) + 1) + "|"]
        for e in rows:
            cells = [fmt_text_metric(m, e.get(m)) for m in TEXT_METRICS]
            lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
        lines += ["", f"BLEU-4: sacreBLEU corpus BLEU (0-100), tokenize={first['bleu_tokenize']}. "
                  "ROUGE-L F1: longest common subsequence, mean over documents; CJK text by characters, other text by "
                  "words (lowercased, punctuation dropped). "
                  f"Exact match: after {text_metrics.EM_NORMALISATION}. "
                  f"Embed sim: cosine of {text_metrics.EMBED_MODEL} embeddings of output and reference. "
                  "Success: a non-empty output that ended with end-of-sequence within max_new_tokens. "
                  "s / doc: generation wall time per document; tokens / doc: new tokens before end-of-sequence."]
        if any(e.get("embed_sim_english_only") for e in rows):
            lines += ["", f"Note: {text_metrics.EMBED_MODEL} is an English-only model and this dataset's language is "
                      f"{first['language']}: its embed sim is not a meaningful similarity here."]
        lines.append("")
    return "\n".join(lines)


def fmt_text_metric(metric: str, v) -> str:
    """A text metric as results.md and the report print it: BLEU 2 decimals, seconds 3, tokens 1, fractions 4."""
    if v is None:
        return "–"
    return {"bleu": f"{v:.2f}", "gen_seconds": f"{v:.3f}", "gen_tokens": f"{v:.1f}"}.get(metric, f"{v:.4f}")


def render_accuracy(entries: Sequence[dict]) -> str:
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
    cut = {d: max(e.get("truncated") or 0 for e in entries if e["dataset"] == d) for d in datasets}
    if any(cut.values()):
        lines += ["", "Truncated (eval.overlong=truncate): " + ", ".join(
            f"{d}: {n} of {ns[d]} documents" for d, n in cut.items() if n) +
            " had a choice longer than the model's context; its last tokens that fit were scored."]
    return "\n".join(lines) + "\n"
