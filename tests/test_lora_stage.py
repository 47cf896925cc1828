"""stage=lora end to end on tiny_qwen2: trajectories, final adapter, results.json, and its bad-input errors."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file

from loragen.errors import CheckpointError, ConfigError, DataError
from loragen.models import load_model
from loragen.train.checkpoints import Checkpointer
from tests.conftest import CONF, run_cli, run_stage_in_process

TINY = ["stage=lora", "model=tiny_qwen2", "dataset=arc_easy", "tracker=none", "train.per_device_batch=4",
        "train.lr=5e-3", "lora.train_limit=40", "lora.final_eval_limit=20", "lora.r=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    run_cli([*TINY, "train.max_steps=5", "ckpt.every=1", "ckpt.start_step=2", "ckpt.keep_last=2",
             "train.eval_every=5", "lora.eval_limit=8", f"hydra.run.dir={out}"])
    return out


def test_checkpoint_schedule():
    c = Checkpointer("/nonexistent", lambda p: None, every=10)
    assert [s for s in range(1, 31) if c.due(s)] == [10, 20, 30]
    c = Checkpointer("/nonexistent", lambda p: None, every=1, start_step=50)
    assert [s for s in range(1, 101) if c.due(s)] == list(range(51, 101))  # 50 consecutive after warm-up
    with pytest.raises(ConfigError, match="ckpt.keep_last=0"):
        Checkpointer("/x", lambda p: None, every=1, keep_last=0)


def test_trajectory_names_count_and_manifest(trained):
    ckpts = sorted(p.name for p in (trained / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-000004", "step-000005"]  # steps 3..5 saved, keep_last=2 pruned step 3
    manifest = json.loads((trained / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert [(e["step"], e["path"]) for e in manifest] == [(4, "step-000004"), (5, "step-000005")]
    assert all(e["loss"] > 0 and e["lr"] > 0 for e in manifest) and 0 <= manifest[-1]["eval_acc"] <= 1
    assert not [p for p in (trained / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers
    final, last = (load_file(str(trained / d / "adapter_model.safetensors")) for d in ("final", "checkpoints/step-000005"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert {k.split(".")[-3] for k in final} == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"}


def test_every_checkpoint_loads_with_peft_and_changes_outputs(trained, paths):
    cfg = OmegaConf.load(CONF / "model" / "tiny_qwen2.yaml")
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    with torch.no_grad():
        base_logits = load_model(cfg, paths).model(ids).logits
        for d in ["checkpoints/step-000004", "checkpoints/step-000005", "final"]:
            model = PeftModel.from_pretrained(load_model(cfg, paths).model, trained / d).eval()
            assert (model(ids).logits - base_logits).abs().max() > 1e-4, d


def test_results_json_follows_the_shared_schema(trained):
    res = json.loads((trained / "results.json").read_text())
    rows = {r["label"]: r for r in res["results"]}
    assert set(rows) == {"base", "final"}
    assert rows["final"]["adapter_path"] == str(trained / "final") and rows["base"]["adapter_path"] is None
    for r in rows.values():
        assert (r["model"], r["dataset"], r["split"], r["n"]) == ("tiny_qwen2", "arc_easy", "test", 20)
        assert 0 <= r["acc"] <= 1 and r["acc_stderr"] >= 0 and r["seconds"] >= 0
    assert {"git_sha", "versions", "data_sha256", "seed", "config"} <= set(res["provenance"])
    assert (trained / "samples.jsonl").is_file() and (trained / "state" / "trainer.json").is_file()


def run_in_process(overrides: list[str], out):
    return run_stage_in_process(overrides, out)


def test_resume_from_another_config_is_refused(trained):
    with pytest.raises(CheckpointError, match=r"refusing to resume .* train.lr: 0.005 \(saved\) vs 0.001 \(now\)"):
        run_in_process([*TINY, "train.max_steps=5", "train.lr=1e-3"], trained)


def test_bad_target_module_is_a_one_line_cli_error(tmp_path):
    proc = run_cli([*TINY, "train.max_steps=2", "lora.target_modules=[q_proj,nope]", f"hydra.run.dir={tmp_path}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("lora.target_modules ['nope'] match no module of the model; its linear modules are "
            "['lm_head', 'mlp.down_proj', 'mlp.gate_proj'") in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,error,message", [
    ("lora.train_limit=3", DataError, r"dataset arc_easy split 'train' has 3 documents, fewer than one global batch of 4"),
    ("dataset=commonsense", ConfigError, "stage=lora trains on one dataset; dataset=commonsense has 7"),
    ("train.resume=maybe", ConfigError, r"train.resume='maybe'; expected one of \('auto', 'never'\)"),
])
def test_bad_input_errors(tmp_path, override, error, message):
    with pytest.raises(error, match=message):
        run_in_process([*TINY, "train.max_steps=2", override], tmp_path)


@pytest.mark.slow
def test_quick_preset_trains_minilm_offline(tmp_path):
    """The issue's CPU preset end to end (minutes): trains, writes final/ and base + final results on ARC-Easy test."""
    run_cli(["stage=lora", "experiment=quick", "tracker=none", f"hydra.run.dir={tmp_path}"], timeout=3600)
    rows = {r["label"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["base"]["n"] == rows["final"]["n"] == 2376 and rows["final"]["split"] == "test"
    assert 0.45 < rows["base"]["acc"] < 0.60  # MiniLM zero-shot on ARC-Easy
    ckpts = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert [c["step"] for c in ckpts] == list(range(10, 101, 10))
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    base_pred = {s["id"]: s["pred"] for s in samples if s["label"] == "base"}
    assert sum(s["pred"] != base_pred[s["id"]] for s in samples if s["label"] == "final") > 20  # the adapter acts


def test_base_dropout_off_makes_minilm_training_forward_deterministic(paths):
    from loragen.stages.lora import disable_dropout

    lm = load_model(OmegaConf.load(CONF / "model" / "minilm.yaml"), paths)
    enc = lm.tokenizer(["a question about rocks"], return_tensors="pt")
    lm.model.train()
    torch.manual_seed(0)
    a = lm.model(**enc).last_hidden_state
    b = lm.model(**enc).last_hidden_state
    assert not torch.allclose(a, b)  # MiniLM's own dropout (0.1) is active in train mode
    # BERT's 6 layers: attention-probs, attention-output and output dropouts each, plus the embeddings'
    assert disable_dropout(lm.model) == 6 * 3 + 1
    with torch.no_grad():
        lm.model.eval()
        ref = lm.model(**enc).last_hidden_state
    lm.model.train()
    assert torch.equal(lm.model(**enc).last_hidden_state, lm.model(**enc).last_hidden_state)
    assert torch.allclose(lm.model(**enc).last_hidden_state, ref, atol=1e-6)
