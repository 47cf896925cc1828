"""`make gpu-check` (loragen.bench.gpu_check) and the GPU tests' skip helper, on the CPU: the verdicts, the
no-CUDA exit, and the timed-step code at tiny shapes (what a GPU machine runs at real shapes)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loragen.bench import gpu_check
from loragen.bench.scaling import StepCost
from tests.conftest import ROOT
from tests.gpu.conftest import RunIf, skip_reason


def cost(weights=1.0, state=0.1, activations=8.9) -> StepCost:
    return StepCost("x", 4, 0.5, 4.4, 10.0, weights, state, activations)


@pytest.mark.parametrize("min_gpus, bf16, n, ok, reason", [
    (1, False, 0, False, "no CUDA device"),
    (1, True, 0, False, "no CUDA device"),
    (2, False, 0, False, "needs 2 GPUs, found 0"),
    (2, True, 1, True, "needs 2 GPUs, found 1"),
    (1, True, 1, False, "no bf16 support"),
    (1, True, 1, True, None),
    (2, False, 4, False, None),
])
def test_skip_reasons(min_gpus, bf16, n, ok, reason):
    assert skip_reason(min_gpus, bf16, n_gpus=n, bf16_supported=ok) == reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_run_if_skips_here_with_the_reason():
    mark = RunIf(min_gpus=1, bf16=True).mark
    assert mark.name == "skipif" and mark.args == (True,) and mark.kwargs["reason"] == "no CUDA device"
    assert RunIf(min_gpus=2).mark.kwargs["reason"] == "needs 2 GPUs, found 0"


def test_every_gpu_test_module_is_marked_gpu_and_gated():
    """`make test` deselects by the gpu marker: every module in tests/gpu must carry it (and a RunIf skip)."""
    modules = sorted((ROOT / "tests" / "gpu").glob("test_*.py"))
    assert len(modules) >= 4
    for path in modules:
        marks = importlib.import_module(f"tests.gpu.{path.stem}").pytestmark
        assert {m.name for m in marks} >= {"gpu", "skipif"}, path.name


def test_memory_verdicts():
    assert gpu_check.memory_problem(10.0, 10.0) is None
    assert gpu_check.memory_problem(20.0, 10.0) is None and gpu_check.memory_problem(5.0, 10.0) is None  # 2x: still ok
    assert gpu_check.memory_problem(21.0, 10.0) == "peak memory 21.0 GB is 2.1x the estimate 10.0 GB (limit 2x)"
    assert gpu_check.memory_problem(4.0, 10.0) == "peak memory 4.0 GB is 2.5x below the estimate 10.0 GB (limit 2x)"


def test_rows_that_cannot_fit_are_skipped_before_they_run():
    generator = cost(weights=0.0, state=17.8, activations=8.7)  # the Scaling table's dnd_qwen0.5b row, 26.5 GB
    assert gpu_check.does_not_fit(generator, 24.0) is None  # a 4090 may hold it if the estimate is high: try it
    assert "weights and optimizer state alone take 17.8 GB; this GPU has 16.0 GB free" in gpu_check.does_not_fit(generator, 16.0)
    big = cost(weights=5.2, state=0.2, activations=62.5)  # gemma2-2b LoRA at 32 x 256: 68 GB
    assert gpu_check.does_not_fit(big, 24.0).startswith("it needs about 68 GB (estimate), more than the 24.0 GB free")
    assert gpu_check.does_not_fit(big, 80.0) is None


def test_overall_verdict_and_exit_codes():
    ok_tests = {"exit_code": 0}
    assert gpu_check.verdict(ok_tests, [{"what": "a", "problem": None}, {"what": "b", "status": "skipped"}]) == (0, [])
    assert gpu_check.verdict(None, []) == (0, [])  # no source tree: the timed steps alone
    code, lines = gpu_check.verdict({"exit_code": 1}, [{"what": "LoRA", "problem": "peak memory ..."}])
    assert code == gpu_check.EXIT_FAILED == 1
    assert lines == ["GPU tests failed (exit code 1); see the pytest output above", "LoRA: peak memory ..."]
    assert gpu_check.verdict({"exit_code": 5}, [])[1] == ["GPU tests failed (no GPU test was collected); see the "
                                                          "pytest output above"]


def test_no_cuda_is_one_line_and_exit_3(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == gpu_check.EXIT_NO_CUDA == 3
    assert capsys.readouterr().out == gpu_check.NO_CUDA_LINE + "\n"
    assert not (tmp_path / "g.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_no_cuda_module_run_prints_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loragen.bench.gpu_check", "--out", str(tmp_path / "g.json")],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == gpu_check.NO_CUDA_LINE + "\n" and proc.stderr == ""


def test_timed_steps_run_at_tiny_shapes_on_cpu():
    """The same setup and timing code as on the GPU (bf16 autocast on the CPU): a tiny Qwen2 LoRA and a tiny
    HyperConv generator; on the CPU there is no CUDA peak memory, so no memory verdict."""
    cpu = torch.device("cpu")
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, tie_word_embeddings=True)
    lora = gpu_check.measure("LoRA tiny", 2, cost(), lambda: gpu_check.lora_setup(
        "qwen2", shape, batch=2, seq_len=16, r=4, device=cpu), "tokens/s", cpu, None)
    assert lora["status"] == "measured" and lora["step_seconds"] > 0
    assert lora["rate"] == pytest.approx(2 * 17 / lora["step_seconds"])  # 2 sequences of 16 + 1 tokens
    assert lora["peak_memory_gb"] is None and lora["problem"] is None
    features = [[4, 16, 32], [8, 8, 16], [6, 4, 10]]
    gen = gpu_check.measure("generator tiny", 2, cost(), lambda: gpu_check.generator_setup(
        features, 3, batch=2, device=cpu), "samples/s", cpu, None)
    assert gen["status"] == "measured" and gen["rate"] == pytest.approx(2 / gen["step_seconds"])
    line = gpu_check.row_line(lora)
    assert line.startswith("gpu-check: LoRA tiny (batch 2): ") and "tokens/s" in line and line.endswith(": ok")
    skipped = gpu_check.measure("LoRA tiny", 2, cost(), lambda: pytest.fail("must not build"), "tokens/s", cpu, 0.5)
    assert skipped["status"] == "skipped"
    assert gpu_check.row_line(skipped).startswith("gpu-check: LoRA tiny (batch 2): SKIPPED: its weights and optimizer")


def test_generator_shapes_are_dnd_qwen05b():
    features, kernel = gpu_check.generator_shapes()
    assert features[0] == [128, 384, 384] and features[-1] == [4296, 10, 130] and kernel == 9


def test_row_line_with_a_measured_peak():
    row = {"what": "LoRA", "batch": 32, "status": "measured", "rate": 41234.5, "rate_unit": "tokens/s",
           "step_seconds": 0.2, "peak_memory_gb": 30.0, "memory_ratio": 30 / 26.5,
           "estimate": {"memory_gb": 26.5, "seconds": 0.16}, "problem": None}
    assert gpu_check.row_line(row) == ("gpu-check: LoRA (batch 32): 41,234 tokens/s, 0.200 s/step (estimate 0.16 s on "
                                       "an A800), peak 30.0 GB (estimate 26.5 GB, ratio 1.13): ok")


def test_gpu_check_script_and_make_target_exist():
    assert os.access(ROOT / "scripts" / "gpu_check.sh", os.X_OK)
    assert "gpu-check:" in Path(ROOT / "Makefile").read_text()
