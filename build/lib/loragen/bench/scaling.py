"""Resource estimates for the GPU experiments, computed from model shapes on the meta device.

`python -m loragen.bench.scaling` builds each model from its published config.json shapes on
torch's meta device (no weights, no GPU), runs one training step's forward and backward under
FlopCounterMode, and sums the bytes autograd saves for the backward pass. Memory per GPU is
weights + trainable state (fp32 master, grads, AdamW moments) + saved activations; time per step
is FLOPs at an assumed fraction (MFU) of the A800's bf16 peak. These are estimates to plan
allocations with, not measurements: the README says so next to them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

A800_BF16_TFLOPS = 312.0  # dense bf16 peak of one A800 (A100-class) GPU
MFU = 0.35                # assumed model-FLOPs utilisation; small models on short sequences do worse
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]

# Shapes from each model's config.json on the Hugging Face Hub.
SHAPES = {
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "gemma2-2b-it": ("gemma2", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                                    num_key_value_heads=4, head_dim=256, vocab_size=256000)),
    "llama3-8b-instruct": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
}


@dataclass
class StepCost:
    what: str
    batch: int            # per GPU
    params_b: float       # billions, all parameters
    trainable_m: float    # millions
    tflop: float          # forward + backward of one step on one GPU
    weights_gb: float
    state_gb: float       # trainable params in fp32 + grads + AdamW moments
    activations_gb: float

    @property
    def memory_gb(self) -> float:
        return self.weights_gb + self.state_gb + self.activations_gb

    @property
    def seconds(self) -> float:
        return self.tflop / (A800_BF16_TFLOPS * MFU)


def _measure(model: torch.nn.Module, run_step) -> tuple[float, float]:
    """(TFLOP, GB saved for backward) of run_step() on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_step()
    return counter.get_total_flops() / 1e12, saved[0] / 1e9


def _sizes(model: torch.nn.Module, weight_bytes: int) -> tuple[float, float, float, float]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total / 1e9, trainable / 1e6, total * weight_bytes / 1e9, trainable * 16 / 1e9


def lora_step(model_name: str, *, batch: int, seq_len: int, r: int = 8, modules=ALL_MODULES) -> StepCost:
    """One LoRA SFT step of `batch` sequences of `seq_len` tokens, bf16 weights, full-vocabulary logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, shape = SHAPES[model_name]
    config = AutoConfig.for_model(arch, **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(modules)))
        ids = torch.zeros((batch, seq_len), dtype=torch.long)
        tflop, act = _measure(model, lambda: model(input_ids=ids).logits.float().sum().backward())
    params_b, trainable_m, weights_gb, state_gb = _sizes(model, 2)
    return StepCost(f"LoRA r={r} on {model_name}, {seq_len} tokens", batch, params_b, trainable_m, tflop,
                    weights_gb, state_gb, act)


def generator_step(features, kernel_size: int, *, batch: int) -> StepCost:
    """One HyperConv generator step in fp32 (the loop's precision for the generator's own weights)."""
    from loragen.models.hyperconv import HyperConvDecoder

    with torch.device("meta"):
        model = HyperConvDecoder(features, kernel_size)
        cond = torch.zeros((batch, *features[0]))
        tflop, act = _measure(model, lambda: model(cond).sum().backward())
    params_b, trainable_m, weights_gb, state_gb = _sizes(model, 0)  # fp32 weights are counted in the state
    return StepCost(f"HyperConv generator ({params_b:.2f} B params)", batch, params_b, trainable_m, tflop,
                    weights_gb, state_gb, act)


def estimates(seq_len: int) -> list[StepCost]:
    from pathlib import Path

    from omegaconf import OmegaConf

    from loragen.config_dir import conf_dir

    gen = OmegaConf.load(Path(conf_dir()) / "generator" / "dnd_qwen0.5b.yaml")
    gen.pop("defaults", None)
    gen = OmegaConf.to_container(OmegaConf.create({"generator": gen}), resolve=True)["generator"]
    features = [[int(v) for v in f] for f in gen["features"]]
    return [
        lora_step("qwen2.5-0.5b", batch=32, seq_len=seq_len),
        generator_step(features, int(gen["kernel_size"]), batch=4),
        lora_step("gemma2-2b-it", batch=32, seq_len=seq_len),
        lora_step("qwen2.5-1.5b", batch=32, seq_len=seq_len),
        lora_step("llama3-8b-instruct", batch=8, seq_len=seq_len),
        lora_step("qwen2.5-7b", batch=8, seq_len=seq_len),
    ]


def markdown(rows: list[StepCost]) -> str:
    lines = [f"Estimated on the meta device (A800 bf16 peak {A800_BF16_TFLOPS:.0f} TFLOPS at {MFU:.0%} MFU); "
             "memory = weights + fp32 trainable state (params, grads, AdamW) + activations saved for backward.", "",
             "| step | batch/GPU | params | trainable | TFLOP/step | memory/GPU | s/step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.what} | {r.batch} | {r.params_b:.2f} B | {r.trainable_m:.1f} M | {r.tflop:.1f} | "
                     f"{r.memory_gb:.0f} GB ({r.weights_gb:.1f} + {r.state_gb:.1f} + {r.activations_gb:.1f}) | {r.seconds:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (padded batch width)")
    print(markdown(estimates(parser.parse_args().seq_len)))


if __name__ == "__main__":
    main()
