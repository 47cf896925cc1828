"""Evaluate one model (base or with an adapter active) on prompt -> text records: generate, then score."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from loragen.data.records import TextRecord
from loragen.evaluation import text_metrics as tm
from loragen.evaluation.generation import GenerationSettings, generate_texts
from loragen.models.chat import render_prompt

# metrics[...] keys, in the order results.md shows them
METRICS = ("bleu", "rouge_l", "exact_match", "embed_sim", "success_rate", "gen_seconds", "gen_tokens")


@dataclass
class TextEvalOutcome:
    """metrics: bleu (corpus BLEU-4, 0-100), rouge_l (mean F1, 0-1), exact_match, embed_sim (mean cosine),
    success_rate (fractions), gen_seconds (mean per document), gen_tokens (mean new tokens); plus
    language, bleu_tokenize and embed_sim_english_only. rows: one dict per document in record order:
    id, prompt, output, reference, tokens, terminated, seconds, bleu, rouge_l, exact_match, embed_sim, success."""

    metrics: dict
    rows: list[dict] = field(default_factory=list)
    n: int = 0
    seconds: float = 0.0


def evaluate_texts(model, tokenizer, kind: str, records: Sequence[TextRecord], *,
                   generation: GenerationSettings | None = None, batch_size: int = 8, language: str | None = None,
                   accelerator=None, desc: str = "") -> TextEvalOutcome:
    """Generate an answer to every record's prompt (rendered by render_prompt) and score it against its target.

    language: "en", "zh", ... (the dataset's language key); None detects Chinese from the references.
    With an accelerator each process generates an interleaved slice; every process gets the gathered result.
    """
    g = generation or GenerationSettings()
    t0 = time.perf_counter()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = [records[i] for i in range(rank, len(records), world)]
    prompts = [render_prompt(tokenizer, r.prompt, kind=kind, chat_template=g.chat_template, system=g.system) for r in mine]
    gens = generate_texts(model, tokenizer, prompts, kind=kind, batch_size=batch_size, max_new_tokens=g.max_new_tokens,
                          do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p, seed=g.seed + rank,
                          desc=desc)
    lang = language or tm.detect_language([r.target for r in records])
    tok = tm.bleu_tokenizer(lang)
    device = str(next(model.parameters()).device)
    sims = tm.embedding_similarities([x.text for x in gens], [r.target for r in mine], device=device) if mine else []
    local = []
    for i, r, x, sim in zip(range(rank, len(records), world), mine, gens, sims):
        local.append((i, {
            "id": r.id, "prompt": r.prompt, "output": x.text, "reference": r.target, "tokens": x.tokens,
            "terminated": x.terminated, "seconds": round(x.seconds, 4),
            "bleu": tm.sentence_bleu(x.text, r.target, tok), "rouge_l": tm.rouge_l(x.text, r.target),
            "exact_match": tm.exact_match(x.text, r.target), "embed_sim": sim, "success": tm.success(x.text, x.terminated),
        }))
    if world > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)
    rows = [row for _, row in sorted(local, key=lambda t: t[0])]
    return TextEvalOutcome(corpus_metrics(rows, lang), rows, len(rows), time.perf_counter() - t0)


def corpus_metrics(rows: Sequence[dict], language: str) -> dict:
    """The corpus-level metrics of per-document rows (as evaluate_texts builds them)."""
    n = max(len(rows), 1)
    tok = tm.bleu_tokenizer(language)

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rows) / n

    return {
        "bleu": tm.corpus_bleu([r["output"] for r in rows], [r["reference"] for r in rows], tok),
        "rouge_l": mean("rouge_l"), "exact_match": mean("exact_match"), "embed_sim": mean("embed_sim"),
        "success_rate": mean("success"), "gen_seconds": mean("seconds"), "gen_tokens": mean("tokens"),
        "language": language, "bleu_tokenize": tok, "embed_sim_english_only": not language.lower().startswith("en"),
    }
