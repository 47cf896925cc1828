"""The full resumable training state, saved atomically as one directory (`state/`):

    trainable.safetensors   every parameter with requires_grad (by name)
    optim.pt                optimizer + scheduler state dicts and per-rank RNG states (loaded weights_only)
    trainer.json            step, world size, the run's config fingerprint, metric history

A different config refuses to resume, listing the keys that differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loragen import io, rundir
from loragen.errors import CheckpointError

TRAINER = rundir.TRAINER
TRAINABLE = "trainable.safetensors"
OPTIM = "optim.pt"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves (JSON-normalised for comparison)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(obj, default=str))}


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = flatten(saved), flatten(current)
    return [f"{k}: {a.get(k, '<absent>')!r} (saved) vs {b.get(k, '<absent>')!r} (now)"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def exists(state_dir: str | Path) -> bool:
    return (Path(state_dir) / TRAINER).is_file()


def save_state(state_dir: str | Path, *, model: torch.nn.Module, optimizer, scheduler, rng_states: list[torch.Tensor],
               trainer: dict[str, Any]) -> Path:
    """Write the whole state dir atomically (call on the main process only)."""
    with io.atomic_path(state_dir) as tmp:
        tmp.mkdir()
        save_file({k: v.contiguous().cpu() for k, v in trainable_tensors(model).items()}, str(tmp / TRAINABLE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states},
                   tmp / OPTIM)
        (tmp / TRAINER).write_text(json.dumps(trainer, indent=2, default=str) + "\n")
    return Path(state_dir)


def read_trainer(state_dir: str | Path) -> dict[str, Any]:
    path = Path(state_dir) / TRAINER
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the training state ({e})") from None


def check_fingerprint(state_dir: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    diff = config_diff(saved, current)
    if diff:
        raise CheckpointError(
            f"refusing to resume from {state_dir}: it was written by a different config; differing keys: "
            + "; ".join(diff) + ". Use a new hydra.run.dir, or train.resume=never to start over in this one"
        )


def load_state(state_dir: str | Path, *, model: torch.nn.Module, optimizer, scheduler) -> list[torch.Tensor]:
    """Restore trainable parameters, optimizer and scheduler in place; return the saved per-rank RNG states."""
    state_dir = Path(state_dir)
    try:
        tensors = load_file(str(state_dir / TRAINABLE))
        blob = torch.load(state_dir / OPTIM, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure is a corrupt state
        raise CheckpointError(f"{state_dir}: cannot read the training state (truncated or corrupt?): {e}") from None
    params = dict(trainable_tensors(model))
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointError(f"{state_dir / TRAINABLE}: parameters do not match the model; "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise CheckpointError(f"{state_dir / TRAINABLE}: {name} has shape {tuple(tensors[name].shape)}, "
                                      f"the model's is {tuple(p.shape)}")
            p.copy_(tensors[name])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return blob["rng"]
