"""stage=data: load every split of the selected dataset(s); print sizes and a formatted example.

With data.to_instruction=true, each split is also written as Alpaca JSONL (instruction, input,
output; data.convert) to <run dir>/<dataset>/<split>.jsonl, which dataset=instruction reads back.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from loragen import io, runtime
from loragen.data import dataset_specs, load_split, subtasks
from loragen.data.convert import alpaca_rows
from loragen.data.records import TextRecord
from loragen.data.registry import data_options, splits_of

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    out = runtime.run_dir()
    summary: dict[str, dict] = {}
    lines = ["# Datasets", "", "| dataset | split | documents | source |", "|---|---|---|---|"]
    examples = []
    for spec in dataset_specs(cfg.dataset):
        summary[spec.name] = {}
        splits = splits_of(spec)
        local = spec.mc.name if "mc" in spec else spec.name  # an *_instruct dataset reads its multiple-choice files
        if cfg.paths.data_dir and "file" not in spec:  # every split file there, not only the ones the config uses
            splits += sorted(p.stem for p in (Path(cfg.paths.data_dir) / local).glob("*.jsonl") if p.stem not in splits)
        for split in splits:
            loaded = load_split(
                spec, split, **data_options(cfg)
            )
            summary[spec.name][split] = {"n": len(loaded.records), "source": loaded.source, "sha256": loaded.sha256}
            if cfg.data.to_instruction and runtime.is_main():
                path = io.write_jsonl(out / spec.name / f"{split}.jsonl", alpaca_rows(loaded.records, spec.format))
                summary[spec.name][split]["instruction_file"] = str(path)
                log.info("wrote %d instruction rows to %s (read back: dataset=instruction dataset.file=%s)",
                         len(loaded.records), path, path)
            lines.append(f"| {spec.name} | {split} | {len(loaded.records)} | {loaded.source} |")
            log.info("%-14s %-18s %6d documents  (%s)", spec.name, split, len(loaded.records), loaded.source)
            if split == spec.eval_split:
                for rec in loaded.records[: cfg.show.examples]:
                    examples.append(format_example(spec.name, split, rec))
    split_into = subtasks.sizes(cfg)  # datasets with dataset.subtasks.by set: their sub-tasks' sizes
    lines += subtasks.sizes_markdown(split_into)
    text = "\n".join(lines) + "\n\n# Examples\n\n" + "\n\n".join(examples) + "\n"
    if runtime.is_main():
        io.write_json(out / "data_summary.json", summary)
        if split_into:
            io.write_json(out / "subtasks.json", split_into)
        io.write_text(out / "data_summary.md", text)
        print(text)
    return summary


def format_example(name: str, split: str, rec) -> str:
    if isinstance(rec, TextRecord):
        return "\n".join([f"## {name} ({split}) id={rec.id}", "prompt:", "```", rec.prompt, "```", "target:", "```",
                          rec.target, "```"])
    rows = [f"## {name} ({split}) id={rec.id}", "```"]
    shared = len(rec.contexts) == 1
    if shared:
        rows.append(f"context={rec.contexts[0]!r}")
    for k, (ctx, cont) in enumerate(rec.requests()):
        mark = "  <- gold" if k == rec.gold else ""
        rows.append(f"[{k}] " + ("" if shared else f"context={ctx!r}  ") + f"continuation={cont!r}{mark}")
    rows.append("```")
    return "\n".join(rows)
