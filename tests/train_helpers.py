"""Shared setup of the training-loop tests (also run under torchrun by ddp_train_worker.py)."""

from __future__ import annotations

from omegaconf import OmegaConf

from loragen.data import load_split
from loragen.lora.init import attach_lora
from loragen.models import load_model
from loragen.train.objectives import make_objective
from tests.conftest import CONF, DATA_DIR


def train_cfg(**over):
    cfg = OmegaConf.load(CONF / "train" / "default.yaml")
    cfg.per_device_batch, cfg.seed = 4, 0
    cfg.merge_with(OmegaConf.create({"max_steps": 4, "lr": 5e-3, "log_every": 1, "save_state_every": 0, **over}))
    return cfg


def records(n: int = 24):
    spec = OmegaConf.load(CONF / "dataset" / "arc_easy.yaml")
    return load_split(spec, "train", data_dir=DATA_DIR, limit=n).records


def tiny_lora(paths, targets=("q_proj", "v_proj", "down_proj")):
    lm = load_model(OmegaConf.load(CONF / "model" / "tiny_qwen2.yaml"), paths)
    model = attach_lora(lm.model, r=4, alpha=8, dropout=0.0, target_modules=list(targets), init_seed=0)
    return model, make_objective("causal", lm.tokenizer, max_length=128, temperature=1.0), lm
