"""Training speed: loragen's loop vs transformers' Trainer + PEFT on the same model, data, batch and steps.

Causal (tiny_qwen2, SFT on ARC-Easy): tokens/s; encoder (MiniLM, choice cross-entropy): samples/s.
Both sides use the same objective and collate, fp32 on CPU; wall time of the training call only
(model loading excluded). Also: trajectory-checkpoint save time as a fraction of step time at
ckpt.every=1 (target < 10%).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from loragen.data import load_split
from loragen.lora.init import attach_lora
from loragen.models import load_model
from loragen.train import Checkpointer, fit
from loragen.train.objectives import make_objective

CONF = Path(__file__).resolve().parents[3] / "conf"
STEPS, BATCH, LR = 20, 8, 1e-3
SETUPS = {  # model, LoRA targets, max_length, metric
    "causal": ("tiny_qwen2", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"], "tokens/s"),
    "encoder": ("minilm", ["query", "value"], "samples/s"),
}


def _paths():
    cache = os.environ.get("LORAGEN_CACHE_DIR") or str(Path.home() / ".cache" / "loragen")
    return OmegaConf.create({"data_dir": os.environ.get("LORAGEN_DATA_DIR"), "models_dir": None, "cache_dir": cache})


def _setup(kind: str):
    name, targets, _ = SETUPS[kind]
    lm = load_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), _paths())
    model = attach_lora(lm.model, r=8, alpha=16, dropout=0.0, target_modules=targets, init_seed=0)
    obj = make_objective(lm.kind, lm.tokenizer, max_length=256, temperature=0.05)
    return model, obj


def _train_cfg():
    cfg = OmegaConf.load(CONF / "train" / "default.yaml")
    cfg.merge_with({"max_steps": STEPS, "lr": LR, "per_device_batch": BATCH, "seed": 0, "save_state_every": 0,
                    "log_every": STEPS, "resume": "never"})
    return cfg


def _amount(kind: str, obj, records, n_samples: int) -> float:
    """Work per run: input tokens (causal) or samples (encoder) of the same STEPS x BATCH documents."""
    if kind == "encoder":
        return float(n_samples)
    from loragen.train.batches import StepBatches

    sb = StepBatches(len(records), per_device_batch=BATCH, seed=0)
    return float(sum(obj.collate([records[i] for i in sb.micro_batch(s, 0, 0)])["num_tokens"] for s in range(STEPS)))


def loragen_run(kind: str, records, tmp: Path, every: int = 0) -> tuple[float, float]:
    """(seconds of training, seconds spent saving trajectory checkpoints)."""
    from accelerate import Accelerator

    model, obj = _setup(kind)
    saved = [0.0]

    def save(path: Path) -> None:
        from loragen.stages.lora import save_adapter

        t = time.perf_counter()
        save_adapter(model, path)
        saved[0] += time.perf_counter() - t

    ckpt = Checkpointer(tmp / "checkpoints", save, every=every) if every else None
    t0 = time.perf_counter()
    fit(model, obj.loss, records, obj.collate, _train_cfg(), accelerator=Accelerator(cpu=True), state_dir=tmp / "state",
        checkpointer=ckpt)
    return time.perf_counter() - t0, saved[0]


def trainer_run(kind: str, records, tmp: Path) -> float:
    from transformers import Trainer, TrainingArguments

    model, obj = _setup(kind)

    class ObjectiveTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_sum, units = obj.loss(model, inputs)
            return loss_sum / units

    def collate(items):
        batch = obj.collate(items)
        batch.pop("num_tokens")
        return batch

    args = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                             learning_rate=LR, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
                             logging_steps=STEPS, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = ObjectiveTrainer(model=model, args=args, train_dataset=records, data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def run() -> list[dict]:
    spec = OmegaConf.load(CONF / "dataset" / "arc_easy.yaml")
    records = load_split(spec, "train", data_dir=_paths().data_dir, limit=STEPS * BATCH).records
    rows = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, (name, _, metric) in SETUPS.items():
            _, obj = _setup(kind)
            work = _amount(kind, obj, records, STEPS * BATCH)
            ours, _ = loragen_run(kind, records, tmp / f"{kind}-ours")
            ref = trainer_run(kind, records, tmp / f"{kind}-ref")
            rows.append({"name": f"train_{kind}", "metric": f"{metric} ({name}, {STEPS} steps of batch {BATCH}, fp32 CPU)",
                         "loragen": work / ours, "reference": work / ref, "ratio": ref / ours, "target": ">= 1.0",
                         "notes": "reference: transformers Trainer + PEFT, same objective and collate"})
            total, saving = loragen_run(kind, records, tmp / f"{kind}-ckpt", every=1)
            step = (total - saving) / STEPS
            rows.append({"name": f"train_ckpt_{kind}", "metric": f"checkpoint save / step time at ckpt.every=1 ({name})",
                         "loragen": saving / STEPS, "reference": step, "ratio": saving / STEPS / step, "target": "< 0.10",
                         "notes": "seconds per save vs seconds per training step (adapter only, safetensors)"})
    return rows
