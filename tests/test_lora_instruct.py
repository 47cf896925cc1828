"""stage=lora on prompt -> text data (converted ARC-Easy) with tiny_t5 and tiny_qwen2, and best/ on multiple choice."""

import json

import pytest
from omegaconf import OmegaConf
from peft import PeftModel

from loragen.errors import ConfigError
from loragen.models import load_model
from tests.conftest import CONF, run_cli, run_stage_in_process

TINY = ["stage=lora", "dataset=arc_easy_instruct", "hardware=cpu", "tracker=none", "train.per_device_batch=4",
        "train.lr=5e-3", "lora.train_limit=64", "lora.eval_limit=8", "lora.final_eval_limit=16", "ckpt.every=0",
        "lora.generation.max_new_tokens=16"]
TEXT_METRICS = {"bleu", "rouge_l", "exact_match", "embed_sim", "success_rate", "gen_seconds", "gen_tokens", "loss"}


def test_instruction_data_on_an_encoder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="prompt -> text .* causal or seq2seq models; this model is 'encoder'"):
        run_stage_in_process([*TINY, "model=minilm", "lora.target_modules=[query]", "train.max_steps=1"], tmp_path)


def best_step(history: list[dict], key: str, mode: str) -> int:
    """The first evaluated step with the best value (ties keep the earlier one)."""
    rows = [h for h in history if key in h]
    values = [h[key] for h in rows]
    target = max(values) if mode == "max" else min(values)
    return next(h["step"] for h in rows if h[key] == target)


def check_text_run(out, model_name: str, task_type: str, metric: str, mode: str):
    res = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in res["results"]}
    assert {"base", "final"} <= set(rows) <= {"base", "final", "best"}
    for r in rows.values():
        assert (r["model"], r["dataset"], r["split"], r["n"]) == (model_name, "arc_easy_instruct", "test", 16)
        assert TEXT_METRICS <= set(r) and 0 <= r["rouge_l"] <= 1 and 0 <= r["bleu"] <= 100 and r["loss"] > 0
    assert rows["final"]["loss"] < rows["base"]["loss"]  # training lowered the validation loss per target token
    md = (out / "results.md").read_text()
    assert "## generation: arc_easy_instruct (test, n=16, language en)" in md and "| final |" in md
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len([s for s in samples if s["label"] == "final"]) == 16 and all("output" in s and "reference" in s for s in samples)
    history = json.loads((out / "state" / "trainer.json").read_text())["history"]
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == metric and best["mode"] == mode
    assert best["step"] == best_step(history, f"eval_{metric}", mode)
    assert json.loads((out / "best" / "adapter_config.json").read_text())["task_type"] == task_type
    return history, best


@pytest.mark.slow
def test_tiny_t5_trains_on_arc_easy_instructions_keeping_the_best_bleu(tmp_path, paths):
    out = tmp_path / "t5"
    run_cli([*TINY, "model=tiny_t5", "train.max_steps=8", "train.eval_every=4", "ckpt.best_metric=bleu",
             f"hydra.run.dir={out}"])
    history, best = check_text_run(out, "tiny_t5", "SEQ_2_SEQ_LM", "bleu", "max")
    assert [h["step"] for h in history if "eval_bleu" in h] == [4, 8]
    assert {"eval_loss", "eval_rouge_l", "eval_exact_match", "eval_success_rate"} <= set(history[0])
    base = load_model(OmegaConf.load(CONF / "model" / "tiny_t5.yaml"), paths).model
    PeftModel.from_pretrained(base, out / "best")  # a standard PEFT dir for the seq2seq base


@pytest.mark.slow
def test_tiny_qwen2_trains_on_arc_easy_instructions_keeping_the_best_loss(tmp_path):
    out = tmp_path / "qwen"
    run_cli([*TINY, "model=tiny_qwen2", "train.max_steps=8", "train.eval_every=2", "ckpt.best_metric=loss",
             "lora.eval_generate=false", f"hydra.run.dir={out}"])
    history, _ = check_text_run(out, "tiny_qwen2", "CAUSAL_LM", "loss", "min")
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6, 8] and not any("eval_bleu" in h for h in evals)  # loss only


@pytest.mark.slow
def test_best_checkpoint_by_accuracy_on_multiple_choice(tmp_path):
    out = tmp_path / "mc"
    result = run_stage_in_process(["stage=lora", "model=tiny_qwen2", "dataset=arc_easy", "tracker=none",
                                   "train.per_device_batch=4", "train.lr=5e-3", "lora.train_limit=40", "lora.r=4",
                                   "train.max_steps=6", "train.eval_every=2", "lora.eval_limit=16",
                                   "lora.final_eval_limit=16", "ckpt.every=0", "ckpt.best_metric=acc"], out)
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == best_step(result["history"], "eval_acc", "max") and best["metric"] == "acc"
    labels = [r["label"] for r in result["results"]]
    assert labels == (["base", "final"] if best["step"] == 6 else ["base", "final", "best"])
