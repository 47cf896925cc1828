"""stage=generator: training through the one loop, held-out evaluation and baselines (synthetic token sets)."""

import json
from pathlib import Path

import pytest

from loragen.errors import LoragenError
from tests.test_generator_generate import DATASETS, GEN, run_stage, write_token_dirs


@pytest.fixture(scope="module")
def token_dirs(tmp_path_factory):
    return write_token_dirs(tmp_path_factory.mktemp("tokens"))


def generator_args(token_dirs, run_dir, cache, extra=()):
    return [
        "stage=generator", "dataset=commonsense6", "tracker=none", f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache}", f"generator.datasets=[{','.join(DATASETS)}]", "generator.heldout=openbookqa",
        *[f"+generator.tokens.{n}={p}" for n, p in token_dirs.items()], *GEN,
        "train.max_steps=12", "train.eval_every=6", "train.per_device_batch=2", "train.log_every=6",
        "generator.eval_adapters=2", *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(token_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    cache = tmp_path_factory.mktemp("cache")
    run_stage(generator_args(token_dirs, run, cache, ["generator.residual=true"]))
    return run, cache


def test_generator_stage_outputs(trained_run, token_dirs):
    run, cache = trained_run
    meta = json.loads((run / "generator" / "generator.json").read_text())
    assert meta["heldout"] == "openbookqa" and meta["datasets"] == ["arc_easy", "arc_challenge"]
    assert meta["prompt_splits"] == {"arc_easy": "train", "arc_challenge": "train", "openbookqa": "test"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 12
    evals = [h for h in metrics["history"] if "heldout_rel_error" in h]
    assert [h["step"] for h in evals] == [6, 12]
    held = metrics["heldout_eval"]
    assert set(held["adapters"]) == {"oracle", "average", "nearest", "mean_checkpoint", "generated"}
    assert held["adapters"]["oracle"]["weight_rel_error"] == pytest.approx(0.0, abs=1e-5)
    assert held["nearest"] in {"arc_easy", "arc_challenge"}
    for name in ("oracle", "average", "nearest"):
        assert (Path(held["adapters"][name]["path"]) / "adapter_model.safetensors").is_file()
    gen0 = json.loads((run / "generated" / "gen-000" / "prompts.json").read_text())
    assert len(gen0["prompts"]) == 4 and gen0["split"] == "test"
    assert metrics["heldout_eval"]["adapters"]["average"]["weight_rel_error"] == pytest.approx(
        _average_error(token_dirs), rel=1e-4)
    # the prompt states were cached once per dataset (fp16 files under the cache dir)
    assert len(list(Path(cache).rglob("*.safetensors"))) == 3


def _average_error(token_dirs) -> float:
    """||dW(avg of arc_easy, arc_challenge final LoRAs) - dW(openbookqa's)|| / ||dW(openbookqa's)||, by hand."""
    from loragen.lora.tokenize import detokenize, load_token_set

    finals = {}
    for name, d in token_dirs.items():
        ts = load_token_set(d)
        finals[name] = detokenize(ts.tokens[-1], ts.layout).tensors
    num = den = 0.0
    for key in finals["openbookqa"]:
        if not key.endswith("lora_A.weight"):
            continue
        b_key = key.replace("lora_A", "lora_B")
        a = (finals["arc_easy"][key] + finals["arc_challenge"][key]) / 2
        b = (finals["arc_easy"][b_key] + finals["arc_challenge"][b_key]) / 2
        ref = finals["openbookqa"][b_key] @ finals["openbookqa"][key]
        num += float(((b @ a) - ref).square().sum())  # the scale alpha/r cancels in the ratio
        den += float(ref.square().sum())
    return (num / den) ** 0.5


def test_token_shape_mismatch_names_both_shapes(token_dirs, tmp_path):
    args = generator_args(token_dirs, tmp_path / "run", tmp_path / "cache")
    args = [a if not a.startswith("generator.features=") else "generator.features=[[4,16,384],[8,8,64],[100,4,66]]"
            for a in args]
    with pytest.raises(LoragenError, match=r"tokens of shape \[144, 4, 66\].*generator outputs \[100, 4, 66\]"):
        run_stage(args)
