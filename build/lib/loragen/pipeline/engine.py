"""The step engine. Each step is one stage run in its own subdirectory of the pipeline's run dir.

A step records the fingerprint of the config that produced it (and of the steps it depends
on) once it finishes. Running the pipeline again skips steps whose fingerprint matches and
whose outputs exist, reruns a step whose config changed (and, through the fingerprint chain,
everything that depends on it; the old outputs are moved aside, never overwritten), and
resumes a step that was interrupted (no fingerprint yet) in place.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from loragen import fingerprint as fp
from loragen import io, rundir, runtime
from loragen.errors import ConfigError

log = logging.getLogger(__name__)
FINGERPRINT = rundir.STEP_RECORD


@dataclass
class Step:
    name: str                 # its subdirectory, e.g. "lora_source/arc_easy"
    overrides: list[str]      # Hydra overrides composing its config (on top of the pipeline's shared ones)
    outputs: list[str]        # files (relative to its dir) that exist once it has finished
    deps: list[str] = field(default_factory=list)


def quote(value: Any) -> str:
    """A value as a Hydra override string (paths with odd characters, lists, dicts, null)."""
    if value is None:
        return "null"
    if isinstance(value, dict):  # keys as they are: Hydra dict keys (letters, digits, _ - @ . / ...)
        return "{" + ",".join(f"{k}:{quote(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(quote(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def shared_overrides(cfg: DictConfig) -> list[str]:
    """What every step inherits from the pipeline run: hardware, tracker, seed, paths and data settings."""
    out = [f"hardware={cfg.hardware.name}", f"tracker={cfg.tracker.name}", f"seed={cfg.seed}"]
    for group in ("hardware", "tracker", "paths", "data"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if key != "name" and not isinstance(value, dict):
                out.append(f"{group}.{key}={quote(value)}")
    return out


def compose_step(step: Step, shared: list[str]) -> DictConfig:
    """The step's config, composed and validated (loragen.stages.checks) as its stage will see it."""
    from hydra import compose

    from loragen.stages.checks import validate

    try:
        cfg = compose(config_name="config", overrides=shared + step.overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's own message says what is wrong
        raise ConfigError(f"pipeline step {step.name}: cannot compose its config ({e})") from None
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"pipeline step {step.name}: {e}") from None
    return cfg


def fingerprint(step_cfg: DictConfig, dep_prints: Iterable[str]) -> tuple[str, dict]:
    """(hash, content): the step's result-affecting config, its data by content and its dependencies' hashes."""
    content = {**fp.step_content(step_cfg), "deps": sorted(dep_prints)}
    return fp.digest(content), content


def run_steps(steps: list[Step], root: Path, shared: list[str], execute) -> dict[str, dict]:
    """Run `steps` under `root`; `execute(step, cfg, step_dir)` runs one step.

    Steps run in waves: every step whose dependencies are done. When the executor has a
    `run_many(items)` (SLURM, submitit), a wave's steps go out together as one job array;
    otherwise they run one after another in the order given.
    Returns {step name: {"status": "done" | "skipped", "dir": str, "fingerprint": str}}.
    """
    _check_deps(steps)
    configs = {s.name: compose_step(s, shared) for s in steps}  # every step checked before any runs or is submitted
    if steps:
        fp.check_data_source(configs[steps[0].name])
    status: dict[str, dict] = {}
    moved: list[str] = []
    pending = list(steps)
    while pending:
        wave = [s for s in pending if all(d in status for d in s.deps)]
        pending = [s for s in pending if s not in wave]
        todo = []
        for step in wave:
            step_cfg = configs[step.name]
            digest, content = fingerprint(step_cfg, [status[d]["fingerprint"] for d in step.deps])
            step_dir = root / step.name
            recorded = _read_record(step_dir)
            done = all((step_dir / o).exists() for o in step.outputs)
            if recorded and done and (recorded["fingerprint"] == digest or _legacy_same(recorded, step, status)):
                if recorded["fingerprint"] != digest and runtime.is_main():  # a record from before content hashes
                    io.write_json(step_dir / FINGERPRINT, {**recorded, "fingerprint": digest, "content": content})
                    log.info("step %-28s recorded before content fingerprints; same step overrides and unchanged "
                             "inputs: kept, its record upgraded", step.name)
                log.info("step %-28s skipped (done, fingerprint %s)", step.name, digest)
                status[step.name] = {"status": "skipped", "dir": str(step_dir), "fingerprint": digest}
                continue
            if recorded and recorded["fingerprint"] != digest:
                why = fp.changed_keys(recorded["content"], content) if "content" in recorded else \
                    ["recorded before content fingerprints, with other step overrides or changed inputs"]
                stale = _stale_name(step_dir)
                step_dir.rename(stale)
                moved.append(f"{step.name} -> {stale.name} ({'; '.join(why[:6])}{' ...' if len(why) > 6 else ''})")
                log.info("step %-28s changed (%s): old outputs moved to %s", step.name, "; ".join(why[:6]), stale)
            todo.append((step, step_cfg, step_dir, digest, content))
        t0 = time.perf_counter()
        if len(todo) > 1 and hasattr(execute, "run_many"):
            log.info("steps %s submitted together", ", ".join(t[0].name for t in todo))
            execute.run_many([(step, cfg, step_dir) for step, cfg, step_dir, *_ in todo])
            for step, _, step_dir, digest, content in todo:
                status[step.name] = _finish(step, step_dir, digest, content, time.perf_counter() - t0)
        else:
            for step, cfg, step_dir, digest, content in todo:
                log.info("step %-28s running in %s", step.name, step_dir)
                t0 = time.perf_counter()
                execute(step, cfg, step_dir)
                status[step.name] = _finish(step, step_dir, digest, content, time.perf_counter() - t0)
    if moved:
        log.info("moved aside in this run (kept, not deleted):\n  %s", "\n  ".join(moved))
    return status


def _stale_name(step_dir: Path) -> Path:
    """`<name>.stale-<time>`, with a counter when a step changed twice within a second."""
    base = f"{step_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, k = step_dir.with_name(base), 1
    while candidate.exists():
        candidate, k = step_dir.with_name(f"{base}.{k}"), k + 1
    return candidate


def _check_deps(steps: list[Step]) -> None:
    names = {s.name for s in steps}
    for step in steps:
        unknown = [d for d in step.deps if d not in names]
        if unknown:
            raise ConfigError(f"pipeline step {step.name} depends on {unknown}, which no step defines")


def _legacy_same(recorded: dict, step: Step, status: dict[str, dict]) -> bool:
    """A record written before content fingerprints (no `content`) stands for this step when it was made with the
    same step overrides and none of its inputs was redone in this run. (Its hash cannot be recomputed: the typed
    configs render some values differently, e.g. lora.alpha 16 -> 16.0.)"""
    return ("content" not in recorded and recorded.get("overrides") == step.overrides
            and all(status[d]["status"] == "skipped" for d in step.deps))


def _finish(step: Step, step_dir: Path, digest: str, content: dict, seconds: float) -> dict:
    missing = [o for o in step.outputs if not (step_dir / o).exists()]
    if missing:
        raise ConfigError(f"pipeline step {step.name} finished without its outputs {missing} in {step_dir}")
    if runtime.is_main():
        io.write_json(step_dir / FINGERPRINT, {"fingerprint": digest, "deps": step.deps, "overrides": step.overrides,
                                               "seconds": round(seconds, 1), "content": content})
    return {"status": "done", "dir": str(step_dir), "fingerprint": digest}


def run_in_process(step: Step, cfg: DictConfig, step_dir: Path) -> None:
    """The local executor: the stage runs in this process, with step_dir as its run dir."""
    from loragen.stages import run_stage

    with runtime.using_run_dir(step_dir):
        if runtime.is_main():
            io.write_text(step_dir / rundir.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        run_stage(cfg)


def _read_record(step_dir: Path) -> dict | None:
    """The step's fingerprint.json (None: the step never finished, or the record is unreadable)."""
    path = step_dir / FINGERPRINT
    if not path.is_file():
        return None
    try:
        record = io.read_json(path)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None
