"""Transfer of a Qwen2.5-0.5B-shaped LoRA (r=8 on q_proj/v_proj, 24 layers) between two random
0.5B-shaped models on CPU: SVD cache off, on and empty (computes and writes), on and warm.

The base weights are plain tensors of the real shapes (q_proj 896×896, v_proj 128×896), not whole
models: the transfer only reads those weights.
"""

from __future__ import annotations

import tempfile
import time

import torch

from loragen.lora.adapter_io import Adapter
from loragen.lora.svd_cache import SVDCache
from loragen.lora.transfer import ModelWeights, TransferSettings, transfer_adapter

LAYERS, HIDDEN, KV = 24, 896, 128
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (KV, HIDDEN)}
R = 8


def random_model(key: str, seed: int) -> ModelWeights:
    g = torch.Generator().manual_seed(seed)
    return ModelWeights.from_tensors(key, {f"model.layers.{i}.{s}.weight": torch.randn(shape, generator=g) * 0.02
                                           for i in range(LAYERS) for s, shape in SHAPES.items()})


def random_adapter() -> Adapter:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(LAYERS):
        for s, (out, inp) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{i}.{s}"
            tensors[prefix + ".lora_A.weight"] = torch.randn(R, inp, generator=g) / inp**0.5
            tensors[prefix + ".lora_B.weight"] = torch.randn(out, R, generator=g) * 0.01
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    return Adapter(config, tensors)


def _timed(adapter, source, target, cache) -> float:
    t0 = time.perf_counter()
    res = transfer_adapter(adapter, source, target, TransferSettings(rank_svd=320), cache)
    assert len(res.modules) == LAYERS * len(SHAPES)
    return time.perf_counter() - t0


def run() -> list[dict]:
    adapter, source, target = random_adapter(), random_model("bench/source", 1), random_model("bench/target", 2)
    off = _timed(adapter, source, target, SVDCache(None))
    with tempfile.TemporaryDirectory() as d:
        cold = _timed(adapter, source, target, SVDCache(d))
        warm = _timed(adapter, source, target, SVDCache(d))
    notes = f"Qwen2.5-0.5B shapes, r={R} on q/v x {LAYERS} layers, rank_svd=320, CPU, {torch.get_num_threads()} threads"
    return [
        {"name": "transfer_svd_cache_warm", "metric": "seconds per transfer", "loragen": warm, "reference": off,
         "ratio": warm / off, "target": "< 0.2 (cache warm vs off)", "notes": notes},
        {"name": "transfer_svd_cache_cold", "metric": "seconds per transfer", "loragen": cold, "reference": off,
         "ratio": cold / off, "target": "< 1.2 (writing the cache costs little)", "notes": notes},
    ]
