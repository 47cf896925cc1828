"""The scorer: log-likelihoods checked against independent computations, metrics, adapters, CLI."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel, get_peft_model_state_dict

from loragen.data.records import MCRecord
from loragen.errors import CheckpointError
from loragen.evaluation import evaluate_records
from loragen.evaluation.adapters import AdapterSwitcher, check_adapter
from loragen.evaluation.metrics import mean_stderr
from loragen.lora.adapter_io import write_adapter
from loragen.lora.init import attach_lora
from loragen.models import load_model
from tests.conftest import CONF, ROOT, run_cli


def mcfg(name):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


def tiny(paths, name="tiny_qwen2"):
    return load_model(mcfg(name), paths)


class UnigramLM(torch.nn.Module):
    """Every position predicts the same distribution softmax(bias): log p(cont) = sum of log_softmax(bias)[t]."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3)
        self.config = SimpleNamespace(max_position_embeddings=512)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def mc(ctx, choices, gold, rid="d"):
    return MCRecord(rid, (ctx,), tuple(" " + c for c in choices), tuple(choices), gold, ctx)


def independent_logprob(model, tok, ctx, cont):
    """Score one pair with no batching, straight from the definition."""
    n = len(ctx) - len(ctx.rstrip())
    if n:
        ctx, cont = ctx[:-n], ctx[-n:] + cont
    whole = tok(ctx + cont)["input_ids"]
    ctx_ids = tok(ctx)["input_ids"]
    cont_ids = whole[len(ctx_ids):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[len(whole) - 1 - len(cont_ids) + j, t]) for j, t in enumerate(cont_ids))


def test_acc_and_acc_norm_on_a_known_distribution(paths):
    tok = tiny(paths).tokenizer
    model = UnigramLM(len(tok))
    logp = torch.log_softmax(model.bias.detach().double(), -1)
    recs = [
        mc("Question: which?\nAnswer:", ["the box", "a very long answer here", "yes"], 0, "a"),
        mc("The cat sat on the", ["mat", "table top"], 1, "b"),
        mc("Trailing space ", ["x", "yy"], 1, "c"),
    ]
    out = evaluate_records(model, tok, "causal", recs, batch_size=2)
    for rec, s in zip(recs, out.samples):
        for k, (ctx, cont) in enumerate(rec.requests()):
            n = len(ctx) - len(ctx.rstrip())
            c2, x2 = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
            ids = tok(c2 + x2)["input_ids"][len(tok(c2)["input_ids"]):]
            assert s["scores"][k] == pytest.approx(float(logp[ids].sum()), abs=1e-4)
    preds = [max(range(len(s["scores"])), key=lambda k: s["scores"][k]) for s in out.samples]
    norm_preds = [max(range(len(s["scores"])), key=lambda k: s["scores"][k] / len(r.choices[k])) for s, r in zip(out.samples, recs)]
    assert out.acc == pytest.approx(sum(p == r.gold for p, r in zip(preds, recs)) / 3)
    assert out.acc_norm == pytest.approx(sum(p == r.gold for p, r in zip(norm_preds, recs)) / 3)
    # Summed log-likelihood favours the short choice; per character the long one can win.
    assert out.samples[0]["pred"] in (0, 2)
    assert out.acc_stderr == pytest.approx(mean_stderr([s["acc"] for s in out.samples]))


def test_acc_norm_divides_by_characters_of_the_choice():
    class Tok:  # one token per character
        pad_token_id = 0

        def __call__(self, texts):
            one = isinstance(texts, str)
            ids = [[ord(ch) % 50 + 1 for ch in t] for t in ([texts] if one else texts)]
            return {"input_ids": ids[0] if one else ids}

    model = UnigramLM(64, seed=3)
    with torch.no_grad():
        model.bias.zero_()  # uniform: log p = -len * log 64 for every continuation token
    rec = mc("Q:", ["aa", "bbbbbb"], 1)
    out = evaluate_records(model, Tok(), "causal", [rec], batch_size=4)
    assert out.samples[0]["scores"] == pytest.approx([-3 * math.log(64), -7 * math.log(64)])
    assert out.samples[0]["pred"] == 0 and out.acc == 0.0
    # Per character of the choice text without the leading space: -3/2 vs -7/6 log 64 -> choice 1.
    assert out.samples[0]["pred_norm"] == 1 and out.acc_norm == 1.0


def test_tiny_model_scores_equal_an_unbatched_loop(paths):
    lm = tiny(paths)
    recs = [
        mc("Question: What is heavier, a rock or a feather?\nAnswer:", ["a rock", "a feather", "both"], 0, "1"),
        mc("Energy from the sun", ["is stored by plants.", "goes away"], 0, "2"),
        MCRecord("3", ("Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"),
                 (" got the easy cases.",) * 2, ("got the easy cases.",) * 2, 1, "s"),  # winogrande partial scoring
    ]
    out = evaluate_records(lm.model, lm.tokenizer, "causal", recs, batch_size=3)
    for rec, s in zip(recs, out.samples):
        ref = [independent_logprob(lm.model, lm.tokenizer, c, x) for c, x in rec.requests()]
        assert s["scores"] == pytest.approx(ref, abs=1e-4)
    wino = out.samples[2]["scores"]
    assert wino[0] != pytest.approx(wino[1])  # the contexts differ, the continuation is shared


def random_adapter(paths, name, path, seed=1, targets=("q_proj", "v_proj")):
    pm = attach_lora(tiny(paths, name).model, r=4, alpha=8, dropout=0.0, target_modules=list(targets), init_seed=0)
    g = torch.Generator().manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    write_adapter(path, config=pm.peft_config["default"].to_dict(), tensors=get_peft_model_state_dict(pm))
    return path


def test_adapter_swapping_equals_fresh_loads(paths, tmp_path):
    a1 = random_adapter(paths, "tiny_qwen2", tmp_path / "a1", seed=1)
    a2 = random_adapter(paths, "tiny_qwen2", tmp_path / "a2", seed=2)
    recs = [mc(f"Question: item {i} is?\nAnswer:", ["red", "blue green", "a large yellow"], i % 3, str(i)) for i in range(12)]
    lm = tiny(paths)
    sw = AdapterSwitcher(lm.model)
    swapped = {}
    for label, path in [("base", None), ("a1", a1), ("a2", a2), ("base2", None)]:
        swapped[label] = [x for s in evaluate_records(sw.use(path), lm.tokenizer, "causal", recs, batch_size=8).samples for x in s["scores"]]
    fresh = {"base": tiny(paths).model,
             "a1": PeftModel.from_pretrained(tiny(paths).model, str(a1)).eval(),
             "a2": PeftModel.from_pretrained(tiny(paths).model, str(a2)).eval()}
    for label, model in fresh.items():
        ref = [x for s in evaluate_records(model, lm.tokenizer, "causal", recs, batch_size=8).samples for x in s["scores"]]
        assert swapped[label] == pytest.approx(ref, abs=1e-5), label
    assert swapped["base2"] == pytest.approx(swapped["base"], abs=1e-6)
    assert swapped["a1"] != pytest.approx(swapped["base"], abs=1e-3)
    assert swapped["a1"] != pytest.approx(swapped["a2"], abs=1e-3)


def test_mismatched_and_non_adapters_are_refused(paths, tmp_path):
    lm = tiny(paths)
    g = random_adapter(paths, "tiny_gemma2", tmp_path / "gemma_ad")
    with pytest.raises(CheckpointError, match=r"adapter .*gemma_ad: module 'model.layers.0.self_attn.q_proj': lora_A \(4, 48\) "
                                               r"and lora_B \(48, 4\) do not fit the base weight \(64, 64\)"):
        check_adapter(lm.model, g)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a PEFT adapter directory"):
        check_adapter(lm.model, tmp_path / "empty")


def test_cli_minilm_and_bad_split(tmp_path):
    run = tmp_path / "ev"
    run_cli(["stage=evaluate", "model=minilm", "dataset=arc_easy", "eval.split=test", "eval.limit=60", f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    (entry,) = res["results"]
    assert entry["label"] == "base" and entry["n"] == 60 and entry["split"] == "test" and entry["acc_norm"] is None
    assert 0.25 < entry["acc"] < 0.8
    assert set(res["provenance"]) >= {"git_sha", "versions", "data_sha256", "seed", "config"}
    assert len(res["provenance"]["data_sha256"]["arc_easy"]) == 64
    assert (res["provenance"]["device"], res["provenance"]["dtype"]) == ("cpu", "float32")  # hardware=cpu: fp32
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 60 and sum(s["acc"] for s in samples) / 60 == pytest.approx(entry["acc"])
    assert f"{entry['acc']:.4f}" in (run / "results.md").read_text()
    proc = run_cli(["stage=evaluate", "model=minilm", "dataset=boolq", "eval.split=test", f"hydra.run.dir={tmp_path / 'b'}"], check=False)
    assert proc.returncode == 2 and "available splits: ['validation']" in proc.stderr


def test_two_process_evaluation_is_identical(tmp_path, paths):
    ad = random_adapter(paths, "tiny_qwen2", tmp_path / "ad")
    common = ["stage=evaluate", "model=tiny_qwen2", "dataset=arc_challenge", "eval.limit=30", f"eval.adapters=[{ad}]",
              "eval.batch_size=16"]
    run_cli(common + [f"hydra.run.dir={tmp_path / 'one'}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "loragen", *common,
                           "hardware.num_processes=2", f"hydra.run.dir={tmp_path / 'two'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["provenance"]["world_size"], two["provenance"]["world_size"]) == (1, 2)
    one, two = one["results"], two["results"]
    assert [(e["label"], e["acc"], e["acc_norm"], e["n"]) for e in one] == [(e["label"], e["acc"], e["acc_norm"], e["n"]) for e in two]
    s1 = [json.loads(x) for x in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()]
    s2 = [json.loads(x) for x in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in s1] == [s["id"] for s in s2]
    assert [x for s in s1 for x in s["scores"]] == pytest.approx([x for s in s2 for x in s["scores"]], abs=1e-4)


def test_empty_continuation_is_a_clear_error(paths):
    from loragen.errors import DataError

    lm = tiny(paths)
    rec = MCRecord("e", ("Question: x?\nAnswer:",), (" yes", ""), ("yes", ""), 0, "q")
    with pytest.raises(DataError, match=r"continuation '' tokenizes to nothing after context .*Answer:'; every choice"):
        evaluate_records(lm.model, lm.tokenizer, "causal", [rec], batch_size=4)


def test_an_adapter_listed_twice_is_scored_once_with_the_scores_it_gets_alone(tmp_path, paths):
    import shutil

    a1 = random_adapter(paths, "tiny_qwen2", tmp_path / "a1", seed=1)
    shutil.copytree(a1, tmp_path / "copy")  # e.g. the nearest-prompt baseline: a training dataset's LoRA itself
    a2 = random_adapter(paths, "tiny_qwen2", tmp_path / "a2", seed=2)
    common = ["stage=evaluate", "model=tiny_qwen2", "dataset=arc_challenge", "eval.limit=20", "eval.include_base=false"]
    proc = run_cli(common + [f"eval.adapters={{a1:{a1},copy:{tmp_path / 'copy'},a2:{a2}}}",
                             f"hydra.run.dir={tmp_path / 'all'}"])
    assert "copy: the same adapter (config and weights) as a1; its scores are reused" in proc.stdout + proc.stderr
    run_cli(common + [f"eval.adapters={{copy:{tmp_path / 'copy'}}}", f"hydra.run.dir={tmp_path / 'alone'}"])

    def scores(run, label):
        rows = [json.loads(x) for x in (tmp_path / run / "samples.jsonl").read_text().splitlines()]
        return [(r["id"], r["scores"]) for r in rows if r["label"] == label]

    entries = {e["label"]: e for e in json.loads((tmp_path / "all" / "results.json").read_text())["results"]}
    assert entries["copy"]["same_as"] == "a1" and "same_as" not in entries["a2"]
    assert len(scores("all", "copy")) == 20 and scores("all", "copy") == scores("alone", "copy")
    assert scores("all", "a2") != scores("all", "a1")  # different weights: scored on their own
