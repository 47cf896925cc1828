"""stage=evaluate on the GPU (hardware=rtx4090: bf16) against the CPU in fp32: the same predictions on >= 99 % of
300 ARC-Easy documents, and results.json says where and in what dtype it ran."""

import json

import pytest

from tests.conftest import run_cli
from tests.gpu.conftest import CPU, GPU, RunIf

pytestmark = [pytest.mark.gpu, RunIf(min_gpus=1, bf16=True)]

EVAL = ["stage=evaluate", "model=tiny_qwen2", "dataset=arc_easy", "eval.limit=300", "tracker=none"]


def samples(run) -> list[dict]:
    return [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]


def test_gpu_evaluation_agrees_with_cpu_and_records_device_and_dtype(tmp_path):
    run_cli([*EVAL, *GPU, f"hydra.run.dir={tmp_path / 'gpu'}"])
    run_cli([*EVAL, *CPU, f"hydra.run.dir={tmp_path / 'cpu'}"])
    gpu, cpu = samples(tmp_path / "gpu"), samples(tmp_path / "cpu")
    assert len(gpu) == len(cpu) == 300 and [s["id"] for s in gpu] == [s["id"] for s in cpu]
    # bf16 on the CPU agreed on 300 of 300 here (largest score difference 0.014, smallest top-two gap 0.02)
    agree = sum(g["pred"] == c["pred"] for g, c in zip(gpu, cpu)) / len(cpu)
    assert agree >= 0.99, f"GPU and CPU predictions agree on {agree:.1%} of 300 documents"
    (entry,) = json.loads((tmp_path / "gpu" / "results.json").read_text())["results"]
    (ref,) = json.loads((tmp_path / "cpu" / "results.json").read_text())["results"]
    assert entry["acc"] == pytest.approx(ref["acc"], abs=0.01)
    # Where it ran, as measured by the stage (not the requested config): results.json's provenance records the
    # device of the model's parameters and the dtype it scored in.
    for run, device, dtype in ((tmp_path / "gpu", "cuda", "bfloat16"), (tmp_path / "cpu", "cpu", "float32")):
        prov = json.loads((run / "results.json").read_text())["provenance"]
        assert "device" in prov and "dtype" in prov, (
            f"{run / 'results.json'}: provenance records no device/dtype (keys: {sorted(prov)}); stage=evaluate "
            "should write provenance.device (e.g. 'cuda:0') and provenance.dtype (e.g. 'bfloat16')")
        assert str(prov["device"]).startswith(device) and prov["dtype"] == dtype
