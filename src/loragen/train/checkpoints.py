"""Trajectory checkpoints: `checkpoints/step-000123/` every `every` optimizer steps after `start_step`,
listed in `checkpoints/manifest.json` with each step's loss and eval metrics.

Only adapters (or whatever `save_fn` writes) go here, never optimizer state: the resumable state
lives in `state/` (see train.state). `keep_last` prunes these trajectory checkpoints only.

BestCheckpoint keeps the adapter with the best validation metric (`ckpt.best_metric`) seen at the
periodic evaluations as `<run dir>/best/` (replaced atomically) and `best.json` (step, metric, value).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

from loragen import io
from loragen.errors import ConfigError

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


class Checkpointer:
    """Decides which steps are saved, writes them through `save_fn(path)`, keeps the manifest (rank 0 only)."""

    def __init__(self, root: str | Path, save_fn: Callable[[Path], None], *, every: int, start_step: int = 0,
                 keep_last: int | None = None, is_main: bool = True):
        if every < 0 or start_step < 0 or (keep_last is not None and keep_last < 1):
            raise ConfigError(f"ckpt.every={every}, ckpt.start_step={start_step}, ckpt.keep_last={keep_last}: "
                              "expected every >= 0 (0 = off), start_step >= 0, keep_last >= 1 or null")
        self.root, self.save_fn = Path(root), save_fn
        self.every, self.start_step, self.keep_last, self.is_main = every, start_step, keep_last, is_main
        self.manifest_path = self.root / "manifest.json"
        self.entries: list[dict] = []

    def due(self, step: int) -> bool:
        return self.every > 0 and step > self.start_step and (step - self.start_step) % self.every == 0

    def resume_at(self, step: int) -> None:
        """Keep the manifest entries up to `step` (later ones are redone by the resumed run)."""
        if self.manifest_path.is_file():
            self.entries = [e for e in io.read_json(self.manifest_path)["checkpoints"] if e["step"] <= step]
        else:
            self.entries = []

    @property
    def last(self) -> Path | None:
        return self.root / self.entries[-1]["path"] if self.entries else None

    def save(self, step: int, metrics: dict) -> Path:
        path = self.root / step_dir_name(step)
        if self.is_main:
            self.save_fn(path)
            self.entries = [e for e in self.entries if e["step"] != step] + [{"step": step, "path": path.name, **metrics}]
            self._prune()
            io.write_json(self.manifest_path, {"checkpoints": self.entries})
        return path

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        drop, self.entries = self.entries[:-self.keep_last], self.entries[-self.keep_last:]
        for e in drop:
            shutil.rmtree(self.root / e["path"], ignore_errors=True)


# metric -> better direction; any other name needs ckpt.best_mode
MAXIMIZE = ("acc", "acc_norm", "bleu", "rouge_l", "exact_match", "embed_sim", "success_rate")
MINIMIZE = ("loss",)
ALIASES = {"rougeL": "rouge_l", "rouge-l": "rouge_l", "em": "exact_match"}
MODES = ("max", "min")


class BestCheckpoint:
    """Saves through `save_fn(root / "best")` whenever the evaluation metric `metric` improves (rank 0 writes).

    `metric` names an evaluation metric with or without its "eval_" prefix (loss: the validation loss,
    eval_loss; bleu: eval_bleu; acc: eval_acc ...). `mode` max | min, or None to derive it from the name.
    Ties keep the earlier checkpoint.
    """

    def __init__(self, root: str | Path, save_fn: Callable[[Path], None], *, metric: str, mode: str | None = None,
                 is_main: bool = True):
        name = metric[len("eval_"):] if metric.startswith("eval_") else metric
        name = ALIASES.get(name, name)
        if mode is None:
            if name not in MAXIMIZE + MINIMIZE:
                raise ConfigError(f"ckpt.best_metric={metric!r}: no known direction; set ckpt.best_mode=max|min "
                                  f"(known: {', '.join(MAXIMIZE + MINIMIZE)})")
            mode = "max" if name in MAXIMIZE else "min"
        if mode not in MODES:
            raise ConfigError(f"ckpt.best_mode={mode!r}; expected max, min or null (derived from the metric)")
        self.root, self.save_fn, self.is_main = Path(root), save_fn, is_main
        self.metric, self.key, self.mode = name, f"eval_{name}", mode
        self.dir, self.record_path = self.root / "best", self.root / "best.json"
        self.record: dict | None = None  # {"step", "metric", "value", "mode"}

    def better(self, value: float) -> bool:
        if value != value:  # NaN never wins
            return False
        if self.record is None:
            return True
        best = self.record["value"]
        return value > best if self.mode == "max" else value < best

    def update(self, step: int, metrics: dict) -> bool:
        """Called after each evaluation with its metrics; saves and returns True when `metric` improved."""
        if self.key not in metrics:
            have = sorted(k for k in metrics if k.startswith("eval_"))
            raise ConfigError(f"ckpt.best_metric={self.metric!r}: the evaluation at step {step} reported no "
                              f"{self.key}; it reported {have or 'nothing'}")
        value = float(metrics[self.key])
        if not self.better(value):
            return False
        self.record = {"step": int(step), "metric": self.metric, "value": value, "mode": self.mode}
        if self.is_main:
            self.save_fn(self.dir)
            io.write_json(self.record_path, self.record)
        return True

    def resume_at(self, step: int) -> None:
        """Keep best.json when it was written at or before `step` (a later one is redone by the resumed run)."""
        self.record = None
        if self.record_path.is_file():
            saved = io.read_json(self.record_path)
            if saved.get("metric") == self.metric and saved.get("mode") == self.mode and saved["step"] <= step:
                self.record = saved


def list_checkpoints(root: str | Path) -> list[Path]:
    """Trajectory checkpoint dirs under `root`, in step order."""
    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))
