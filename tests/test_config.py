"""Every option of every config group composes, and the keys the code reads are there."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, compose, run_cli

GROUPS = ["model", "dataset", "hardware", "stage", "tracker", "experiment"]

# Keys the code reads, per config group.
REQUIRED = {
    "model": ["name", "kind", "source", "linear_modules"],
    "hardware": ["name", "device", "precision", "cpu_linear", "num_processes", "per_device_batch", "eval_batch_size"],
    "tracker": ["name"],
    "stage": ["name"],
}
ROOT_KEYS = ["seed", "paths.data_dir", "paths.models_dir", "paths.cache_dir", "data.skip_invalid", "data.hash_train_fraction"]
DATASET_KEYS = ["name", "format", "hub.path", "hub.name", "hub.revision", "train_split", "eval_split"]
INSTRUCTION_KEYS = ["name", "format", "file", "val_ratio", "split_seed", "language", "train_split", "eval_split"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_expected_options_exist():
    assert set(options("model")) >= {
        "tiny_qwen2", "tiny_llama", "tiny_gemma2", "minilm", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b",
        "llama3-8b-instruct", "gemma2-2b-it",
    }
    assert set(options("dataset")) >= {
        "arc_challenge", "arc_easy", "boolq", "piqa", "hellaswag", "winogrande", "openbookqa", "commonsense",
    }
    assert set(options("hardware")) == {"cpu", "rtx4090", "a800"}
    assert set(options("stage")) >= {"lora", "tokenize", "generator", "generate", "evaluate", "transfer", "pipeline"}
    assert set(options("tracker")) == {"swanlab", "none"}
    assert "quick" in options("experiment")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_each_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    for key in ROOT_KEYS:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None or key.startswith("paths."), key
    for g, keys in REQUIRED.items():
        for k in keys:
            assert f"{k}" in cfg[g], f"{group}={option}: {g}.{k} missing"
    members = cfg.dataset.members.values() if "members" in cfg.dataset else [cfg.dataset]
    for spec in members:
        spec = spec.mc if spec.format == "mc_instruction" else spec  # converted on the fly from this one
        keys = INSTRUCTION_KEYS if spec.format == "instruction" else DATASET_KEYS
        for k in keys:
            assert OmegaConf.select(spec, k, default="<missing>") != "<missing>", f"dataset {spec.name}: {k} missing"
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_commonsense_has_all_seven():
    cfg = compose(["dataset=commonsense"])
    assert sorted(cfg.dataset.members) == sorted(
        ["arc_easy", "arc_challenge", "boolq", "piqa", "hellaswag", "winogrande", "openbookqa"]
    )


def test_cfg_job_prints_offline(tmp_path):
    proc = run_cli(
        ["--cfg", "job", "stage=lora", "model=qwen2.5-0.5b", "dataset=arc_challenge", "hardware=a800"],
        env={"HF_HUB_OFFLINE": "1", "LORAGEN_MODELS_DIR": str(tmp_path)},
    )
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.model.hub_id == "Qwen/Qwen2.5-0.5B"
    assert cfg.dataset.name == "arc_challenge" and cfg.hardware.num_processes == 4
    assert cfg.stage.name == "lora"
    assert not Path(tmp_path).joinpath("Qwen2.5-0.5B").exists()  # composing fetches nothing


def test_unknown_option_lists_valid_ones():
    proc = run_cli(["--cfg", "job", "model=no_such_model"], check=False)
    assert proc.returncode != 0
    assert "no_such_model" in proc.stderr and "tiny_qwen2" in proc.stderr
