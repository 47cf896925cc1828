"""The generator's task objective: differentiable detokenize + functional LoRA = stage=lora's objective."""

import json
from pathlib import Path

import pytest
import torch

from loragen.data import dataset_specs, load_split
from loragen.generator.task_objective import FunctionalLoRA
from loragen.lora.adapter_io import Adapter
from loragen.lora.init import attach_lora
from loragen.lora.tokenize import detokenize, tokenize_adapters
from loragen.lora.tokenize.codec import decode_differentiable
from loragen.models import load_model
from loragen.models.hyperconv import HyperConvDecoder
from loragen.train.objectives import make_objective
from tests.conftest import compose
from tests.test_generator_generate import DATASETS, GEN, run_stage, write_token_dirs


def _setup(model_name: str, paths, r: int = 4):
    """A trained-looking LoRA (lora_B random, not zero) on `model_name`, its tokens, a labeled batch, objective."""
    cfg = compose([f"model={model_name}"])
    lm = load_model(cfg.model, paths, "fp32", "cpu")
    peft = attach_lora(lm.model, r=r, alpha=2.0 * r, dropout=0.0, target_modules=list(cfg.model.lora_targets),
                       init_seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft.eval()
    from peft import get_peft_model_state_dict

    adapter = Adapter(peft.peft_config["default"].to_dict(),
                      {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft).items()})
    tokens = tokenize_adapters([adapter], modules=list(cfg.model.linear_modules), scheme="dnd")
    spec = dataset_specs(compose(["dataset=arc_easy"]).dataset)[0]
    records = load_split(spec, "train[:8]", data_dir=paths.data_dir).records
    objective = make_objective(lm.kind, lm.tokenizer, max_length=512, temperature=0.05)
    return cfg, peft, tokens, objective.collate(records), objective


@pytest.mark.parametrize("model_name", ["minilm", "tiny_qwen2"])
def test_task_loss_of_a_loras_own_tokens_equals_stage_lora_objective(model_name, paths):
    cfg, peft, tokens, batch, objective = _setup(model_name, paths)
    with torch.no_grad():
        want, want_units = objective.loss(peft, batch)  # the PEFT model with the adapter, as stage=lora computes it
    fresh = load_model(cfg.model, paths, "fp32", "cpu")  # another copy of the base: its LoRA tensors are the init
    flora = FunctionalLoRA(fresh, tokens.layout, objective)
    got, units = flora.loss(tokens.tokens[0], batch)
    assert units == want_units
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    # and the init LoRA (lora_B zero) gives the base model's loss, i.e. a different number
    base, _ = flora.loss(flora.init_tokens(), batch)
    with torch.no_grad(), peft.disable_adapter():
        bare, _ = objective.loss(peft, batch)
    assert float(base) == pytest.approx(float(bare), rel=1e-5)
    assert abs(float(base) - float(want)) > 1e-3 * abs(float(want))


def test_differentiable_decode_equals_detokenize_bit_for_bit(paths):
    _, _, tokens, _, _ = _setup("minilm", paths, r=2)
    exact = detokenize(tokens.tokens[0], tokens.layout).tensors
    t = tokens.tokens[0].clone().requires_grad_(True)
    diff = decode_differentiable(t, tokens.layout)
    assert set(diff) == set(exact)
    for k in exact:
        assert torch.equal(diff[k].detach(), exact[k]), k
    sum(v.sum() for v in diff.values()).backward()
    assert t.grad is not None and float(t.grad.abs().sum()) > 0


def test_task_gradient_reaches_every_generator_parameter_and_no_base_parameter_and_30_steps_lower_it(paths):
    cfg, peft, tokens, batch, objective = _setup("minilm", paths, r=2)
    flora = FunctionalLoRA(load_model(cfg.model, paths, "fp32", "cpu"), tokens.layout, objective)
    torch.manual_seed(0)
    shape = list(tokens.layout.shape)
    gen = HyperConvDecoder([[2, 8, 32], [8, 8, 32], shape], 3, base=flora.init_tokens())
    torch.nn.init.normal_(gen.layers[-1].channel_conv.weight, std=1e-3)  # zero-initialised: let every layer see a gradient
    cond = torch.randn(1, 2, 8, 32)
    loss, units = flora.loss(gen(cond)[0], batch)
    (loss / units).backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert all(p.grad is None for p in flora.peft.parameters())
    assert not any(p.requires_grad for p in flora.peft.parameters())

    opt = torch.optim.AdamW(gen.parameters(), lr=1e-3)
    first = float(loss.detach() / units)
    for _ in range(30):
        opt.zero_grad()
        loss, units = flora.loss(gen(cond)[0], batch)
        (loss / units).backward()
        opt.step()
    last = float(flora.loss(gen(cond)[0], batch)[0] / units)
    assert last < first - 0.05, (first, last)


def test_residual_base_with_zero_std_decodes_to_the_init_and_gives_lora_b_cells_a_gradient(paths):
    cfg, peft, tokens, batch, objective = _setup("minilm", paths, r=2)
    flora = FunctionalLoRA(load_model(cfg.model, paths, "fp32", "cpu"), tokens.layout, objective)
    floor, live = flora.init_tokens(), flora.init_tokens(zero_std=0.01)
    a, b = decode_differentiable(floor, tokens.layout), decode_differentiable(live, tokens.layout)
    for k in a:  # the same adapter: lora_A the seeded init, lora_B exactly zero
        assert torch.equal(a[k], b[k]), k
        if "lora_B" in k:
            assert float(b[k].abs().max()) == 0.0
    r, c = tokens.layout.rank, tokens.layout.chunk
    b_tokens = [t for s in tokens.layout.tensors if "lora_B" in s.name
                for t in range(s.first_token, s.first_token + s.num_tokens)]
    grads = {}
    for name, base in (("floor", floor), ("live", live)):
        t = base.clone().requires_grad_(True)
        loss, units = flora.loss(t, batch)
        (loss / units).backward()
        grads[name] = float(t.grad[b_tokens, 1 : r + 1, 1 : c + 1].abs().sum())
    # d lora_B / d cell = the chunk's std: 1e-8 at the floor, 0.01 with zero_std (a factor 1e6 in the gradient)
    assert grads["live"] > 0 and grads["floor"] < grads["live"] * 1e-5, grads


@pytest.fixture(scope="module")
def token_dirs(tmp_path_factory):
    return write_token_dirs(tmp_path_factory.mktemp("tokens"))


def _args(token_dirs, run, cache, extra=()):
    return ["stage=generator", "dataset=commonsense6", "tracker=none", f"hydra.run.dir={run}", f"paths.cache_dir={cache}",
            f"generator.datasets=[{','.join(DATASETS)}]", "generator.heldout=openbookqa",
            f"+generator.tokens.openbookqa={token_dirs['openbookqa']}", *GEN, "generator.residual=true",
            "train.max_steps=4", "train.eval_every=2", "train.per_device_batch=2", "train.log_every=1",
            "generator.eval_adapters=2", "generator.task.batch_size=4", *extra]


def test_stage_generator_task_objective_needs_only_one_token_set(token_dirs, tmp_path):
    out = run_stage(_args(token_dirs, tmp_path / "run", tmp_path / "cache", ["generator.objective=task"]))
    assert out["status"] == "completed" and out["objective"] == "task"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"] if "train_task_loss" in h] == [2, 4]
    assert all(h["loss"] > 0 for h in metrics["history"])
    held = metrics["heldout_eval"]["adapters"]
    assert set(held) == {"oracle", "generated"}  # no training trajectories: no average / nearest baselines
    assert (Path(held["generated"]["paths"][0]) / "adapter_model.safetensors").is_file()


def test_stage_generator_mix_and_description(token_dirs, tmp_path):
    args = _args(token_dirs, tmp_path / "run", tmp_path / "cache",
                 ["generator.objective=mix", "generator.condition=description", "loss.task_weight=0.5"]
                 + [f"+generator.tokens.{n}={token_dirs[n]}" for n in DATASETS if n != "openbookqa"])
    out = run_stage(args)
    assert out["condition"] == "description" and out["objective"] == "mix"
    meta = json.loads((tmp_path / "run" / "generator" / "generator.json").read_text())
    assert meta["prompt_splits"]["openbookqa"] == "description"
    prompts = json.loads((tmp_path / "run" / "generated" / "gen-000" / "prompts.json").read_text())["prompts"]
    descriptions = list(compose(["dataset=openbookqa"]).dataset.description)
    assert prompts and all(p in descriptions for p in prompts)

    # generation from a list of strings: no data at all; the adapter loads in PEFT and changes MiniLM's scores
    gen_run = tmp_path / "generate"
    run_stage(["stage=generate", "dataset=commonsense6", f"hydra.run.dir={gen_run}", f"paths.cache_dir={tmp_path / 'cache'}",
               f"generate.checkpoint={tmp_path / 'run'}", "generate.num_adapters=1", *GEN, "generator.residual=true",
               "generate.descriptions=['Answer grade-school science questions by picking the right option.']"])
    info = json.loads((gen_run / "adapters" / "gen-000" / "prompts.json").read_text())
    assert info["split"] == "description" and set(info["prompts"]) == {
        "Answer grade-school science questions by picking the right option."}
    _assert_changes_scores(gen_run / "adapters" / "gen-000", tmp_path)


def _assert_changes_scores(adapter_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from loragen.evaluation import evaluate_records

    cfg = compose(["model=minilm", "dataset=arc_easy"])
    lm = load_model(cfg.model, cfg.paths, "fp32", "cpu")
    records = load_split(dataset_specs(cfg.dataset)[0], "test[:6]", data_dir=cfg.paths.data_dir).records
    base = evaluate_records(lm.model, lm.tokenizer, lm.kind, records, batch_size=6).samples
    peft = PeftModel.from_pretrained(lm.model, str(adapter_dir))
    tuned = evaluate_records(peft, lm.tokenizer, lm.kind, records, batch_size=6).samples
    delta = max(abs(a - b) for s, t in zip(base, tuned) for a, b in zip(s["scores"], t["scores"]))
    assert delta > 1e-4, delta


def test_bad_objective_is_refused_before_anything_loads(token_dirs, tmp_path):
    from loragen.errors import ConfigError

    with pytest.raises(ConfigError, match="generator.objective='sft'"):
        run_stage(_args(token_dirs, tmp_path / "run", tmp_path / "cache", ["generator.objective=sft"]))


def test_layout_json_keeps_a_set_of_target_modules_a_list(tmp_path):
    """PEFT's to_dict() gives target_modules as a set; layout.json once wrote it as the string "{'query', 'value'}"."""
    from loragen.lora.tokenize import load_token_set, save_token_set

    a = Adapter({"r": 1, "lora_alpha": 1, "target_modules": {"value", "query"}, "peft_type": "LORA"},
                {"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.ones(1, 4),
                 "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": torch.ones(4, 1)})
    ts = save_token_set(tokenize_adapters([a], modules=["query", "value"], scheme="dnd", chunk=4), tmp_path / "t")
    assert load_token_set(ts).layout.adapter_config["target_modules"] == ["query", "value"]


def test_task_objective_two_processes_match_one_with_the_same_global_batch(token_dirs, tmp_path):
    """DDP (2 gloo processes, each its own labeled mini-batches) takes the same steps as one process with batch 2."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = ["stage=generator", "dataset=commonsense6", "tracker=none", f"paths.cache_dir={tmp_path / 'cache'}",
              f"generator.datasets=[{','.join(DATASETS)}]", "generator.heldout=null",
              f"+generator.tokens.openbookqa={token_dirs['openbookqa']}", *GEN, "generator.residual=true",
              "generator.objective=task", "train.max_steps=3", "train.eval_every=0", "generator.task.batch_size=4",
              "train.lr=1e-2"]
    runs = {2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "loragen", *common,
                "train.per_device_batch=1", f"hydra.run.dir={tmp_path / 'two'}"],
            1: [sys.executable, "-m", "loragen", *common, "train.per_device_batch=2", f"hydra.run.dir={tmp_path / 'one'}"]}
    for cmd in runs.values():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (load_file(str(tmp_path / d / "generator" / "model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    # Adam's first steps move every weight by about lr whatever its gradient's size, so the float noise of a
    # gradient near zero shows up at the 1e-5 level: 3 steps of lr 1e-2 move the weights by up to 3e-2
    assert all(torch.allclose(one[k], two[k], atol=2e-4, rtol=1e-3) for k in one)
    last = one["layers.1.channel_conv.weight"]  # zero-initialised (residual): it moved far beyond the tolerance
    assert float(last.abs().max()) > 2e-3
    l1, l2 = (json.loads((tmp_path / d / "metrics.json").read_text())["history"] for d in ("one", "two"))
    assert [h["loss"] for h in l1] == pytest.approx([h["loss"] for h in l2], rel=1e-5)


def test_task_objective_composes_for_qwen_on_a800():
    cfg = compose(["stage=generator", "model=qwen2.5-0.5b", "generator=dnd_qwen0.5b", "hardware=a800",
                   "generator.objective=task", "generator.condition=description"])
    assert cfg.generator.objective == "task" and cfg.generator.task.batch_size == 16
    assert cfg.generator.features[-1] == [4296, 10, 130] and cfg.hardware.precision == "bf16"
