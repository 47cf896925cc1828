"""stage=generate on synthetic MiniLM LoRA token sets (r=2 on query/value) and a saved, untrained generator.

The helpers here (synthetic token sets, in-process stage runs) are shared with test_generator_stage."""

import json
from pathlib import Path

import pytest
import torch

from loragen.errors import LoragenError
from loragen.lora.adapter_io import Adapter
from loragen.lora.tokenize import save_token_set, tokenize_adapters
from tests.conftest import compose, run_stage_in_process

DATASETS = ["arc_easy", "arc_challenge", "openbookqa"]
R, LAYERS, HIDDEN = 2, 6, 384
MODULES = ["query", "value"]
# 6 layers x 2 modules x (A + B^T) of 384 columns in chunks of 64 -> 144 tokens of (2+2) x (64+2)
GEN = [
    "generator.num_prompts=4", "generator.prompt_len=16", "generator.prompt_pool=24",
    "generator.features=[[4,16,384],[8,8,64],[144,4,66]]",
]


def make_adapter(seed: int, scale: float) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for m in MODULES:
            prefix = f"base_model.model.encoder.layer.{layer}.attention.self.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(R, HIDDEN, generator=g) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, R, generator=g) * 0.01 * scale
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": MODULES, "lora_dropout": 0.0,
              "bias": "none", "task_type": None, "base_model_name_or_path": "all-MiniLM-L6-v2"}
    return Adapter(config, tensors)


def run_stage(overrides: list[str]) -> dict:
    return run_stage_in_process(overrides)


def write_token_dirs(root: Path) -> dict[str, Path]:
    """One dnd token set of 3 synthetic checkpoints per dataset, as stage=tokenize writes it."""
    linear = list(compose(["model=minilm"]).model.linear_modules)
    dirs = {}
    for d, name in enumerate(DATASETS):
        ckpts = [make_adapter(100 * d + step, 1.0 + step) for step in range(3)]
        dirs[name] = save_token_set(tokenize_adapters(ckpts, modules=linear, scheme="dnd"), root / name)
    return dirs


@pytest.fixture(scope="module")
def token_dirs(tmp_path_factory):
    return write_token_dirs(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def trained(token_dirs, tmp_path_factory):
    """A generator run dir as stage=generator leaves it, with an untrained (random) decoder."""
    from omegaconf import OmegaConf

    from loragen.generator.checkpoint import generator_config, save_generator
    from loragen.lora.tokenize import load_token_set
    from loragen.models.hyperconv import HyperConvDecoder

    run = tmp_path_factory.mktemp("gen") / "run"
    cache = tmp_path_factory.mktemp("cache")
    cfg = compose(["stage=generator", "dataset=commonsense6", *GEN])
    gen_cfg = generator_config(cfg)
    torch.manual_seed(0)
    model = HyperConvDecoder(gen_cfg["features"], gen_cfg["kernel_size"])
    specs = {n: OmegaConf.to_container(cfg.dataset.members[n], resolve=True) for n in DATASETS}
    save_generator(run, model, gen_cfg, load_token_set(token_dirs["arc_easy"]).layout,
                   {"datasets": DATASETS[:2], "heldout": "openbookqa", "dataset_specs": specs})
    return run, cache


def test_generate_writes_loadable_adapters(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from loragen.models.registry import resolve_model_path

    run, cache = trained
    out = tmp_path / "generate"
    # dataset=arc_easy (the default) lacks openbookqa: its spec comes from the checkpoint
    run_stage(["stage=generate", f"generate.checkpoint={run}", "generate.num_adapters=2", "generate.seed=3",
               "tracker=none", f"hydra.run.dir={out}", f"paths.cache_dir={cache}", *GEN])
    summary = json.loads((out / "generate.json").read_text())
    assert summary["prompts"]["split"] == "test" and summary["prompts"]["dataset"] == "openbookqa"
    assert len(summary["adapters"]) == 2 and all(a["seconds"] > 0 for a in summary["adapters"])
    rec = json.loads((out / "adapters" / "gen-001" / "prompts.json").read_text())
    assert len(rec["prompts"]) == 4 and rec["split"] == "test"
    base = AutoModel.from_pretrained(resolve_model_path(compose([]).model, compose([]).paths))
    model = PeftModel.from_pretrained(base, str(out / "adapters" / "gen-000"))
    lora_a = model.base_model.model.encoder.layer[0].attention.self.query.lora_A["default"].weight
    assert tuple(lora_a.shape) == (R, HIDDEN) and lora_a.abs().sum() > 0


def test_generate_refuses_other_config(trained, tmp_path):
    run, cache = trained
    args = ["stage=generate", f"generate.checkpoint={run}", "tracker=none", f"hydra.run.dir={tmp_path / 'g'}",
            f"paths.cache_dir={cache}", *GEN]
    with pytest.raises(LoragenError, match=r"differing keys \(checkpoint -> now\): generator.kernel_size: 3 -> 5"):
        run_stage([*args, "generator.kernel_size=5"])
    with pytest.raises(LoragenError, match=r"is not a generator run: expected .*model.safetensors"):
        run_stage([*args[:1], f"generate.checkpoint={tmp_path}", *args[2:]])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the boiling point of water?\n\nWhy is the sky blue?\n")
    with pytest.raises(LoragenError, match="has 2 prompts but the generator takes 4"):
        run_stage([*args, f"generate.prompts={prompts}", "generate.strict=true"])
    with pytest.raises(LoragenError, match="neither a file nor <dataset>:<split>"):
        run_stage([*args, "generate.prompts=no_such_file.txt"])
    run_stage([*args, f"generate.prompts={prompts}", "generate.num_adapters=1"])
    rec = json.loads((tmp_path / "g" / "adapters" / "gen-000" / "prompts.json").read_text())
    assert set(rec["prompts"]) <= {"What is the boiling point of water?", "Why is the sky blue?"}
    assert len(rec["prompts"]) == 4  # drawn with replacement
