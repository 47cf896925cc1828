"""stage=pipeline: run an experiment recipe's steps through the existing stages, then write its table.

Each step runs in `<run dir>/<step name>/`; running again with the same `hydra.run.dir`
skips finished steps and resumes an interrupted one (see pipeline.engine).
"""

from __future__ import annotations

import csv
import io as _io
import logging

from omegaconf import DictConfig

from loragen import io, runtime
from loragen.errors import ConfigError
from loragen.pipeline import dnd, engine, executors, paw

log = logging.getLogger(__name__)
RECIPES = {"paw": paw, "dnd": dnd}
EXECUTORS = {"local": engine.run_in_process, "submitit_local": executors.submitit_local, "slurm": executors.slurm}


def run(cfg: DictConfig) -> dict:
    recipe = RECIPES.get(cfg.pipeline.recipe)
    if recipe is None:
        raise ConfigError(f"pipeline.recipe={cfg.pipeline.recipe!r}; known recipes: {sorted(RECIPES)} "
                          "(pick an experiment, e.g. experiment=paw_tiny)")
    execute = EXECUTORS.get(cfg.pipeline.executor)
    if execute is None:
        raise ConfigError(f"pipeline.executor={cfg.pipeline.executor!r}; expected one of {sorted(EXECUTORS)}")
    root = runtime.run_dir()

    status = engine.run_steps(recipe.steps(cfg, root), root, engine.shared_overrides(cfg), execute)

    rows = recipe.table(cfg, root)
    if runtime.is_main():
        io.write_json(root / "table.json", {"rows": rows, "steps": status})
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        io.write_text(root / "table.csv", buf.getvalue())
        text = recipe.markdown(cfg, rows)
        io.write_text(root / "table.md", text)
        print(text)
        log.info("pipeline table in %s", root / "table.md")
    return {"rows": rows, "steps": status}
