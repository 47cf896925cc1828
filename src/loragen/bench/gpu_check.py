"""`make gpu-check`: is this GPU machine ready for loragen's GPU experiments? (offline, a few minutes)

    python -m loragen.bench.gpu_check [--out bench/gpu_check.json] [--skip-tests]

1. `pytest -m gpu` (tests/gpu: the stages on CUDA checked against the same stages on the CPU), when the
   source tree's tests are next to this package;
2. one timed training step (after one warm-up step) of each GPU experiment at its real shapes, with random
   weights built from the model configs on the GPU (loragen.bench.scaling builds the same models on the meta
   device for the README's Scaling table): LoRA r=8 on the seven linear modules of qwen2.5-0.5b, 32 sequences
   of 256 tokens (bf16 weights, fp32 LoRA, bf16 autocast, the lora stage's loss on every position); the
   `dnd_qwen0.5b` HyperConv generator, batch 4 (fp32 weights, bf16 autocast, the reconstruction loss).
   Each row prints tokens/s (samples/s for the generator), step seconds and peak memory next to the Scaling
   table's estimates, and bench/gpu_check.json records them (written atomically).

A row fails when its peak memory is off the estimate by more than MEMORY_FACTOR (2x) either way; a row whose
model does not fit this GPU is skipped with a line saying so (it needs more than the GPU's memory even at half
the estimate, or the step runs out of memory). The step times are compared with the estimate for information
only: the estimate assumes an A800 at 35 % of its bf16 peak.

Exit codes: 0 every check passed; 1 a check failed (a GPU test, or a memory estimate off by more than 2x);
3 no CUDA device here (one line, nothing checked).

Not a benchmark of `make bench` (no `run()`): it needs a GPU.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from loragen.bench import scaling

EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 3
MEMORY_FACTOR = 2.0          # a measured peak outside [estimate / 2, estimate * 2] fails the check
TEST_TIMEOUT = 360           # seconds for `pytest -m gpu`; the whole check should stay under 8 minutes
LORA_MODEL, LORA_BATCH, SEQ_LEN, LORA_R = "qwen2.5-0.5b", 32, 256, 8
GENERATOR, GENERATOR_BATCH = "dnd_qwen0.5b", 4
ROOT = Path(__file__).resolve().parents[3]  # the source tree (tests/gpu exists only there)
NO_CUDA_LINE = "gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing to check"
GB = 1e9


# --- verdicts (pure; unit-tested on CPU) ---------------------------------------------------------------------

def memory_problem(measured_gb: float, estimate_gb: float, factor: float = MEMORY_FACTOR) -> str | None:
    """Why a measured peak memory contradicts its estimate (off by more than `factor` either way), or None."""
    ratio = measured_gb / estimate_gb
    if ratio > factor:
        return f"peak memory {measured_gb:.1f} GB is {ratio:.1f}x the estimate {estimate_gb:.1f} GB (limit {factor:g}x)"
    if ratio < 1 / factor:
        return (f"peak memory {measured_gb:.1f} GB is {1 / ratio:.1f}x below the estimate {estimate_gb:.1f} GB "
                f"(limit {factor:g}x)")
    return None


def does_not_fit(est: scaling.StepCost, gpu_gb: float, factor: float = MEMORY_FACTOR) -> str | None:
    """Why a step cannot fit a GPU of `gpu_gb` whatever the estimate's error within `factor`, or None (try it)."""
    fixed = est.weights_gb + est.state_gb  # weights and optimizer state are exact counts, not estimates
    if fixed > gpu_gb:
        return f"its weights and optimizer state alone take {fixed:.1f} GB; this GPU has {gpu_gb:.1f} GB free"
    if est.memory_gb / factor > gpu_gb:
        return (f"it needs about {est.memory_gb:.0f} GB (estimate), more than the {gpu_gb:.1f} GB free on this GPU "
                f"even at 1/{factor:g} of that")
    return None


def verdict(gpu_tests: dict | None, rows: list[dict]) -> tuple[int, list[str]]:
    """(exit code, failure lines) of a whole check."""
    failures = []
    if gpu_tests is not None and gpu_tests["exit_code"] != 0:
        what = "no GPU test was collected" if gpu_tests["exit_code"] == 5 else f"exit code {gpu_tests['exit_code']}"
        failures.append(f"GPU tests failed ({what}); see the pytest output above")
    failures += [f"{r['what']}: {r['problem']}" for r in rows if r.get("problem")]
    return (EXIT_FAILED if failures else EXIT_OK), failures


def row_line(r: dict) -> str:
    """One printed line per row."""
    est = r["estimate"]
    if r["status"] == "skipped":
        return f"gpu-check: {r['what']} (batch {r['batch']}): SKIPPED: {r['reason']}"
    peak = f"peak {r['peak_memory_gb']:.1f} GB" if r.get("peak_memory_gb") is not None else "peak memory n/a"
    ratio = f", ratio {r['memory_ratio']:.2f}" if r.get("memory_ratio") is not None else ""
    return (f"gpu-check: {r['what']} (batch {r['batch']}): {r['rate']:,.0f} {r['rate_unit']}, {r['step_seconds']:.3f} s/step "
            f"(estimate {est['seconds']:.2f} s on an A800), {peak} (estimate {est['memory_gb']:.1f} GB{ratio}): "
            f"{'FAILED: ' + r['problem'] if r.get('problem') else 'ok'}")


# --- one timed step ------------------------------------------------------------------------------------------

def lora_setup(arch: str, shape: dict, *, batch: int, seq_len: int, r: int, device: torch.device):
    """The step of stage=lora at these shapes: random bf16 weights from the config, loragen's LoRA (fp32, seeded
    init), the causal objective's batch and loss on every position, fused AdamW. Returns (step(), tokens per step)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loragen.lora.init import attach_lora
    from loragen.train.objectives import causal_batch, causal_loss, text_sft_example

    config = AutoConfig.for_model(arch, **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = attach_lora(model, r=r, alpha=2 * r, dropout=0.0, target_modules=scaling.ALL_MODULES, init_seed=0)
    model.train()
    ids = torch.randint(config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0)).tolist()
    data = causal_batch([text_sft_example(row[:1], row[1:], seq_len + 1) for row in ids], pad=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type in ("cpu", "cuda"))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss_sum, units = causal_loss(model, data)
        (loss_sum / units).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, float(data["num_tokens"])


def generator_setup(features, kernel_size: int, *, batch: int, device: torch.device):
    """One reconstruction step of stage=generator's HyperConv decoder: fp32 weights, bf16 autocast, token_loss,
    fused AdamW; random prompt states and targets of the real shapes. Returns (step(), samples per step)."""
    from loragen.models.hyperconv import HyperConvDecoder
    from loragen.models.token_loss import token_loss

    torch.manual_seed(0)
    with torch.device(device):
        model = HyperConvDecoder(features, kernel_size)
        cond = torch.randn(batch, *features[0])
        target = torch.randn(batch, *features[-1])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.1, fused=device.type in ("cpu", "cuda"))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = token_loss(model(cond), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, float(batch)


def measure(what: str, batch: int, est: scaling.StepCost, setup: Callable[[], tuple[Callable[[], None], float]],
            rate_unit: str, device: torch.device, gpu_gb: float | None) -> dict:
    """Build (setup()), run one warm-up step and one timed step; a row with rate, seconds, peak memory and verdict."""
    row = {"what": what, "batch": batch, "estimate": {"memory_gb": est.memory_gb, "weights_gb": est.weights_gb,
           "state_gb": est.state_gb, "activations_gb": est.activations_gb, "seconds": est.seconds, "tflop": est.tflop}}
    reason = does_not_fit(est, gpu_gb) if gpu_gb is not None else None
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    cuda = device.type == "cuda"
    if cuda:
        _release()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step, work = setup()
        step()  # warm-up: kernels chosen, allocator and optimizer state created
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        seconds = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        return {**row, "status": "skipped", "reason": f"out of memory ({gpu_gb:.1f} GB free on this GPU): {first}"}
    finally:
        step = setup = None  # noqa: F841 - free the model before the next row
        if cuda:
            _release()
    peak = torch.cuda.max_memory_allocated(device) / GB if cuda else None
    row.update(status="measured", step_seconds=seconds, rate=work / seconds, rate_unit=rate_unit, peak_memory_gb=peak,
               memory_ratio=peak / est.memory_gb if peak is not None else None,
               problem=memory_problem(peak, est.memory_gb) if peak is not None else None)
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def generator_shapes() -> tuple[list[list[int]], int]:
    """(features, kernel_size) of conf/generator/dnd_qwen0.5b.yaml, composed as stage=generator composes it."""
    from hydra import compose, initialize_config_dir

    from loragen.config_dir import conf_dir
    from loragen.generator.checkpoint import generator_config

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=generator", f"generator={GENERATOR}",
                                                       f"model={LORA_MODEL}", "hardware=a800"])
    gen = generator_config(cfg)
    return [[int(v) for v in f] for f in gen["features"]], int(gen["kernel_size"])


def experiment_rows(device: torch.device, gpu_gb: float | None) -> list[dict]:
    arch, shape = scaling.SHAPES[LORA_MODEL]
    est = scaling.lora_step(LORA_MODEL, batch=LORA_BATCH, seq_len=SEQ_LEN, r=LORA_R)
    rows = [measure(f"LoRA r={LORA_R} (7 modules) on {LORA_MODEL}, {SEQ_LEN} tokens", LORA_BATCH, est,
                    lambda: lora_setup(arch, shape, batch=LORA_BATCH, seq_len=SEQ_LEN, r=LORA_R, device=device),
                    "tokens/s", device, gpu_gb)]
    print(row_line(rows[-1]), flush=True)
    features, kernel = generator_shapes()
    est = scaling.generator_step(features, kernel, batch=GENERATOR_BATCH)
    rows.append(measure(f"HyperConv generator {GENERATOR} ({est.params_b:.2f} B params)", GENERATOR_BATCH, est,
                        lambda: generator_setup(features, kernel, batch=GENERATOR_BATCH, device=device),
                        "samples/s", device, gpu_gb))
    print(row_line(rows[-1]), flush=True)
    return rows


# --- the check -----------------------------------------------------------------------------------------------

def run_gpu_tests(root: Path = ROOT) -> dict | None:
    """`pytest -m gpu` on tests/gpu (its output passes through); None when there is no source tree here."""
    tests = root / "tests" / "gpu"
    if not tests.is_dir():
        print(f"gpu-check: no {tests} (loragen installed without its source tree): GPU tests not run", flush=True)
        return None
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(tests)]
    print(f"gpu-check: running {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        code = subprocess.run(cmd, cwd=root, timeout=TEST_TIMEOUT).returncode
    except subprocess.TimeoutExpired:
        print(f"gpu-check: GPU tests did not finish within {TEST_TIMEOUT} s", flush=True)
        code = -1
    return {"command": " ".join(cmd[1:]), "exit_code": code, "seconds": round(time.perf_counter() - t0, 1)}


def gpu_info() -> dict:
    from loragen.bench.__main__ import machine

    props = torch.cuda.get_device_properties(0)
    return {**machine(), "gpu": props.name, "gpu_memory_gb": round(props.total_memory / GB, 1),
            "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loragen.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench") / "gpu_check.json", help="where to write the results")
    parser.add_argument("--skip-tests", action="store_true", help="only the timed steps, not `pytest -m gpu`")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA_LINE, flush=True)
        return EXIT_NO_CUDA

    from loragen import io

    t0 = time.perf_counter()
    info = gpu_info()
    print(f"gpu-check: {info['gpu_count']} x {info['gpu']} ({info['gpu_memory_gb']} GB, bf16 "
          f"{'yes' if info['bf16'] else 'no'}), CUDA {info['cuda']}, torch {info['torch']}", flush=True)
    gpu_tests = None if args.skip_tests else run_gpu_tests()
    device = torch.device("cuda", 0)
    free, _ = torch.cuda.mem_get_info(device)
    rows = experiment_rows(device, free / GB)
    code, failures = verdict(gpu_tests, rows)
    report = {"machine": info, "gpu_tests": gpu_tests, "rows": rows, "memory_factor": MEMORY_FACTOR,
              "failures": failures, "exit_code": code, "seconds": round(time.perf_counter() - t0, 1)}
    io.write_json(args.out, report)
    for line in failures:
        print(f"gpu-check: FAILED: {line}", flush=True)
    print(f"gpu-check: {'all checks passed' if code == EXIT_OK else f'{len(failures)} check(s) failed'} in "
          f"{report['seconds']:.0f} s; results in {args.out}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
