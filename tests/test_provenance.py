"""Adapter provenance: every adapter loragen writes records its base model (loragen_base.json); loading one onto
another base model is an error naming both, unless eval.allow_base_mismatch=true (or the transfer stage)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import get_peft_model_state_dict

from loragen.errors import CheckpointError
from loragen.evaluation.adapters import check_adapter
from loragen.lora.adapter_io import (
    BASE_RECORD,
    CONFIG_NAME,
    VOLATILE_CONFIG_KEYS,
    base_mismatch,
    config_fingerprint,
    loose_name,
    read_base_record,
    write_adapter,
)
from loragen.lora.init import attach_lora
from loragen.models import load_model, resolve_model_path
from tests.conftest import CONF, run_cli


def model_cfg(name):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


def make_adapter(paths, name, path, seed=1):
    lm = load_model(model_cfg(name), paths)
    pm = attach_lora(lm.model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], init_seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    write_adapter(path, config=pm.peft_config["default"].to_dict(), tensors=get_peft_model_state_dict(pm))
    return path


@pytest.fixture(scope="module")
def qwen_adapter(paths, tmp_path_factory):
    return make_adapter(paths, "tiny_qwen2", tmp_path_factory.mktemp("prov") / "qwen_ad")


def test_written_adapter_records_its_base_model(paths, qwen_adapter):
    record = read_base_record(qwen_adapter)
    lm = load_model(model_cfg("tiny_qwen2"), paths, precision="bf16")  # the dtype is not part of the fingerprint
    base = record["base_model"]
    assert base["name_or_path"] == resolve_model_path(model_cfg("tiny_qwen2"), paths)
    assert base["config_sha256"] == config_fingerprint(lm.model.config)[1]
    assert base["config"]["model_type"] == "qwen2" and not set(VOLATILE_CONFIG_KEYS) & set(base["config"])
    assert record["excluded_config_keys"] == list(VOLATILE_CONFIG_KEYS)
    # PEFT's own file is untouched by the record
    assert "base_model" not in json.loads((qwen_adapter / CONFIG_NAME).read_text())
    check_adapter(lm.model, qwen_adapter)  # the same base model: no complaint


def test_foreign_base_is_refused_in_process(paths, qwen_adapter, caplog):
    llama = load_model(model_cfg("tiny_llama"), paths)
    with pytest.raises(CheckpointError, match=r"was written for base model .*tiny_qwen2.*, not tiny_llama \(.*tiny_llama"
                                              r".*model_type \"qwen2\" vs \"llama\".*set eval.allow_base_mismatch=true"):
        check_adapter(llama.model, qwen_adapter, model_name="tiny_llama", model_path=llama.path,
                      override="eval.allow_base_mismatch=true")
    check_adapter(llama.model, qwen_adapter, model_name="tiny_llama", allow_base_mismatch=True)
    assert "loaded anyway" in caplog.text
    with pytest.raises(CheckpointError, match="this command has no override for it"):
        check_adapter(llama.model, qwen_adapter)  # chat, export: no override key


def test_config_keys_of_another_transformers_version_are_not_a_mismatch(paths, qwen_adapter, tmp_path):
    lm = load_model(model_cfg("tiny_qwen2"), paths)
    ad = tmp_path / "ad"
    ad.mkdir()
    for f in qwen_adapter.iterdir():
        (ad / f.name).write_bytes(f.read_bytes())
    record = json.loads((ad / BASE_RECORD).read_text())
    record["base_model"]["config"].pop("rms_norm_eps")  # a key the writer's version did not have
    record["base_model"]["config"]["some_new_key"] = 1
    record["base_model"]["config_sha256"] = "0" * 64
    record["base_model"]["name_or_path"] = "/elsewhere/models/" + lm.path.rstrip("/").split("/")[-1]  # another machine
    (ad / BASE_RECORD).write_text(json.dumps(record))
    assert base_mismatch(ad, lm.model.config, lm.path) is None
    record["base_model"]["config"]["num_hidden_layers"] = 7  # a shared key that differs
    (ad / BASE_RECORD).write_text(json.dumps(record))
    assert "num_hidden_layers 7 vs 2" in base_mismatch(ad, lm.model.config, lm.path)[1]


def test_third_party_adapters_compare_peft_names_loosely(paths, qwen_adapter, tmp_path):
    lm = load_model(model_cfg("tiny_qwen2"), paths)
    ad = tmp_path / "third"
    ad.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # no loragen record
        (ad / name).write_bytes((qwen_adapter / name).read_bytes())
    config = json.loads((ad / CONFIG_NAME).read_text())
    own = lm.path.rstrip("/").split("/")[-1]
    for peft_base, refused in [(f"someone/{own.upper()}", False), (None, False), ("Qwen/Qwen2.5-0.5B", True)]:
        (ad / CONFIG_NAME).write_text(json.dumps({**config, "base_model_name_or_path": peft_base}))
        found = base_mismatch(ad, lm.model.config, lm.path)
        assert (found is not None) == refused, peft_base
    assert "qwen2.5-0.5b" in found[1] and "compared by name" in found[1]
    assert loose_name("/hub/models--Qwen--Qwen2.5-0.5B/snapshots/abc123") == "qwen2.5-0.5b"
    assert loose_name("Qwen/Qwen2.5-0.5B/") == loose_name("/models/qwen2.5-0.5b")


def test_transfer_records_the_target_model(paths, tmp_path):
    from tests.conftest import run_stage_in_process

    source = make_adapter(paths, "tiny_gemma2", tmp_path / "gemma_ad")
    run_stage_in_process(["stage=transfer", "model=tiny_qwen2", "transfer.source_model=tiny_gemma2",
                          f"transfer.source_adapter={source}", "transfer.rank_svd=8", "tracker=none",
                          f"paths.cache_dir={paths.cache_dir}"], run_dir=tmp_path / "tr")
    record = read_base_record(tmp_path / "tr" / "adapter")
    assert record["base_model"]["model"] == "tiny_qwen2"
    assert record["base_model"]["name_or_path"] == resolve_model_path(model_cfg("tiny_qwen2"), paths)
    assert record["transferred_from"]["model"] == "tiny_gemma2"
    qwen = load_model(model_cfg("tiny_qwen2"), paths)
    check_adapter(qwen.model, tmp_path / "tr" / "adapter", model_name="tiny_qwen2")  # fits its target


def test_cli_foreign_adapter_is_one_line_naming_both_and_the_override_runs(qwen_adapter, tmp_path):
    common = ["stage=evaluate", "model=tiny_llama", "dataset=arc_easy", "eval.limit=4", "tracker=none",
              f"eval.adapters=[{qwen_adapter}]"]
    bad = run_cli(common + [f"hydra.run.dir={tmp_path / 'bad'}"], check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("loragen: error: adapter ") and "tiny_qwen2" in line and "tiny_llama" in line
    assert "eval.allow_base_mismatch=true" in line
    assert "Traceback" in (tmp_path / "bad" / "loragen.log").read_text()  # the full story is in the log
    assert not (tmp_path / "bad" / "results.json").exists()

    run_cli(common + ["eval.allow_base_mismatch=true", f"hydra.run.dir={tmp_path / 'ok'}"])
    entries = json.loads((tmp_path / "ok" / "results.json").read_text())["results"]
    assert [e["label"] for e in entries] == ["base", "qwen_ad"] and entries[1]["n"] == 4
