"""Trajectory checkpoints: `checkpoints/step-000123/` every `every` optimizer steps after `start_step`,
listed in `checkpoints/manifest.json` with each step's loss and eval metrics.

Only adapters (or whatever `save_fn` writes) go here, never optimizer state: the resumable state
lives in `state/` (see train.state). `keep_last` prunes these trajectory checkpoints only.
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


def list_checkpoints(root: str | Path) -> list[Path]:
    """Trajectory checkpoint dirs under `root`, in step order."""
    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))
