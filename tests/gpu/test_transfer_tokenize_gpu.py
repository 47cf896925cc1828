"""stage=transfer on the GPU (its SVDs run on hardware.device) against the CPU, and tokenize.

stage=tokenize runs on the CPU by design, whatever `hardware` says: it streams safetensors checkpoints and
normalises chunks of a few KB each (memory-bound copies, single-threaded on purpose; a GPU would add transfers,
not speed), so a GPU machine tokenizes exactly as a CPU does; the test checks that hardware=rtx4090 changes
nothing. `lora.tokenize.detokenize` moves the tokens to the CPU before decoding; the decode on the tokens' own
device is `codec.decode_differentiable` (the generator's task objective uses it, and stage=generate can on the
GPU), checked here on CUDA tokens against the CPU decode.
"""

import pytest
import torch
from safetensors.torch import load_file

from loragen.lora.adapter_io import lora_pairs, read_adapter, write_adapter
from loragen.lora.tokenize import load_token_set
from loragen.lora.tokenize.codec import decode, decode_differentiable
from tests.conftest import run_cli
from tests.gpu.conftest import CPU, GPU, RunIf
from tests.test_generator_generate import make_adapter as synthetic_adapter
from tests.test_transfer import make_adapter

pytestmark = [pytest.mark.gpu, RunIf(min_gpus=1)]


def delta_weights(adapter_dir) -> dict[str, torch.Tensor]:
    """Module -> scale * B @ A (the factors of a re-factored delta are defined up to sign; their product is not)."""
    ad = read_adapter(adapter_dir)
    return {m: ad.scale * b @ a for m, (a, b) in lora_pairs(ad.tensors).items()}


def test_transfer_on_gpu_equals_cpu(tmp_path, paths):
    source = tmp_path / "gemma_adapter"
    make_adapter(paths, "tiny_gemma2", source)
    args = ["stage=transfer", "model=tiny_qwen2", "transfer.source_model=tiny_gemma2", f"transfer.source_adapter={source}",
            "transfer.rank_svd=16", "transfer.svd_cache=false", "tracker=none"]
    run_cli([*args, *GPU, f"hydra.run.dir={tmp_path / 'gpu'}"])
    run_cli([*args, *CPU, f"hydra.run.dir={tmp_path / 'cpu'}"])
    gpu, cpu = delta_weights(tmp_path / "gpu" / "adapter"), delta_weights(tmp_path / "cpu" / "adapter")
    assert gpu.keys() == cpu.keys() and gpu
    for m in cpu:  # fp32 SVDs on both, signs fixed by the same rule (DESIGN.md): agreement to fp32 noise
        err = float((gpu[m] - cpu[m]).norm() / cpu[m].norm())
        assert err < 1e-3, f"{m}: GPU vs CPU relative difference {err:.2e}"


def test_tokenize_is_the_same_with_hardware_rtx4090_and_device_decode_matches(tmp_path):
    ckpts = tmp_path / "ckpts"
    for step in (1, 2, 3):  # synthetic MiniLM r=2 query/value checkpoints, as tests/test_generator_generate.py
        write_adapter(ckpts / f"step-{step:06d}", synthetic_adapter(step, 1.0 + step))
    args = ["stage=tokenize", "model=minilm", f"tokenize.checkpoints={ckpts}", "tracker=none"]
    run_cli([*args, *GPU, f"hydra.run.dir={tmp_path / 'gpu'}"])
    run_cli([*args, *CPU, f"hydra.run.dir={tmp_path / 'cpu'}"])
    gpu, cpu = (load_file(str(tmp_path / d / "tokens.safetensors")) for d in ("gpu", "cpu"))
    assert gpu.keys() == cpu.keys() and all(torch.equal(gpu[k], cpu[k]) for k in cpu)
    ts = load_token_set(tmp_path / "gpu")
    on_cpu = decode(ts.tokens[-1], ts.layout)
    on_gpu = decode_differentiable(ts.tokens[-1].cuda(), ts.layout)
    assert on_gpu.keys() == on_cpu.keys()
    for k, v in on_cpu.items():
        assert on_gpu[k].is_cuda and torch.allclose(on_gpu[k].cpu(), v, rtol=1e-5, atol=1e-7), k
