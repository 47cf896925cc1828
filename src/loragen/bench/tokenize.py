"""Tokenize 50 random adapters with Qwen2.5-0.5B's exact LoRA shapes (r=8, seven modules, 24 layers).

Reports (a) the bare safetensors load of all 50, (b) tokenize, (c) detokenize, as MB/s and as
ratios to (a); and the peak extra memory of tokenize relative to the output tensor (measured in
a fresh process, from VmHWM). Shapes come from the model config; no weights are needed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loragen.lora.adapter_io import Adapter, write_adapter

QWEN05B = {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "head_dim": 64}
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]


def qwen_lora_shapes(r: int = 8, cfg: dict = QWEN05B, layers: int | None = None) -> dict[str, tuple[int, int]]:
    """PEFT key -> shape for LoRA on all seven modules of a Qwen2-architecture model."""
    h, q, kv = cfg["hidden"], cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    in_out = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.up_proj": (h, cfg["intermediate"]),
              "mlp.gate_proj": (h, cfg["intermediate"]), "mlp.down_proj": (cfg["intermediate"], h)}
    shapes = {}
    for layer in range(cfg["layers"] if layers is None else layers):
        for mod, (i, o) in in_out.items():
            prefix = f"base_model.model.model.layers.{layer}.{mod}"
            shapes[prefix + ".lora_A.weight"] = (r, i)
            shapes[prefix + ".lora_B.weight"] = (o, r)
    return shapes


def random_qwen_adapter(seed: int, r: int = 8, dtype: torch.dtype = torch.float32,
                        layers: int | None = None) -> Adapter:
    """A random adapter with Qwen2.5-0.5B's LoRA shapes (the first `layers` layers, default all 24):
    lora_A ~ U(±1/sqrt(in)), lora_B ~ N(0, 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, (a, b) in qwen_lora_shapes(r, layers=layers).items():
        if k.endswith("lora_A.weight"):
            tensors[k] = ((torch.rand(a, b, generator=g) * 2 - 1) / b**0.5).to(dtype)
        else:
            tensors[k] = (torch.randn(a, b, generator=g) * 1e-3).to(dtype)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": MODULES,
              "bias": "none", "base_model_name_or_path": "Qwen/Qwen2.5-0.5B", "task_type": "CAUSAL_LM"}
    return Adapter(config, tensors)


_PEAK = """
import json, sys, torch
from loragen.lora.tokenize import tokenize_checkpoints
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
base = rss()
ts = tokenize_checkpoints(sys.argv[1], modules=json.loads(sys.argv[2]), scheme="dnd")
print(json.dumps({"extra": hwm() - base, "output": ts.tokens.numel() * 4}))
"""


def first_touch(shape) -> float:
    """Seconds to allocate a float32 tensor of `shape` and write one value per 4 KiB page: the floor of any
    encoder that returns its tokens in fresh memory."""
    t0 = time.perf_counter()
    x = torch.empty(shape)
    x.view(-1)[::1024].zero_()
    t = time.perf_counter() - t0
    del x
    return t


REPEATS = 3


def _spread(values: list[float]) -> str:
    return f"min-max {min(values):.2f}-{max(values):.2f} s"


def run(n: int = 50) -> list[dict]:
    from safetensors.torch import load_file

    from loragen.lora.tokenize import detokenize, tokenize_checkpoints
    from loragen.lora.tokenize.codec import single_thread

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            write_adapter(Path(tmp) / f"step-{(i + 1) * 10:06d}", random_qwen_adapter(i))
        files = sorted(Path(tmp).glob("step-*/adapter_model.safetensors"))
        mb = sum(f.stat().st_size for f in files) / 2**20
        for f in files:  # warm the page cache: (a) and (b) read the same bytes
            f.read_bytes()
        loads, toks, touches = [], [], []
        ts = None
        for _ in range(REPEATS):  # alternated, so both sides see the same machine state
            t0 = time.perf_counter()
            with single_thread():  # the same thread setting as tokenize, so the ratio compares the work
                for f in files:  # load_file maps lazily: clone() makes it read every tensor once
                    {k: v.clone() for k, v in load_file(str(f)).items()}
            loads.append(time.perf_counter() - t0)
            ts = None  # the previous output is freed first, as in a fresh run
            t0 = time.perf_counter()
            ts = tokenize_checkpoints(tmp, modules=MODULES, scheme="dnd")
            toks.append(time.perf_counter() - t0)
            touches.append(first_touch(ts.tokens.shape))
        t_load, t_tok, t_touch = (statistics.median(v) for v in (loads, toks, touches))
        detoks = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for i in range(n):
                detokenize(ts.tokens[i], ts.layout)
            detoks.append(time.perf_counter() - t0)
        t_detok = statistics.median(detoks)
        out = subprocess.run([sys.executable, "-c", _PEAK, tmp, json.dumps(MODULES)], capture_output=True, text=True,
                             check=True)
        peak = json.loads(out.stdout.strip().splitlines()[-1])
    shape = list(ts.tokens.shape)
    note = f"{n} Qwen2.5-0.5B-shaped r=8 adapters, {mb:.0f} MB, tokens {shape}"
    return [
        {"name": "tokenize.load", "metric": "MB/s", "loragen": mb / t_load, "reference": mb / t_load, "ratio": 1.0,
         "target": "reference", "notes": f"(a) safetensors load_file + one read of each tensor, median {t_load:.2f} s "
                  f"({_spread(loads)}) of {REPEATS} alternated with (b); {note}"},
        {"name": "tokenize.tokenize", "metric": "seconds", "loragen": t_tok, "reference": t_load,
         "ratio": t_tok / t_load, "target": "<= 2x (a)",
         "notes": f"(b) {mb / t_tok:.0f} MB/s, dnd incl. token_std, median ({_spread(toks)}); first touch of a "
                  f"fresh output of that size alone (the kernel zeroing its pages, which (a) never pays): median "
                  f"{t_touch:.2f} s ({_spread(touches)})"},
        {"name": "tokenize.detokenize", "metric": "seconds", "loragen": t_detok, "reference": t_load,
         "ratio": t_detok / t_load, "target": "", "notes": f"(c) {mb / t_detok:.0f} MB/s, to in-memory tensors, median of {REPEATS} ({_spread(detoks)})"},
        {"name": "tokenize.peak_memory", "metric": "GB extra", "loragen": peak["extra"] / 2**30,
         "reference": peak["output"] / 2**30, "ratio": peak["extra"] / peak["output"], "target": "<= 2x output",
         "notes": "fresh process, VmHWM growth during tokenize_checkpoints vs the output tensor"},
    ]
