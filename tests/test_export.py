"""stage=export: a merged model gives the logits of base + adapter; copy mode; no silent overwrite."""

import json

import pytest
import torch

from loragen.errors import CheckpointError, ConfigError
from loragen.lora.init import attach_lora
from loragen.models import load_model
from loragen.stages.lora import save_adapter
from tests.conftest import compose, run_stage_in_process

AUTO = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM", "encoder": "AutoModel"}


def outputs(model, kind: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if kind == "seq2seq":
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        if kind == "encoder":
            return model(input_ids=ids).last_hidden_state
        return model(input_ids=ids).logits


def make_adapter(model_name: str, path, paths) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A LoRA with non-zero lora_B, saved as a PEFT dir; returns kind, input ids, base and adapted outputs."""
    cfg = compose([f"model={model_name}"])
    lm = load_model(cfg.model, paths)
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    base = outputs(lm.model, lm.kind, ids)
    peft = attach_lora(lm.model, r=4, alpha=8, dropout=0.0, target_modules=list(cfg.model.lora_targets), init_seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft.eval()
    adapted = outputs(peft, lm.kind, ids)
    save_adapter(peft, path)
    return lm.kind, ids, base, adapted


def export(tmp_path, *overrides, run="run"):
    return run_stage_in_process(["stage=export", "tracker=none", *overrides], tmp_path / run)


@pytest.mark.parametrize("model_name", ["tiny_qwen2", "tiny_t5", "minilm"])
def test_merged_export_gives_base_plus_adapter_outputs(tmp_path, paths, model_name):
    import transformers

    kind, ids, base, adapted = make_adapter(model_name, tmp_path / "adapter", paths)
    assert not torch.allclose(base, adapted, atol=1e-3)  # the adapter changes the outputs
    summary = export(tmp_path, f"model={model_name}", f"export.adapter={tmp_path / 'adapter'}")
    out = tmp_path / "run" / "merged"
    assert summary["out"] == str(out) and summary["merge"] is True
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and not (out / "adapter_config.json").exists()
    merged = getattr(transformers, AUTO[kind]).from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    got = outputs(merged, kind, ids)
    # fp32 rounding of W + s·BA vs W·x + s·B(A·x): far below what the adapter changes
    assert torch.allclose(got, adapted, atol=1e-3, rtol=1e-4)
    assert (got - adapted).abs().max() < 0.01 * (base - adapted).abs().max()
    info = json.loads((tmp_path / "run" / "export.json").read_text())
    assert info["adapter"] == str(tmp_path / "adapter") and info["model"] == model_name and info["kind"] == kind


def test_copy_mode_and_overwrite_refusal(tmp_path, paths):
    make_adapter("tiny_qwen2", tmp_path / "adapter", paths)
    out = tmp_path / "exported"
    export(tmp_path, "export.merge=false", f"export.adapter={tmp_path / 'adapter'}", f"export.out={out}")
    src = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert sorted(p.name for p in out.iterdir()) == src
    for name in src:
        assert (out / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()

    (out / "marker").write_text("mine")
    with pytest.raises(ConfigError, match=rf"export.out={out} already exists; set export.overwrite=true"):
        export(tmp_path, "export.merge=false", f"export.adapter={tmp_path / 'adapter'}", f"export.out={out}", run="r2")
    assert (out / "marker").read_text() == "mine"  # untouched
    export(tmp_path, "export.merge=false", f"export.adapter={tmp_path / 'adapter'}", f"export.out={out}",
           "export.overwrite=true", run="r3")
    assert sorted(p.name for p in out.iterdir()) == src  # replaced as a whole

    default = export(tmp_path, "export.merge=false", f"export.adapter={tmp_path / 'adapter'}", run="r4")
    assert default["out"] == str(tmp_path / "r4" / "adapter")


def test_bad_export_requests(tmp_path, paths):
    with pytest.raises(ConfigError, match="set export.adapter="):
        export(tmp_path, "model=tiny_qwen2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a PEFT adapter directory"):
        export(tmp_path, "model=tiny_qwen2", f"export.adapter={tmp_path / 'empty'}", run="r2")
    make_adapter("tiny_qwen2", tmp_path / "adapter", paths)
    with pytest.raises(ConfigError, match="overlaps export.adapter"):
        export(tmp_path, f"export.adapter={tmp_path / 'adapter'}", f"export.out={tmp_path / 'adapter' / 'm'}", run="r3")
    with pytest.raises(CheckpointError, match="causal"):  # a causal adapter on a seq2seq base
        export(tmp_path, "model=tiny_t5", f"export.adapter={tmp_path / 'adapter'}", run="r4")
    assert not (tmp_path / "r4" / "merged").exists()
