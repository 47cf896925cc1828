"""stage=pipeline: run an experiment recipe's steps through the existing stages, then write its table.

Each step runs in `<run dir>/<step name>/`; running again with the same `hydra.run.dir`
skips finished steps and resumes an interrupted one (see pipeline.engine). `pipeline.dry_run=true`
prints the steps and runs none.

When it ends, it logs (console and loragen.log) its own wall time and the slowest steps run this time, with their
share of it (engine.profile); the report's "Profile by step" has every step's seconds, CPU seconds and load.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import logging
from typing import Iterator

from omegaconf import DictConfig

from loragen import io, rundir, runtime
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
    t0 = engine.clock()
    root = runtime.run_dir()
    steps = recipe.steps(cfg, root)
    if cfg.pipeline.dry_run:
        print(describe(steps))
        return {"steps": {s.name: {"overrides": s.overrides, "deps": s.deps} for s in steps}}

    with _workers(cfg, execute, root) as execute:
        status = engine.run_steps(steps, root, engine.shared_overrides(cfg), execute,
                                  cpu=cfg.pipeline.executor != "slurm")

    rows = recipe.table(cfg, root)
    if runtime.is_main():
        io.write_json(root / rundir.TABLE, {"rows": rows, "steps": status})
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        io.write_text(root / rundir.TABLE_CSV, buf.getvalue())
        text = recipe.markdown(cfg, rows)
        io.write_text(root / rundir.TABLE_MD, text)
        for png in getattr(recipe, "plots", lambda *a: [])(cfg, rows, root):
            log.info("plot %s", png)
        print(text)
        log.info("pipeline table in %s", root / rundir.TABLE_MD)
        log.info("%s", engine.profile(status, engine.clock() - t0))  # on the console and in loragen.log
    return {"rows": rows, "steps": status}


@contextlib.contextmanager
def _workers(cfg: DictConfig, execute, root) -> Iterator:
    """The executor, as a pool of local worker processes when pipeline.workers > 1 (pipeline.pool)."""
    if cfg.pipeline.executor != "local" or cfg.pipeline.workers <= 1:
        yield execute
        return
    from loragen.pipeline.pool import LocalPool

    with LocalPool(cfg.pipeline.workers, log_file=root / rundir.LOG) as pool:
        yield pool


def describe(steps: list[engine.Step]) -> str:
    """The step list of a dry run: one line per step with what it waits for, then its overrides."""
    lines = [f"{len(steps)} steps (pipeline.dry_run=true: none run)"]
    for s in steps:
        lines.append(f"{s.name}  <- {', '.join(s.deps) if s.deps else '(no dependencies)'}")
        lines.append(f"    {' '.join(s.overrides)}")
    return "\n".join(lines)
