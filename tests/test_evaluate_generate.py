"""stage=evaluate eval.method=generate: free generation with text metrics on instruction data (base and an
adapter on one loaded base), and the lettered-options meaning on multiple-choice data."""

import csv
import json

import pytest

from loragen.errors import ConfigError
from loragen.evaluation import generation as gen_mod
from tests.conftest import run_stage_in_process
from tests.test_evaluate import random_adapter

ROWS_EN = [
    {"instruction": "Name the capital of France.", "output": "Paris"},
    {"instruction": "Translate to German.", "input": "good morning", "output": "guten Morgen"},
    {"prompt": "Describe the picture: a cat on a mat.", "target": "A cat sits on a mat."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
ROWS_ZH = [
    {"instruction": "北京是哪个国家的首都？", "output": "中国"},
    {"instruction": "把下面的句子翻译成中文。", "input": "I love cats.", "output": "我爱猫。"},
    {"prompt": "描述图片：草地上的一只狗。", "target": "一只狗在草地上奔跑。"},
]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def instruction_args(data, run, *extra):
    return ["stage=evaluate", "model=tiny_qwen2", "dataset=instruction", f"dataset.file={data}", "dataset.val_ratio=0",
            "eval.split=train", "eval.method=generate", "eval.generation.max_new_tokens=6", "eval.batch_size=3",
            "tracker=none", f"hydra.run.dir={run}", *extra]


def read_samples(run):
    return [json.loads(line) for line in (run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def test_base_and_adapter_on_instruction_data(paths, tmp_path):
    data = jsonl(tmp_path / "inst.jsonl", ROWS_EN)
    ad = random_adapter(paths, "tiny_qwen2", tmp_path / "my_adapter")
    run = tmp_path / "ev"
    res = run_stage_in_process(instruction_args(data, run, f"eval.adapters=[{ad}]"), run_dir=run)
    entries = res["results"]
    assert [e["label"] for e in entries] == ["base", "my_adapter"]
    for e in entries:
        assert e["dataset"] == "instruction" and e["split"] == "train" and e["n"] == len(ROWS_EN)
        assert "acc" not in e and e["language"] == "en" and e["bleu_tokenize"] == "13a"
        assert e["embed_sim_english_only"] is False
        assert 0 <= e["bleu"] <= 100 and 0 <= e["rouge_l"] <= 1 and 0 <= e["success_rate"] <= 1
        assert 0 < e["gen_tokens"] <= 6 and e["gen_seconds"] > 0
    samples = read_samples(run)
    assert len(samples) == 2 * len(ROWS_EN)
    base = [s for s in samples if s["label"] == "base"]
    assert [s["reference"] for s in base] == ["Paris", "guten Morgen", "A cat sits on a mat.", "5"]
    assert base[1]["prompt"] == "Translate to German.\n\ngood morning"
    for label, e in zip(["base", "my_adapter"], entries):  # corpus metrics agree with the per-document rows
        rows = [s for s in samples if s["label"] == label]
        assert e["rouge_l"] == pytest.approx(sum(s["rouge_l"] for s in rows) / len(rows))
        assert e["gen_tokens"] == pytest.approx(sum(s["tokens"] for s in rows) / len(rows))
        assert all(s["tokens"] <= 6 and (s["terminated"] or s["tokens"] == 6) for s in rows)
    md = (run / "results.md").read_text(encoding="utf-8")
    assert "## generation: instruction (train, n=4, language en)" in md and "| my_adapter |" in md
    assert "English-only" not in md
    header = next(csv.reader((run / "results.csv").open()))
    assert "bleu" in header and "rouge_l" in header and "acc" not in header

    again = tmp_path / "ev2"  # greedy decoding is deterministic
    run_stage_in_process(instruction_args(data, again, f"eval.adapters=[{ad}]"), run_dir=again)
    assert [s["output"] for s in read_samples(again)] == [s["output"] for s in samples]


def test_chinese_instruction_data_is_scored_as_chinese(tmp_path):
    data = jsonl(tmp_path / "zh.jsonl", ROWS_ZH)
    run = tmp_path / "ev"
    res = run_stage_in_process(instruction_args(data, run, "dataset.language=zh"), run_dir=run)
    (e,) = res["results"]
    assert e["language"] == "zh" and e["bleu_tokenize"] == "zh" and e["embed_sim_english_only"] is True
    samples = read_samples(run)
    assert [s["reference"] for s in samples] == ["中国", "我爱猫。", "一只狗在草地上奔跑。"]  # UTF-8 round trip
    assert "all-MiniLM-L6-v2 is an English-only model" in (run / "results.md").read_text(encoding="utf-8")
    raw = (run / "samples.jsonl").read_text(encoding="utf-8")
    assert "一只狗在草地上奔跑。" in raw  # written as text, not \u escapes


@pytest.mark.parametrize("extra,match", [
    (["eval.method=loglikelihood"], "use eval.method=generate"),
    (["eval.num_fewshot=2"], "eval.num_fewshot=2 applies to multiple-choice data only"),
    (["eval.apply_chat_template=true"], "eval.generation.chat_template"),
    (["eval.generation.top_p=0"], "top_p"),
    (["model=minilm"], "needs a causal or seq2seq LM"),
])
def test_bad_settings_on_instruction_data(tmp_path, extra, match):
    data = jsonl(tmp_path / "inst.jsonl", ROWS_EN)
    replaced = {x.split("=")[0] for x in extra}
    args = [a for a in instruction_args(data, tmp_path / "ev") if a.split("=")[0] not in replaced] + extra
    with pytest.raises(ConfigError, match=match):
        run_stage_in_process(args, run_dir=tmp_path / "ev")


def test_multiple_choice_generate_keeps_lettered_options(tmp_path, monkeypatch):
    seen = []
    real = gen_mod.generate_texts

    def spy(model, tokenizer, prompts, **kw):
        seen.append((prompts, kw))
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(gen_mod, "generate_texts", spy)
    run = tmp_path / "mc"
    res = run_stage_in_process(["stage=evaluate", "model=tiny_qwen2", "dataset=arc_easy", "eval.limit=3",
                                "eval.method=generate", "eval.generation.letter_max_new_tokens=2", "tracker=none",
                                f"hydra.run.dir={run}"], run_dir=run)
    (e,) = res["results"]
    assert e["n"] == 3 and 0 <= e["acc"] <= 1 and 0 <= e["unparseable"] <= 3
    prompts, kw = seen[0]
    assert kw["max_new_tokens"] == 2 and kw["do_sample"] is False and kw["kind"] == "causal"
    assert prompts[0].endswith("\nAnswer:") and "\nA. " in prompts[0]
    assert all(s["pred"] in (-1, 0, 1, 2, 3, 4) for s in read_samples(run))
    assert "## acc" in (run / "results.md").read_text()


@pytest.mark.slow
def test_two_process_generation_equals_one(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, run_cli

    data = jsonl(tmp_path / "inst.jsonl", ROWS_EN + ROWS_ZH)
    args = [a for a in instruction_args(data, tmp_path / "one") if not a.startswith("hydra.run.dir")]
    run_cli(args + [f"hydra.run.dir={tmp_path / 'one'}"])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "loragen", *args,
                           "hardware.num_processes=2", f"hydra.run.dir={tmp_path / 'two'}"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_samples(tmp_path / "one"), read_samples(tmp_path / "two")
    assert [(s["id"], s["output"], s["tokens"]) for s in one] == [(s["id"], s["output"], s["tokens"]) for s in two]
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())["results"][0]
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())["results"][0]
    assert {k: r1[k] for k in ("n", "bleu", "rouge_l", "exact_match")} == {k: r2[k] for k in ("n", "bleu", "rouge_l", "exact_match")}
