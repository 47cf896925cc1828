"""The HyperConv generator on CPU with the small_minilm config (N=32 prompts of L=64, kernel 3):

- training samples/s with the prompt-state cache vs re-encoding every sample's prompts (the reference);
- peak memory of training;
- generation latency of one adapter, encoder included (32 prompts -> PEFT tensors), against the 1 s target;
- a task-objective step (one generated adapter through frozen MiniLM on a labeled batch of 16) against a
  reconstruction step of the same generator (batch 4): seconds and peak RSS, no target (issue [2/5]).

Token sets are synthetic (MiniLM r=8 query/value adapters, dnd scheme: 144 tokens of 10x66); the prompts
are ARC-Easy train questions.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from loragen.data import load_split
from loragen.generator.tasks import PairSamples, Task, collate
from loragen.lora.adapter_io import Adapter
from loragen.lora.tokenize import detokenize, tokenize_adapters
from loragen.models.hyperconv import HyperConvDecoder
from loragen.models.prompt_cache import PromptStateCache, prompt_pool
from loragen.models.text_encoder import load_text_encoder
from loragen.models.token_loss import token_loss, token_weights

CONF = Path(__file__).resolve().parents[3] / "conf"
BATCH, STEPS, WARMUP = 4, 6, 2


def _cfg():
    gen = OmegaConf.load(CONF / "generator" / "small_minilm.yaml")
    encoder = OmegaConf.load(CONF / "model" / "minilm.yaml")
    cache = os.environ.get("LORAGEN_CACHE_DIR") or str(Path.home() / ".cache" / "loragen")
    paths = OmegaConf.create({"data_dir": os.environ.get("LORAGEN_DATA_DIR"), "models_dir": None, "cache_dir": cache})
    n, length = int(gen.num_prompts), int(gen.prompt_len)
    features = [[n, length, 384]] + [list(f) for f in gen.features[1:]]
    return gen, encoder, paths, features


def _token_set(modules):
    g = torch.Generator().manual_seed(0)
    adapters = []
    for step in range(4):
        tensors = {}
        for layer in range(6):
            for m in ("query", "value"):
                p = f"base_model.model.encoder.layer.{layer}.attention.self.{m}"
                tensors[f"{p}.lora_A.weight"] = torch.randn(8, 384, generator=g) * 0.05
                tensors[f"{p}.lora_B.weight"] = torch.randn(384, 8, generator=g) * 0.01 * (step + 1)
        adapters.append(Adapter({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
                                tensors))
    return tokenize_adapters(adapters, modules=modules, scheme="dnd")


def _train_rate(model, next_batch, mask, weights) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for step in range(WARMUP + STEPS):
        t0 = time.perf_counter()
        batch = next_batch(step)
        loss = token_loss(model(batch["cond"]), batch["target"], mask, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return BATCH / statistics.median(times[WARMUP:])


def run() -> list[dict]:
    gen, encoder_cfg, paths, features = _cfg()
    encoder = load_text_encoder(encoder_cfg, paths, int(gen.prompt_len))
    ts = _token_set(list(encoder_cfg.linear_modules))
    spec = OmegaConf.load(CONF / "dataset" / "arc_easy.yaml")
    prompts = prompt_pool([r.prompt for r in load_split(spec, "train", data_dir=paths.data_dir).records], 256, 0)
    with tempfile.TemporaryDirectory() as tmp:
        states = PromptStateCache(tmp, encoder).states(prompts)
    task = Task("arc_easy", ts, prompts, states, "train", "<synthetic>")
    samples = PairSamples([task], int(gen.num_prompts), noise_cond=1e-4, noise_target=1e-5)
    weights = token_weights(ts.token_std)
    torch.manual_seed(0)
    model = HyperConvDecoder(features, int(gen.kernel_size))

    def cached(step):
        return collate([samples[step * BATCH + i] for i in range(BATCH)])

    def uncached(step):
        batch = cached(step)
        gen_ = torch.Generator().manual_seed(step)
        fresh = [encoder.encode([prompts[j] for j in torch.randint(len(prompts), (int(gen.num_prompts),),
                                                                     generator=gen_).tolist()])
                 for _ in range(BATCH)]
        return {"cond": torch.stack(fresh), "target": batch["target"]}

    with_cache = _train_rate(model, cached, ts.mask, weights)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    without_cache = _train_rate(model, uncached, ts.mask, weights)

    model.eval()
    latencies = []
    for i in range(5):
        batch = prompts[i * 32:(i + 1) * 32]
        t0 = time.perf_counter()
        with torch.no_grad():
            tokens = model(encoder.encode(batch).unsqueeze(0))[0]
        detokenize(tokens, ts.layout)
        latencies.append(time.perf_counter() - t0)
    latency = statistics.median(latencies[1:])
    params = sum(p.numel() for p in model.parameters())
    task_row = _task_vs_reconstruction(model, samples, ts, encoder_cfg, paths, spec)
    return [task_row,
        {"name": "generator_train", "metric": f"samples/s (small_minilm, {params / 1e6:.2f}M params, batch {BATCH})",
         "loragen": with_cache, "reference": without_cache, "ratio": with_cache / without_cache,
         "target": "> 1 (cache helps)",
         "notes": f"reference re-encodes each sample's {gen.num_prompts} prompts; peak RSS {peak_mb:.0f} MB"},
        {"name": "generator_generate", "metric": "s per adapter (32 prompts of L=64, encoder included)",
         "loragen": latency, "reference": 1.0, "ratio": 1.0 / latency, "target": "< 1 s (ratio > 1)",
         "notes": "median of 4 after one warm-up; decode + detokenize included"},
    ]


def _task_vs_reconstruction(model, samples, ts, encoder_cfg, paths, spec) -> dict:
    """Seconds per optimizer step (median) and peak RSS: reconstruction (batch 4) vs task objective (1 adapter x 16)."""
    from loragen.generator.task_objective import FunctionalLoRA
    from loragen.models import load_model
    from loragen.train.objectives import make_objective

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    weights = token_weights(ts.token_std)

    def timed(step_fn) -> float:
        times = []
        for step in range(WARMUP + STEPS):
            t0 = time.perf_counter()
            loss = step_fn(step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[WARMUP:])

    recon_s = timed(lambda step: token_loss(model(collate([samples[step * BATCH + i] for i in range(BATCH)])["cond"]),
                                            collate([samples[step * BATCH + i] for i in range(BATCH)])["target"],
                                            ts.mask, weights))
    recon_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lm = load_model(encoder_cfg, paths, "fp32", "cpu")
    objective = make_objective(lm.kind, lm.tokenizer, max_length=512, temperature=0.05)
    flora = FunctionalLoRA(lm, ts.layout, objective)
    records = load_split(spec, "train", data_dir=paths.data_dir).records
    batches = [objective.collate(records[i * 16:(i + 1) * 16]) for i in range(WARMUP + STEPS)]

    def task_step(step):
        loss, units = flora.loss(model(samples[step]["cond"].unsqueeze(0))[0], batches[step])
        return loss / units

    task_s = timed(task_step)
    task_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"name": "generator_task_step", "metric": "s per step: task objective (1 adapter, 16 ARC-E records) vs "
            f"reconstruction (batch {BATCH})", "loragen": task_s, "reference": recon_s, "ratio": task_s / recon_s,
            "target": "none (recorded)", "notes": f"peak RSS {recon_mb:.0f} MB after the reconstruction steps, "
            f"{task_mb:.0f} MB after the task steps (frozen MiniLM loaded)"}
