"""Prompt-to-weights pipelines side by side: did a change of recipe (e.g. sub-tasks) move held-out accuracy?

Given two or more dnd pipeline dirs (table.json + evaluate/<held out>/), each later one is compared with the
first on every held-out dataset both evaluated: per role (base, oracle, weight average, nearest-prompt LoRA,
generated mean), acc in each and the difference with its paired-bootstrap 95% interval over documents.
Base and oracle are the same models in both recipes, so their differences double as a check (0 when the
runs are deterministic).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from loragen import rundir
from loragen.errors import LoragenError
from loragen.evaluation.metrics import paired_bootstrap
from loragen.pipeline import dnd
from loragen.pipeline.dnd import ROLES, heldout_scores
from loragen.report.runs import kind_of, read_json

log = logging.getLogger(__name__)

HEADERS = {"base": "base", "oracle": "oracle (own LoRA)", "average": "weight average",
           "nearest": "nearest-prompt LoRA", "generated": "generated (mean)"}


def dnd_pipelines(paths: list[str | Path]) -> list[Path]:
    """The given dirs that are dnd pipeline dirs with a table (rows with a held-out dataset)."""
    out = []
    for p in dict.fromkeys(Path(p).expanduser().resolve() for p in paths):
        table = p / rundir.TABLE
        if table.is_file() and all("heldout" in r for r in read_json(table).get("rows", [])):
            out.append(p)
    return out


def dnd_table(root: Path) -> tuple[list[dict], str] | None:
    """(rows, source) of a dnd pipeline dir's leave-one-out table, or None when it is not one.

    Computed as the pipeline computes table.json (dnd.table on its config.yaml and its evaluate steps: the same
    documents, order and seed, so the same numbers), because the pipeline's report step runs before the pipeline
    writes table.json; read from table.json when that cannot be done (no config.yaml, a step missing)."""
    config, table = root / rundir.CONFIG, root / rundir.TABLE
    if config.is_file():
        cfg = OmegaConf.load(config)
        if OmegaConf.select(cfg, "pipeline.recipe") == "dnd":
            try:
                return dnd.table(cfg, root), f"computed from the evaluate steps of `{root}` as its table.json is"
            except (LoragenError, OSError, KeyError, ValueError) as e:
                log.warning("%s: cannot compute its table (%s); reading %s instead", root, e, table)
    if table.is_file():
        rows = read_json(table).get("rows", [])
        if rows and all("heldout" in r and "oracle_diff" in r for r in rows):
            return rows, f"`{table}`"
    return None


def dnd_pipelines_or_tables(paths: list[str | Path]) -> dict[Path, tuple[list[dict], str]]:
    """pipeline dir -> (table rows, source) for every given dir that is a dnd pipeline dir with a table."""
    out = {}
    for p in dict.fromkeys(Path(p).expanduser().resolve() for p in paths):
        found = dnd_table(p) if p.is_dir() and kind_of(p) == "pipeline" else None
        if found is not None:
            out[p] = found
    return out


def diff_cell(a: dict[str, float], b: dict[str, float], seed: int) -> str:
    if not a or not b or set(a) != set(b):
        return "– (not the same documents)"
    ids = list(a)
    d, lo, hi = paired_bootstrap([a[i] for i in ids], [b[i] for i in ids], seed=seed)
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def compare(ref: Path, other: Path, seed: int) -> list[str]:
    ref_rows = {r["heldout"]: r for r in read_json(ref / rundir.TABLE)["rows"]}
    other_rows = {r["heldout"]: r for r in read_json(other / rundir.TABLE)["rows"]}
    both = [h for h in ref_rows if h in other_rows]
    lines = [f"### `{other}` vs `{ref}`", ""]
    if not both:
        return lines + ["No held-out dataset in common.", ""]
    lines += ["| held out (split, n) | training tasks | " + " | ".join(HEADERS[r] for r in ROLES) + " |",
              "|---|---|" + "---|" * len(ROLES)]
    for h in both:
        a, b = heldout_scores(ref, h), heldout_scores(other, h)
        cells = [f"{a.acc[r]:.3f} → {b.acc[r]:.3f} ({diff_cell(a.docs[r], b.docs[r], seed)})" for r in ROLES]
        lines.append(f"| {h} ({a.split}, {a.n}) | {ref_rows[h]['train_tasks']} → {other_rows[h]['train_tasks']} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def pipelines_section(paths: list[str | Path], seed: int) -> list[str]:
    found = dnd_pipelines(paths)
    if len(found) < 2:
        return []
    lines = ["## Pipelines compared", "",
             f"Each pipeline against the first (`{found[0]}`), per held-out dataset: acc first → other, and in "
             "parentheses other − first with its paired-bootstrap 95% interval over documents (2000 resamples). "
             "Generated: the mean over the generated adapters, per document. Base and oracle are the same models "
             "in both, so a difference there means the runs did not reproduce.", ""]
    for other in found[1:]:
        lines += compare(found[0], other, seed)
    return lines
