"""The multi-task LoRA baseline: one LoRA on the union of several datasets, interleaved by a seeded sampler."""

import json
from collections import Counter

import pytest

from loragen.data.registry import LoadedSplit
from loragen.errors import ConfigError
from loragen.stages.lora import mixture
from tests.conftest import run_stage_in_process


def _split(name: str, n: int) -> LoadedSplit:
    return LoadedSplit(dataset=name, split="train", records=[f"{name}-{i}" for i in range(n)], source=name,
                       sha256=name, has_acc_norm=True)


def test_mixture_draws_every_dataset_equally_whatever_its_size_and_is_seeded():
    parts = [_split("big", 1000), _split("small", 10), _split("mid", 100)]
    mixed = mixture(parts, 3000, seed=0)
    counts = Counter(r.split("-")[0] for r in mixed.records)
    assert set(counts) == {"big", "small", "mid"} and all(900 < c < 1100 for c in counts.values()), counts
    small = [r for r in mixed.records if r.startswith("small")]
    assert Counter(small[:10]) == Counter(f"small-{i}" for i in range(10))  # a permutation, then recycled
    assert mixture(parts, 3000, seed=0).records == mixed.records
    assert mixture(parts, 3000, seed=1).records != mixed.records
    assert mixed.dataset == "big+small+mid"


def test_multitask_lora_trains_on_the_union_and_scores_each_held_out_split(tmp_path):
    run = tmp_path / "mt"
    out = run_stage_in_process(["stage=lora", "model=tiny_qwen2", "dataset=commonsense6", "tracker=none",
                                "lora.datasets=[arc_easy,piqa]", "train.max_steps=3", "train.per_device_batch=4",
                                "ckpt.every=0", "lora.final_eval_limit=4", "lora.eval_base=false"], run_dir=run)
    assert out["status"] == "completed"
    assert (run / "final" / "adapter_model.safetensors").is_file()
    results = json.loads((run / "results.json").read_text())["results"]
    assert [(e["dataset"], e["split"], e["n"]) for e in results] == [("arc_easy", "test", 4),
                                                                     ("piqa", "validation@eval", 4)]


@pytest.mark.parametrize("bad,match", [
    (["lora.datasets=[arc_easy,hellaswag]"], r"lora.datasets names \['hellaswag'\]"),
    (["lora.datasets=[arc_easy,piqa]", "train.eval_every=5"], "train.eval_every=0"),
])
def test_multitask_bad_values_are_refused(tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        run_stage_in_process(["stage=lora", "model=tiny_qwen2", "dataset=commonsense6", "tracker=none", *bad],
                             run_dir=tmp_path / "r")
