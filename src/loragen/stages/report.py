"""stage=report: report.md and PNG plots from finished runs.

    loragen stage=report report.runs=[<pipeline dir>]
    loragen stage=report report.runs=[<lora run>,<generator run>,<generate run>,<evaluate run>]

Runs of either kind mix in one report: multiple-choice results (acc) and prompt->text results (BLEU-4,
ROUGE-L, exact match, ... of eval.method=generate or a lora run on instruction data).

Recipe: find out what each dir is from its files (report.runs), then one section each: for a prompt-to-weights
pipeline dir first the forest plot of each role's held-out accuracy − base with its interval, then the runs and
their wall times, accuracy per evaluated dataset, generation metrics per prompt->text dataset, training
curves (with validation loss, logged text metrics and the best checkpoint), adapter similarity, timing, and
(given two or more prompt-to-weights pipeline dirs) the pipelines compared held-out dataset by held-out dataset.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from loragen import io, rundir, runtime
from loragen.errors import ConfigError
from loragen.report import compare, sections
from loragen.report.runs import collect

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    r = cfg.report
    if int(r.max_checkpoints) < 1:
        raise ConfigError(f"report.max_checkpoints={r.max_checkpoints}; expected at least 1")
    out = runtime.run_dir()
    runs = collect(list(r.runs or []))

    lines = ["# loragen report", "", "Runs: " + ", ".join(f"`{p}`" for p in r.runs), ""]
    lines += sections.forest_section(list(r.runs), out)  # the finding first: held-out differences to base
    lines += sections.steps_section(runs)
    lines += sections.accuracy_section(runs, out, cfg.seed)
    lines += sections.generation_section(runs, out)
    lines += sections.training_section(runs, out)
    lines += sections.similarity_section(runs, out, int(r.max_checkpoints))
    lines += sections.timing_section(runs, out)
    lines += compare.pipelines_section(list(r.runs), cfg.seed)

    report = out / rundir.REPORT
    if runtime.is_main():
        io.write_text(report, "\n".join(lines))
    plots = sorted(p.name for p in out.glob("*.png"))
    log.info("report in %s with %d plots", report, len(plots))
    return {"report": str(report), "plots": plots, "runs": [s["name"] for s in runs.steps]}
