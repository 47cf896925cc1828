"""The one adapter reader and writer. Every adapter loragen writes is a standard PEFT directory.

`PeftModel.from_pretrained(base, dir)`, vLLM's `--enable-lora` and lm-evaluation-harness's `peft=`
load what `write_adapter` writes. Keys are PEFT's saved names, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (no adapter name).

Beside PEFT's files, `write_adapter` records the base model the adapter is for in `loragen_base.json`:

    {"format": 1, "base_model": {"name_or_path", "model", "config_sha256", "config"}, "excluded_config_keys": [...]}

`name_or_path` is the directory or Hub id the base model was loaded from (PEFT's `base_model_name_or_path`),
`model` loragen's model config name when the writer knew it, `config` the base model's
`PretrainedConfig.to_dict()` without VOLATILE_CONFIG_KEYS (how it was loaded or saved, not what it is: dtype,
attention implementation, transformers version, output switches, its own path; removed at every nesting level)
and `config_sha256` the SHA-256 of that dict as sorted JSON. `base_mismatch` compares the record with the model
an adapter is loaded onto (evaluation.adapters.check_adapter).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loragen import io
from loragen.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # saved tensor names start with it, then the base model's module path
BASE_RECORD = "loragen_base.json"  # loragen's record of the base model (see the module docstring)
BASE_RECORD_FORMAT = 1
VOLATILE_CONFIG_KEYS = (
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict",
)
# config keys named first when two base models differ
SHOWN_FIRST = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "d_model")
# where loragen run dirs keep their adapters (lora, transfer, generate, generator): the hint when a run dir is given
RUN_DIR_ADAPTERS = ("final", "best", "adapter", "adapters/gen-000", "generated/gen-000")

log = logging.getLogger(__name__)


@dataclass
class Adapter:
    config: dict[str, Any]  # adapter_config.json as a dict
    tensors: dict[str, torch.Tensor]  # PEFT saved names -> tensors
    path: str | None = None

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def scale(self) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA): the factor PEFT applies to B @ A."""
        alpha = float(self.config.get("lora_alpha", self.r))
        return alpha / math.sqrt(self.r) if self.config.get("use_rslora") else alpha / self.r


def is_adapter_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and ((p / WEIGHTS_NAME).is_file() or (p / LEGACY_WEIGHTS_NAME).is_file())


def not_an_adapter(path: str | os.PathLike, why: str = "") -> str:
    """Why `path` is not a PEFT adapter dir, and where the adapter is when it is a loragen run dir."""
    p = Path(path)
    if not p.exists():
        return f"{path} is not a PEFT adapter directory: it does not exist"
    inside = [str(p / d) for d in RUN_DIR_ADAPTERS if is_adapter_dir(p / d)]
    if (p / "checkpoints").is_dir() and not inside:
        steps = sorted(c.name for c in (p / "checkpoints").iterdir() if is_adapter_dir(c))
        inside = [str(p / "checkpoints" / steps[-1])] if steps else []
    msg = f"{path} is not a PEFT adapter directory{': ' + why if why else ''}"
    if inside:
        msg += f"; it is a loragen run directory: use its adapter {inside[0]}"
        if len(inside) > 1:
            msg += f" (or {', '.join(inside[1:])})"
    else:
        msg += f" (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
    return msg


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / CONFIG_NAME
    if not p.is_file():
        raise CheckpointError(not_an_adapter(path, f"no {CONFIG_NAME}"))
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: malformed JSON ({e.msg}, line {e.lineno})") from None
    for key in ("r", "target_modules"):
        if key not in cfg:
            raise CheckpointError(f"{p}: missing key {key!r}; is this a LoRA adapter?")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{p}: peft_type {cfg.get('peft_type')!r}, expected LORA")
    return cfg


def read_adapter(path: str | os.PathLike, device: str = "cpu", check_finite: bool = True) -> Adapter:
    """Load a PEFT adapter directory; errors name the file and tensor that are wrong."""
    path = Path(path)
    config = read_adapter_config(path)
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        try:
            tensors = load_file(str(weights), device=device)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{weights}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    elif (path / LEGACY_WEIGHTS_NAME).is_file():
        try:  # pickle-based: only ever with weights_only=True
            tensors = torch.load(path / LEGACY_WEIGHTS_NAME, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"{path / LEGACY_WEIGHTS_NAME}: cannot load with weights_only=True: {e}") from None
    else:
        raise CheckpointError(not_an_adapter(path, f"no {WEIGHTS_NAME}"))
    if not tensors:
        raise CheckpointError(f"{weights}: holds no tensors")
    if check_finite:
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{weights}: tensor {name} has non-finite values")
    return Adapter(config, tensors, str(path))


# safetensors dtype names -> torch dtypes, for StackedReader (an unknown one makes it fall back to read_adapter)
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                   "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                   "BOOL": torch.bool}


class StackedReader:
    """Reads K safetensors files that share one header into one buffer: tensor `name` of all K files is then one
    strided view of shape (K, *shape) (the checkpoint axis strides by the file size).

    Why it exists beside read_adapter: the tokenizer encodes K checkpoints of a trajectory per torch op, to pay
    torch's per-op overhead once per K checkpoints instead of once per checkpoint, which needs a tensor's K copies
    as one tensor; and its buffer (K x the file size), allocated at the first read and reused by every later one,
    costs no fresh page faults after the first, where load_file allocates every tensor anew. Everything else reads
    adapters with read_adapter.

    `read` returns None when the files cannot be stacked (different sizes or header bytes, a dtype it does not know,
    misaligned data): read them one by one with read_adapter then. The first file's header is parsed and checked
    (offsets inside the file, tensors tiling its data, shapes filling their bytes): a corrupt one is a
    CheckpointError naming it; the other files' headers must equal it byte for byte. Its views are valid until the
    next `read`, which overwrites the buffer."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._views: tuple[Any, dict[str, torch.Tensor]] | None = None  # (key, views) of the last read

    def read(self, files: Sequence[str | os.PathLike]) -> dict[str, torch.Tensor] | None:
        """Name -> (len(files), *shape) views of the files' tensors, or None when they cannot be stacked."""
        files = [Path(f) for f in files]
        if not files or not all(f.is_file() for f in files):
            return None
        size = files[0].stat().st_size
        if size < 8 or any(f.stat().st_size != size for f in files[1:]):
            return None
        if self._buffer.numel() < len(files) * size:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # free the old buffer before allocating the new one
            self._buffer = torch.empty(len(files) * size, dtype=torch.uint8)
        mem = memoryview(self._buffer.numpy()).cast("B")
        for i, f in enumerate(files):
            _read_exactly(f, mem[i * size : (i + 1) * size])
        header = bytes(mem[: 8 + _header_length(files[0], mem[:8], size)])
        key = (self._buffer.data_ptr(), len(files), size, header)
        if self._views is None or self._views[0] != key:  # the first file's header is checked as it is parsed
            views = _stacked_views(files[0], self._buffer[: len(files) * size], len(files), size, header)
            self._views = None if views is None else (key, views)
        if self._views is None or any(mem[i * size : i * size + len(header)] != header for i in range(1, len(files))):
            return None
        return self._views[1]


def _read_exactly(f: Path, dst: memoryview) -> None:
    with open(f, "rb", buffering=0) as fh:
        done = 0
        while done < len(dst):
            got = fh.readinto(dst[done:])
            if not got:
                raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): it ended after "
                                      f"{done} of {len(dst)} bytes while being read")
            done += got


def _header_length(f: Path, first8: memoryview, size: int) -> int:
    n = int.from_bytes(first8, "little")
    if not 2 <= n <= size - 8:
        raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): header length {n} does "
                              f"not fit a file of {size} bytes")
    return n


def _stacked_views(f: Path, buffer: torch.Tensor, k: int, size: int,
                   header: bytes) -> dict[str, torch.Tensor] | None:
    """(k, *shape) views into `buffer` (k files of `size` bytes) of the tensors the header describes."""
    entries = _tensor_entries(f, header, size - len(header))
    if entries is None:
        return None
    views = {}
    for name, (dtype, shape, begin) in entries.items():
        item = dtype.itemsize
        offset = len(header) + begin
        if size % item or offset % item:
            return None  # a typed view needs aligned data: leave it to read_adapter
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        views[name] = torch.as_strided(buffer.view(dtype), (k, *shape), (size // item, *strides), offset // item)
    return views


def _tensor_entries(f: Path, header: bytes, data_len: int) -> dict[str, tuple[torch.dtype, list[int], int]] | None:
    """Name -> (dtype, shape, first byte in the data section) from a safetensors header; CheckpointError when the
    header is not one of a whole, valid file of `data_len` data bytes; None for a dtype not in _TORCH_DTYPES."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {why}")

    try:
        raw = json.loads(header[8:])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"its header is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise corrupt("its header is not a JSON object")
    entries, spans = {}, []
    for name, e in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
        except (TypeError, KeyError, ValueError) as err:
            raise corrupt(f"tensor {name}: malformed header entry ({err!r})") from None
        if dtype_name not in _TORCH_DTYPES:
            return None
        dtype = _TORCH_DTYPES[dtype_name]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise corrupt(f"tensor {name}: data offsets {[begin, end]} outside the {data_len} data bytes")
        if min(shape, default=0) < 0 or math.prod(shape) * dtype.itemsize != end - begin:
            raise corrupt(f"tensor {name}: {dtype_name} {shape} does not fill its {end - begin} bytes")
        entries[name] = (dtype, shape, begin)
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise corrupt(f"its tensors do not tile the data section (a gap or overlap at byte {covered})")
        covered = end
    if covered != data_len:
        raise corrupt(f"its tensors cover {covered} of its {data_len} data bytes")
    if not entries:
        raise corrupt("it holds no tensors")
    return entries


def write_adapter(path: str | os.PathLike, adapter: Adapter | None = None, *, config: dict | None = None,
                  tensors: dict[str, torch.Tensor] | None = None, extra_files: dict[str, Any] | None = None,
                  base: dict | None = None) -> Path:
    """Write a PEFT adapter directory atomically (the whole dir appears at once, or not at all).

    `extra_files` maps file names to JSON-serialisable objects written alongside (e.g. provenance).
    `base`: the base model record (`base_record(...)`) written as BASE_RECORD; by default it is made from the
    config's `base_model_name_or_path` (its config read from there, local files only).
    """
    if adapter is not None:
        config, tensors = adapter.config, adapter.tensors
    assert config is not None and tensors is not None
    if base is None:
        base = base_record(config.get("base_model_name_or_path"))
    with io.atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (tmp / BASE_RECORD).write_text(json.dumps(base, indent=2, sort_keys=True, default=str) + "\n")
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


# ---- the base model record -------------------------------------------------------------------------------------

def config_fingerprint(config: Any) -> tuple[dict, str]:
    """(the config dict without VOLATILE_CONFIG_KEYS, the SHA-256 of it as sorted JSON); `config` a
    PretrainedConfig or its to_dict()."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    reduced = json.loads(json.dumps(_drop_volatile(data), sort_keys=True, default=str))
    return reduced, hashlib.sha256(json.dumps(reduced, sort_keys=True).encode()).hexdigest()


def _drop_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items() if k not in VOLATILE_CONFIG_KEYS}
    return obj


def base_record(name_or_path: str | None, model: str | None = None, config: Any = None, **extra: Any) -> dict:
    """The BASE_RECORD of an adapter for the base model at `name_or_path` (loragen model config name `model`).

    `config`: the model's PretrainedConfig (or dict); by default read from `name_or_path` (local files only; a
    model that cannot be read gets no fingerprint). `extra` keys are added as they are (e.g. transferred_from)."""
    if config is None and name_or_path:
        config = _local_config(str(name_or_path))
    reduced, sha = config_fingerprint(config) if config is not None else (None, None)
    return {"format": BASE_RECORD_FORMAT,
            "base_model": {"name_or_path": None if name_or_path is None else str(name_or_path), "model": model,
                           "config_sha256": sha, "config": reduced},
            "excluded_config_keys": list(VOLATILE_CONFIG_KEYS), **extra}


@functools.lru_cache(maxsize=64)
def _local_config(name_or_path: str) -> dict | None:
    """The model's config as a dict from a local dir or the local Hub cache (no network), or None."""
    p = Path(name_or_path).expanduser()
    if p.is_absolute() and not (p / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoConfig.from_pretrained(name_or_path, local_files_only=True).to_dict()
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as e:  # noqa: BLE001 - no fingerprint then; the record says so (config_sha256 null)
        log.debug("no config for %s (%s): the adapter's base record has no fingerprint", name_or_path, e)
        return None


def read_base_record(path: str | os.PathLike) -> dict | None:
    """The adapter's BASE_RECORD, or None (third-party adapters, adapters written before loragen kept one)."""
    p = Path(path) / BASE_RECORD
    if not p.is_file():
        return None
    try:
        record = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"{p}: unreadable base model record ({e}); delete it to fall back to PEFT's "
                              "base_model_name_or_path") from None
    if not isinstance(record, dict) or not isinstance(record.get("base_model"), dict):
        raise CheckpointError(f"{p}: not a base model record (no base_model object)")
    return record


def loose_name(name_or_path: str | None) -> str | None:
    """A model's name for a loose comparison: the final path component (or Hub repo name), lowercased.

    `/models/Qwen2.5-0.5B` and `Qwen/Qwen2.5-0.5B` agree; a Hub cache snapshot dir
    (`models--Qwen--Qwen2.5-0.5B/snapshots/<sha>`) counts as its repo name."""
    if not name_or_path:
        return None
    text = str(name_or_path).rstrip("/\\")
    m = re.search(r"models--[^/\\]+--([^/\\]+)[/\\]snapshots[/\\][^/\\]+$", text)
    name = m.group(1) if m else re.split(r"[/\\]", text)[-1]
    return name.lower() or None


def base_mismatch(adapter_dir: str | os.PathLike, config: Any, name_or_path: str | None) -> tuple[str, str] | None:
    """(the adapter's base model, why it differs) when the adapter was written for another base model than the one
    with `config` loaded from `name_or_path`; None when they agree or nothing tells.

    With loragen's record: a config value that differs on a key both configs have (keys only one has are a
    transformers version's additions, not a different model), or different loose names of the two
    name_or_paths (a copy or a fine-tune with the same config, a tiny model with another seed). Without it
    (a third-party PEFT adapter): PEFT's base_model_name_or_path, by loose name, when both are known."""
    record = read_base_record(adapter_dir)
    if record is not None:
        rec = record["base_model"]
        theirs = rec.get("name_or_path")
        label = f"{rec['model']} ({theirs})" if rec.get("model") else str(theirs)
        reasons = []
        if rec.get("config_sha256") and config is not None:
            mine, sha = config_fingerprint(config)
            if sha != rec["config_sha256"] and isinstance(rec.get("config"), dict):
                diff = sorted((k for k in set(mine) & set(rec["config"]) if mine[k] != rec["config"][k]),
                              key=lambda k: (k not in SHOWN_FIRST, SHOWN_FIRST.index(k) if k in SHOWN_FIRST else 0, k))
                if diff:
                    shown = ", ".join(f"{k} {_short(rec['config'][k])} vs {_short(mine[k])}" for k in diff[:3])
                    reasons.append(f"their configs differ ({shown}{', ...' if len(diff) > 3 else ''})")
        a, b = loose_name(theirs), loose_name(name_or_path)
        if a and b and a != b:
            reasons.append(f"different names ({a} vs {b})")
        return (label, "; ".join(reasons)) if reasons else None
    theirs = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    a, b = loose_name(theirs), loose_name(name_or_path)
    if a and b and a != b:
        return str(theirs), f"PEFT's base_model_name_or_path names {a}, not {b} (no {BASE_RECORD}: compared by name)"
    return None


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path (PEFT saved prefix) -> (lora_A (r, in), lora_B (out, r))."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            prefix = name[: -len(".lora_A.weight")]
            b = tensors.get(prefix + ".lora_B.weight")
            if b is None:
                raise CheckpointError(f"adapter tensor {name} has no matching {prefix}.lora_B.weight")
            out[prefix] = (a, b)
    return out
