"""The generator's baselines and its training pairs, checked against numbers computed by hand."""

import pytest
import torch

from loragen.errors import ConfigError
from loragen.generator import baselines as bl
from loragen.generator.tasks import PairSamples, Task, prompt_batches
from loragen.lora.adapter_io import Adapter
from loragen.lora.tokenize import TokenSet

P = "base_model.model.layer.0.q"


def adapter(a: float, b: float, alpha: int = 2) -> Adapter:
    return Adapter({"r": 1, "lora_alpha": alpha, "target_modules": ["q"]},
                   {f"{P}.lora_A.weight": torch.full((1, 2), a), f"{P}.lora_B.weight": torch.full((2, 1), b)})


def test_weight_average_averages_a_and_b_separately():
    avg = bl.weight_average([adapter(1.0, 2.0), adapter(3.0, 4.0)])
    assert torch.equal(avg.tensors[f"{P}.lora_A.weight"], torch.full((1, 2), 2.0))
    assert torch.equal(avg.tensors[f"{P}.lora_B.weight"], torch.full((2, 1), 3.0))


def test_relative_error_in_weight_space():
    ref = adapter(1.0, 1.0)  # dW = 2 * ones(2, 2)
    assert bl.relative_error(ref, ref) == 0.0
    assert bl.relative_error(adapter(1.0, 0.5), ref) == pytest.approx(0.5)  # dW = 1 * ones
    assert bl.relative_error(adapter(0.0, 0.0), ref) == pytest.approx(1.0)


def test_nearest_by_prompts():
    name, cos = bl.nearest_by_prompts(torch.tensor([1.0, 0.0]), {"a": torch.tensor([0.0, 1.0]),
                                                                  "b": torch.tensor([1.0, 1.0])})
    assert name == "b" and cos["a"] == pytest.approx(0.0) and cos["b"] == pytest.approx(2**-0.5)


def _task(name: str, value: float, prompts: int) -> Task:
    tokens = torch.full((3, 2, 1, 1), value) + torch.arange(3.0).view(3, 1, 1, 1)
    ts = TokenSet(tokens, None, torch.ones(2, 1, 1, dtype=torch.bool), torch.ones(2), [0, 1, 2], [])
    states = torch.full((prompts, 2, 1), value, dtype=torch.float16) + torch.arange(float(prompts)).view(-1, 1, 1).half()
    return Task(name, ts, [f"{name} {i}" for i in range(prompts)], states, "train", "<mem>")


def test_pairs_come_from_one_task_and_are_reproducible():
    samples = PairSamples([_task("a", 0.0, 6), _task("b", 100.0, 6)], num_prompts=4, seed=1)
    for i in range(20):
        s = samples[i]
        from_b = s["target"][0, 0, 0] >= 100
        assert bool((s["cond"][:, 0, 0] >= 100).all()) == bool(from_b)  # prompts and checkpoint of the same task
        assert len(set(s["cond"][:, 0, 0].tolist())) == 4  # 4 distinct prompts out of 6
        assert torch.equal(samples[i]["cond"], s["cond"])  # item i is a pure function of (seed, i)
    assert {bool(samples[i]["target"][0, 0, 0] >= 100) for i in range(20)} == {True, False}


def test_too_few_prompts_sample_with_replacement_or_refuse():
    idx = prompt_batches(2, 5, count=3, seed=0)
    assert len(idx) == 3 and all(len(i) == 5 and set(i.tolist()) <= {0, 1} for i in idx)
    with pytest.raises(ConfigError, match="my prompts has 2 prompts but the generator takes 5"):
        prompt_batches(2, 5, count=1, seed=0, strict=True, what="my prompts")


def test_a_baseline_lora_is_the_trained_checkpoint_itself_while_its_file_holds_the_tokenized_tensors(tmp_path, caplog):
    import shutil

    from loragen.bench.tokenize import MODULES, random_qwen_adapter
    from loragen.lora.adapter_io import read_adapter, write_adapter
    from loragen.lora.tokenize import detokenize, tokenize_checkpoints
    from loragen.stages.generator import final_lora

    for i in range(3):
        write_adapter(tmp_path / f"step-{i + 1:06d}", random_qwen_adapter(i, layers=1))
    ts = tokenize_checkpoints(tmp_path, modules=MODULES)
    task = Task("arc_easy", ts, [], torch.zeros(0, 1, 1), "train", str(tmp_path))
    last = read_adapter(tmp_path / "step-000003")
    detok = detokenize(ts.tokens[-1], ts.layout)
    assert any(not torch.equal(detok.tensors[k], last.tensors[k]) for k in last.tensors)  # rounding: not the same
    got = final_lora(task, ts.layout)
    assert all(torch.equal(got.tensors[k], last.tensors[k]) for k in last.tensors)  # the file, bit for bit
    shutil.rmtree(tmp_path / "step-000003")
    write_adapter(tmp_path / "step-000003", random_qwen_adapter(7, layers=1))  # rerun elsewhere: another LoRA there
    got = final_lora(task, ts.layout)
    assert all(torch.equal(got.tensors[k], detok.tensors[k]) for k in detok.tensors)
    assert "no longer holds the tensors of its token set" in caplog.text
    shutil.rmtree(tmp_path / "step-000003")  # gone: its tokens detokenized
    got = final_lora(task, ts.layout)
    assert all(torch.equal(got.tensors[k], detok.tensors[k]) for k in detok.tensors)
