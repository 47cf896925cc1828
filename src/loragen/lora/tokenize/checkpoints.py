"""Find a trajectory's checkpoints, ordered by step, and check that they share one layout.

Headers are read without loading tensors (safetensors' header; a legacy pickle `.bin` is only
ever opened with `torch.load(weights_only=True)`), so a mismatch is reported before any work.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loragen import rundir
from loragen.errors import CheckpointError
from loragen.lora.adapter_io import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, is_adapter_dir, read_adapter_config

STEP_DIR = re.compile(r"^(step|checkpoint)[-_]?\d+$")
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# adapter_config keys that must agree across one trajectory (they change what the tensors mean)
CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora")


@dataclass
class Checkpoint:
    path: Path
    step: int


@dataclass
class Header:
    config: dict[str, Any]
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]


def find_checkpoints(source: str | os.PathLike, max_checkpoints: int | None = None) -> list[Checkpoint]:
    """Checkpoints of `source`, by step: a lora run dir (its `checkpoints/step-*`, never `final/`),
    a directory of PEFT adapter dirs, or one adapter dir. Keeps the last `max_checkpoints`."""
    root = Path(source)
    if not root.is_dir():
        raise CheckpointError(f"tokenize.checkpoints={source}: no such directory")
    if is_adapter_dir(root):
        return [Checkpoint(root, _step(root) if re.search(r"\d+", root.name) else 0)]
    if (root / rundir.CHECKPOINTS).is_dir():
        root = root / rundir.CHECKPOINTS
    dirs = [p for p in root.iterdir() if p.is_dir() and (is_adapter_dir(p) or STEP_DIR.match(p.name))]
    if not dirs:
        raise CheckpointError(f"{root}: no PEFT adapter directories (expected step-000123/ dirs with "
                              f"adapter_config.json and {WEIGHTS_NAME})")
    for p in dirs:
        if not is_adapter_dir(p):
            raise CheckpointError(f"{p}: checkpoint directory without adapter_config.json and {WEIGHTS_NAME}")
    ckpts = sorted((Checkpoint(p, _step(p)) for p in dirs), key=lambda c: c.step)
    for a, b in zip(ckpts, ckpts[1:], strict=False):
        if a.step == b.step:
            raise CheckpointError(f"{a.path} and {b.path} both have step {a.step}")
    if max_checkpoints is not None:
        if int(max_checkpoints) < 1:
            raise CheckpointError(f"tokenize.max_checkpoints={max_checkpoints}; expected a positive count or null")
        ckpts = ckpts[-int(max_checkpoints):]
    return ckpts


def _step(path: Path) -> int:
    nums = re.findall(r"\d+", path.name)
    if not nums:
        raise CheckpointError(f"{path}: cannot order this checkpoint, its name has no step number "
                              "(expected e.g. step-000123)")
    return int(nums[-1])


def read_header(path: str | os.PathLike) -> Header:
    """adapter_config.json and the tensor names, shapes and dtypes of an adapter dir (no tensor data)."""
    path = Path(path)
    config = read_adapter_config(path)
    weights = path / WEIGHTS_NAME
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    shapes[k] = list(sl.get_shape())
                    dtypes[k] = ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{weights}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    else:
        legacy = path / LEGACY_WEIGHTS_NAME
        try:  # pickle-based: only ever with weights_only=True
            tensors = torch.load(legacy, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"{legacy}: cannot load with weights_only=True: {e}") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise CheckpointError(f"{legacy}: expected a dict of tensors")
        shapes = {k: list(t.shape) for k, t in tensors.items()}
        dtypes = {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()}
    if not shapes:
        raise CheckpointError(f"{path}: the adapter holds no tensors")
    return Header(config, shapes, dtypes)


def _raw_header(path: Path) -> tuple[bytes, int] | None:
    """(header bytes, file size) of the adapter's safetensors file, or None (no such file, or no room for a header)."""
    f = path / WEIGHTS_NAME
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            head = fh.read(n) if 2 <= n <= 100 << 20 else b""
        size = f.stat().st_size
    except OSError:
        return None
    return (head, size) if len(head) == n and head else None


def check_consistent(ckpts: list[Checkpoint]) -> Header:
    """The shared header of all checkpoints; CheckpointError naming the first file and key that differ.

    A safetensors file with the first checkpoint's header bytes and size holds the same tensors, so only the first
    is parsed then (parsing with safe_open took 0.6 ms a file, 0.03 s for 50 Qwen2.5-0.5B checkpoints: 5% of
    tokenizing them). Any other file is parsed, so a truncated one is still reported before any work."""
    first = read_header(ckpts[0].path)
    first_bytes = _raw_header(ckpts[0].path)
    for ck in ckpts[1:]:
        same = first_bytes is not None and _raw_header(ck.path) == first_bytes
        h = Header(read_adapter_config(ck.path), first.shapes, first.dtypes) if same else read_header(ck.path)
        for key in CONFIG_KEYS:
            a, b = first.config.get(key), h.config.get(key)
            if key == "target_modules" and isinstance(a, list) and isinstance(b, list):
                a, b = sorted(a), sorted(b)
            if a != b:
                raise CheckpointError(f"{ck.path}: adapter_config {key}={b!r} differs from {a!r} in {ckpts[0].path}")
        for k in sorted(first.shapes.keys() | h.shapes.keys()):
            if k not in h.shapes:
                raise CheckpointError(f"{ck.path / WEIGHTS_NAME}: tensor {k} is missing (present in {ckpts[0].path})")
            if k not in first.shapes:
                raise CheckpointError(f"{ck.path / WEIGHTS_NAME}: unexpected tensor {k} (not in {ckpts[0].path})")
            if h.shapes[k] != first.shapes[k] or h.dtypes[k] != first.dtypes[k]:
                raise CheckpointError(f"{ck.path / WEIGHTS_NAME}: tensor {k} is {h.dtypes[k]} {h.shapes[k]}, "
                                      f"expected {first.dtypes[k]} {first.shapes[k]} as in {ckpts[0].path}")
    return first
