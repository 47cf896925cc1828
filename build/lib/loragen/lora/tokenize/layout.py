"""The layout: everything needed to turn tokens back into a PEFT adapter, saved as layout.json.

Tensor order (both schemes): layers in order; within a layer, modules in the order of
`model.linear_modules`; within a module, lora_A then lora_B. A PEFT key such as
`base_model.model.encoder.layer.0.attention.output.dense.lora_A.weight` splits at its first
numeric component into the layer (0) and the in-layer name (`attention.output.dense`), which is
matched to a module exactly or by the longest `.`-suffix (so MiniLM's `output.dense` and
`attention.output.dense` stay apart).

dnd: a tensor is viewed as (r, L): lora_A as is, lora_B transposed; it is cut along L into
ceil(L / chunk) tokens of (r+2) x (chunk+2) cells; the last one is padded when chunk does not
divide L. flat: the tensors, flattened in this order and concatenated, are cut into tokens of
`token_shape`; the last token is padded.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from loragen import io, rundir
from loragen.errors import CheckpointError, ConfigError

FORMAT = "loragen-tokens/1"
SCHEMES = ("dnd", "flat")
LAYOUT_NAME = rundir.LAYOUT
SUFFIXES = {"A": ".lora_A.weight", "B": ".lora_B.weight"}


@dataclass
class TensorSlot:
    name: str  # PEFT saved key
    shape: list[int]
    dtype: str  # torch dtype name without "torch.", e.g. "float32", "bfloat16"
    first_token: int = 0  # dnd: index of this tensor's first token
    num_tokens: int = 0  # dnd: ceil(length / chunk)
    transposed: bool = False  # dnd: lora_B is stored transposed, as (r, out)
    offset: int = 0  # flat: position of the first element in the flattened token stream
    mean: float = 0.0  # flat: normalisation over the training checkpoints
    std: float = 1.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def length(self) -> int:
        """dnd: the long axis the tensor is chunked along (in of lora_A, out of lora_B)."""
        return self.shape[0] if self.transposed else self.shape[1]


@dataclass
class Layout:
    scheme: str
    token_shape: list[int]  # [h, w] of one token
    num_tokens: int
    adapter_config: dict[str, Any]
    tensors: list[TensorSlot]
    rank: int
    chunk: int = 0  # dnd: data columns per token
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one checkpoint's tokens: (num_tokens, h, w)."""
        return (self.num_tokens, *self.token_shape)

    def mask(self) -> torch.Tensor:
        """Bool (num_tokens, h, w): True on real cells (data and dnd border), False on padding."""
        m = torch.ones(self.shape, dtype=torch.bool)
        if self.scheme == "dnd":
            r, c = self.rank, self.chunk
            for s in self.tensors:
                tail = s.length - (s.num_tokens - 1) * c
                if tail < c:
                    m[s.first_token + s.num_tokens - 1, 1 : r + 1, 1 + tail : c + 1] = False
        else:
            used = sum(s.numel for s in self.tensors)
            m.view(-1)[used:] = False
        return m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        return io.write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        d = dict(d)
        d["tensors"] = [TensorSlot(**t) for t in d["tensors"]]
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Layout:
        path = Path(path)
        if path.is_dir():
            path = path / LAYOUT_NAME
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the token layout: {e}") from None
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {d.get('format')!r}, expected {FORMAT!r}")
        return cls.from_dict(d)


def split_key(key: str, modules: Sequence[str]) -> tuple[int, int, str]:
    """PEFT key -> (layer, module index in `modules`, "A" | "B"); ConfigError when it does not fit."""
    kind = next((k for k, suf in SUFFIXES.items() if key.endswith(suf)), None)
    if kind is None:
        raise CheckpointError(f"tensor {key} is not a lora_A/lora_B weight; tokenize handles LoRA pairs only")
    parts = key[: -len(SUFFIXES[kind])].split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if idx is None:
        raise CheckpointError(f"tensor {key} has no layer number; tokenize handles per-layer LoRA modules only")
    inner = ".".join(parts[idx + 1 :])
    matches = [(len(m), j) for j, m in enumerate(modules) if inner == m or inner.endswith("." + m)]
    if not matches:
        raise ConfigError(f"tensor {key}: module {inner!r} is not in model.linear_modules {list(modules)}; "
                          "is model= the adapter's base model?")
    return int(parts[idx]), max(matches)[1], kind


def ordered_keys(keys: Sequence[str], modules: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: split_key(k, modules))


def default_chunk(hidden: int) -> int:
    """Largest power of two <= hidden / 4 that divides hidden (min 1).

    Gives DnD's 128 / 256 / 512 for hidden 896 / 1536 / 3584, 64 for MiniLM (384), 16 for the
    64-wide tiny models, 8 for tiny_gemma2 (48) and 256 for gemma-2-2b (2304).
    """
    c = 1
    while c * 2 <= hidden / 4 and hidden % (c * 2) == 0:
        c *= 2
    return c


def infer_hidden(shapes: dict[str, Sequence[int]]) -> int:
    """The hidden size of the base model, taken as the most common input width of the lora_A tensors."""
    widths = Counter(int(s[1]) for k, s in shapes.items() if k.endswith(SUFFIXES["A"]))
    return widths.most_common(1)[0][0]


def build_layout(shapes: dict[str, Sequence[int]], dtypes: dict[str, str], adapter_config: dict[str, Any], *,
                 modules: Sequence[str], scheme: str, chunk: int | None = None,
                 token_shape: Sequence[int] | None = None) -> Layout:
    """The layout of an adapter with these tensor shapes (flat stats are filled in by the tokenizer)."""
    if scheme not in SCHEMES:
        raise ConfigError(f"tokenize.scheme={scheme!r}; expected one of {SCHEMES}")
    keys = ordered_keys(list(shapes), modules)
    for k in keys:
        if len(shapes[k]) != 2:
            raise CheckpointError(f"tensor {k} has shape {list(shapes[k])}; LoRA weights are 2-D")
    r = int(adapter_config["r"])
    for k in keys:
        got = shapes[k][0] if k.endswith(SUFFIXES["A"]) else shapes[k][1]
        if got != r:
            raise CheckpointError(f"tensor {k} has shape {list(shapes[k])}: rank {got}, but adapter_config r={r}")
    chunk = int(chunk) if chunk else default_chunk(infer_hidden(shapes))
    slots = []
    if scheme == "dnd":
        if chunk < 1:
            raise ConfigError(f"tokenize.chunk={chunk}; expected a positive number of columns")
        t = 0
        for k in keys:
            s = TensorSlot(k, list(shapes[k]), dtypes[k], transposed=k.endswith(SUFFIXES["B"]), first_token=t)
            s.num_tokens = -(-s.length // chunk)
            t += s.num_tokens
            slots.append(s)
        return Layout(scheme, [r + 2, chunk + 2], t, adapter_config, slots, r, chunk)
    shape = list(token_shape) if token_shape else [r, chunk]
    if len(shape) != 2 or min(int(x) for x in shape) < 1:
        raise ConfigError(f"tokenize.token_shape={shape}; expected two positive sizes [h, w]")
    h, w = (int(x) for x in shape)
    off = 0
    for k in keys:
        slots.append(TensorSlot(k, list(shapes[k]), dtypes[k], offset=off))
        off += slots[-1].numel
    return Layout(scheme, [h, w], -(-off // (h * w)), adapter_config, slots, r)
