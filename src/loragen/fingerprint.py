"""What determines a result, declared once.

- RESULT_NEUTRAL: keys that change no output of a finished step (where files are, logging, cadence of periodic
  evaluations): the pipeline engine skips a finished step whatever their values.
- TRAJECTORY_NEUTRAL: those, plus the keys that change only the final evaluation or decoding: a training run
  resumes from its saved state whatever their values (the LoRA fingerprint and the loop's resume check).
- Locations are never hashed: `paths.*` are left out and the data is identified by content instead (the SHA-256
  of the local files of every dataset the step reads, or the Hub id and revision without a local data dir).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from loragen.errors import ConfigError

RESULT_NEUTRAL = (
    "hydra", "tracker", "paths",
    "train.resume", "train.log_every", "train.save_state_every", "train.eval_every",
    "lora.eval_limit", "lora.eval_generate",
    # an adapter check's override changes no score; eval.overlong only decides whether an over-long document is an
    # error or truncated, so a finished step (it had none, or it would have failed or been truncated) is the same
    "eval.allow_base_mismatch", "eval.overlong",
)
# With ckpt.best_metric set, the periodic evaluations choose the best/ adapter: then they are not neutral.
EVAL_CADENCE = ("train.eval_every", "lora.eval_limit", "lora.eval_generate")
TRAJECTORY_NEUTRAL = RESULT_NEUTRAL + (
    "lora.final_eval_limit", "lora.eval_base",
    "lora.generation.max_new_tokens", "lora.generation.do_sample", "lora.generation.temperature",
    "lora.generation.top_p",
)


def strip(data: dict, keys: Iterable[str], prefix: str = "") -> dict:
    """A copy of `data` without the dotted `keys` (relative to `prefix`, e.g. prefix="train" for cfg.train)."""
    out = json.loads(json.dumps(data, default=str))
    for key in keys:
        if prefix:
            if not key.startswith(prefix + "."):
                continue
            key = key[len(prefix) + 1:]
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def result_neutral(cfg: DictConfig) -> tuple[str, ...]:
    best = OmegaConf.select(cfg, "ckpt.best_metric", default=None)
    return tuple(k for k in RESULT_NEUTRAL if not (best and k in EVAL_CADENCE))


def step_content(cfg: DictConfig) -> dict:
    """What a pipeline step's result depends on: its config without result-neutral keys, and its data by content."""
    data = OmegaConf.to_container(cfg, resolve=True)
    return {"config": strip(data, result_neutral(cfg)), "data": data_identity(cfg)}


def data_identity(cfg: DictConfig) -> dict[str, str]:
    """dataset -> sha256 of its local files (every split file in <data_dir>/<dataset>/), or its Hub id@revision."""
    from loragen.data import dataset_specs

    if "dataset" not in cfg:
        return {}
    data_dir = OmegaConf.select(cfg, "paths.data_dir", default=None)
    out = {}
    for spec in dataset_specs(cfg.dataset):
        if spec.get("file"):  # dataset=instruction: the user's file, by content
            path = Path(str(spec.file))
            out[spec.name] = file_sha256(path) if path.is_file() else f"missing:{path.name}"
            continue
        source = spec.get("mc") or spec  # an *_instruct dataset reads its multiple-choice source
        name = str(source.get("name", spec.name))
        if data_dir and (Path(str(data_dir)) / name).is_dir():
            out[spec.name] = dir_sha256(Path(str(data_dir)) / name)
        elif data_dir:
            out[spec.name] = f"missing:{name}"  # load_split refuses it with the path; the step will say so
        else:
            hub = source.get("hub") or {}
            out[spec.name] = f"hub:{hub.get('path')}/{hub.get('name')}@{hub.get('revision')}"
    return out


_SHA_CACHE: dict[tuple, str] = {}


def dir_sha256(folder: Path) -> str:
    """SHA-256 over the names and bytes of the files of `folder` (sorted), cached by (path, size, mtime)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprint contents (`a.b: old -> new`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}.{k}" if prefix else str(k))
        return out
    if old == new:
        return []
    return [f"{prefix or '<root>'}: {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_data_source(cfg: DictConfig) -> None:
    """A data source that cannot be found is an error before anything is moved or run."""
    data_dir = OmegaConf.select(cfg, "paths.data_dir", default=None)
    if data_dir:
        if not Path(str(data_dir)).is_dir():
            raise ConfigError(f"paths.data_dir={data_dir} (LORAGEN_DATA_DIR) does not exist; nothing was moved or run")
    elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ConfigError("no local data dir (paths.data_dir / LORAGEN_DATA_DIR is unset) and HF_HUB_OFFLINE is set, "
                          "so no data can be read; set LORAGEN_DATA_DIR (the Makefile points it at "
                          "../shared/data/commonsense). Nothing was moved or run")
