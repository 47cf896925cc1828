"""What produced a result: git SHA, package versions, data checksums, seed, config."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGES = ("loragen", "torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "safetensors")


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def provenance(cfg: DictConfig, data_sha256: dict[str, str | None] | None = None, world_size: int = 1) -> dict:
    return {
        "world_size": world_size,
        "git_sha": git_sha(),
        "versions": versions(),
        "data_sha256": data_sha256 or {},
        "seed": cfg.seed,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
