"""stage=generator (the small_minilm generator at the test shapes of tests/test_generator_stage.py) trained on the
GPU with hardware=rtx4090 (bf16 autocast), then stage=generate from its checkpoint on the GPU and on the CPU: the
same prompts give the same adapters within bf16 tolerance, and the GPU run says it ran on the GPU."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.gpu.conftest import CPU, GPU, RunIf
from tests.test_generator_generate import GEN, write_token_dirs
from tests.test_generator_stage import generator_args

pytestmark = [pytest.mark.gpu, RunIf(min_gpus=1, bf16=True)]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_generator_trains_on_gpu_and_generate_on_gpu_equals_cpu(tmp_path):
    tokens = write_token_dirs(tmp_path / "tokens")
    run, cache = tmp_path / "gen", tmp_path / "cache"
    run_cli([*generator_args(tokens, run, cache), *GPU])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 12 and all(math.isfinite(h["loss"]) for h in metrics["history"])
    assert {"generated", "oracle", "average"} <= set(metrics["heldout_eval"]["adapters"])
    weights = load_file(str(run / "generator" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}  # fp32 master weights under bf16 autocast
    assert all(torch.isfinite(v).all() for v in weights.values())

    args = ["stage=generate", f"generate.checkpoint={run}", "generate.num_adapters=2", "generate.seed=3",
            "tracker=none", f"paths.cache_dir={cache}", *GEN]
    run_cli([*args, *GPU, f"hydra.run.dir={tmp_path / 'g_gpu'}"])
    run_cli([*args, *CPU, f"hydra.run.dir={tmp_path / 'g_cpu'}"])
    for name in ("gen-000", "gen-001"):
        gpu_dir, cpu_dir = (tmp_path / d / "adapters" / name for d in ("g_gpu", "g_cpu"))
        assert json.loads((gpu_dir / "prompts.json").read_text())["prompts"] == \
            json.loads((cpu_dir / "prompts.json").read_text())["prompts"]
        gpu, cpu = (load_file(str(d / "adapter_model.safetensors")) for d in (gpu_dir, cpu_dir))
        assert gpu.keys() == cpu.keys()
        # encoder, decoder and detokenize on the GPU (bf16 autocast at most) vs all on the CPU in fp32
        worst = max(rel_error(gpu[k], cpu[k]) for k in cpu)
        assert worst < 1e-2, f"{name}: largest relative difference of a tensor, GPU vs CPU: {worst:.2e}"
    for d, device in (("g_gpu", "cuda"), ("g_cpu", "cpu")):
        summary = json.loads((tmp_path / d / "generate.json").read_text())
        assert str(summary.get("device")).startswith(device), (
            f"{tmp_path / d / 'generate.json'} records device {summary.get('device')!r}; stage=generate should run "
            f"the encoder, the decoder and detokenize on hardware.device and record it (expected {device}...)")
