"""Training speed: loragen's loop vs transformers' Trainer + PEFT on the same model, data, batch and steps.

Causal (tiny_qwen2, SFT on ARC-Easy, batch 8): tokens/s, both sides with loragen's objective and collate.
Encoder (MiniLM, choice cross-entropy, batch 16 as in make demo's LoRAs): samples/s; the reference is Trainer +
PEFT with the objective written straightforwardly (questions and choices each embedded as one padded batch:
`padded`), loragen its loop and objective (texts in groups of similar length); a second row gives Trainer
loragen's objective and linear layers too (the loops alone). loragen computes its linear layers as stage=lora
does with hardware=cpu (`hardware.cpu_linear`, oneDNN), the Trainer reference with torch's own. fp32 on CPU;
wall time of the training call only (model loading excluded). The sides run alternately REPEATS times and each
side's median counts, since the load of a shared machine drifts. Also: trajectory-checkpoint save time as a
fraction of step time at ckpt.every=1 (target < 10%), as the stage saves (lora.snapshot + the checkpointer's
background writer): the time the training thread spends in Checkpointer.save and flush, per step.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from loragen import rundir
from loragen.data import load_split
from loragen.lora.init import attach_lora
from loragen.lora.snapshot import AdapterSnapshot
from loragen.models import load_model
from loragen.models.pooling import encode_texts
from loragen.train import Checkpointer, fit
from loragen.train.objectives import encoder_choice_ce, make_objective

CONF = Path(__file__).resolve().parents[3] / "conf"
STEPS, LR, REPEATS = 20, 1e-3, 3
SETUPS = {  # model, LoRA targets, metric, batch (the encoder's: make demo's LoRA batch)
    "causal": ("tiny_qwen2", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"], "tokens/s", 8),
    "encoder": ("minilm", ["query", "value"], "samples/s", 16),
}


def _paths():
    cache = os.environ.get("LORAGEN_CACHE_DIR") or str(Path.home() / ".cache" / "loragen")
    return OmegaConf.create({"data_dir": os.environ.get("LORAGEN_DATA_DIR"), "models_dir": None, "cache_dir": cache})


def padded(tokenizer, texts: list[str], max_length: int):
    """The encoder reference's encoding: all texts as one batch padded to the longest, in their order."""
    return [(list(range(len(texts))), encode_texts(tokenizer, texts, max_length))]



def cpu_linear() -> str:
    """What stage=lora with hardware=cpu computes its linear layers with (models.cpu_linear)."""
    return str(OmegaConf.load(CONF / "hardware" / "cpu.yaml").cpu_linear)


def _setup(kind: str, encode=None, backend: str | None = None):
    """Model with LoRA and objective; linears by `backend` (default: hardware=cpu's, as stage=lora runs)."""
    name, targets, _, _ = SETUPS[kind]
    lm = load_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), _paths(), "fp32", "cpu", backend or cpu_linear())
    model = attach_lora(lm.model, r=8, alpha=16, dropout=0.0, target_modules=targets, init_seed=0)
    if encode is not None:
        obj = encoder_choice_ce(lm.tokenizer, max_length=256, temperature=0.05, encode=encode)
    else:
        obj = make_objective(lm.kind, lm.tokenizer, max_length=256, temperature=0.05)
    return model, obj


def _train_cfg(batch: int):
    cfg = OmegaConf.load(CONF / "train" / "default.yaml")
    cfg.merge_with({"max_steps": STEPS, "lr": LR, "per_device_batch": batch, "seed": 0, "save_state_every": 0,
                    "log_every": STEPS, "resume": "never"})
    return cfg


def _amount(kind: str, obj, records, n_samples: int) -> float:
    """Work per run: input tokens (causal) or samples (encoder) of the same STEPS x batch documents."""
    if kind == "encoder":
        return float(n_samples)
    from loragen.train.batches import StepBatches

    sb = StepBatches(len(records), per_device_batch=SETUPS[kind][3], seed=0)
    return float(sum(obj.collate([records[i] for i in sb.micro_batch(s, 0, 0)])["num_tokens"] for s in range(STEPS)))


class TimedCheckpointer(Checkpointer):
    """Adds up the training thread's time in save() and flush() (`blocking`) and the writer's (`writing`)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.blocking, self.writing, self._inside = 0.0, 0.0, False

    def _timed(self, fn, *args):
        if self._inside:
            return fn(*args)
        self._inside, t = True, time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._inside, self.blocking = False, self.blocking + time.perf_counter() - t

    def save(self, step: int, metrics: dict) -> Path:
        return self._timed(super().save, step, metrics)

    def flush(self) -> None:
        self._timed(super().flush)

    def timed_write(self, write):
        def run() -> None:
            t = time.perf_counter()
            write()
            self.writing += time.perf_counter() - t
        return run


def loragen_run(kind: str, records, tmp: Path, every: int = 0) -> tuple[float, TimedCheckpointer | None]:
    """(seconds of training, the checkpointer with its timings when every > 0)."""
    from accelerate import Accelerator

    model, obj = _setup(kind)
    snapshot = AdapterSnapshot(model)
    ckpt = TimedCheckpointer(tmp / rundir.CHECKPOINTS, lambda path: ckpt.timed_write(snapshot.deferred_write(path)),
                             every=every) if every else None
    t0 = time.perf_counter()
    fit(model, obj.loss, records, obj.collate, _train_cfg(SETUPS[kind][3]), accelerator=Accelerator(cpu=True), state_dir=tmp / rundir.STATE,
        checkpointer=ckpt)
    return time.perf_counter() - t0, ckpt


def trainer_run(kind: str, records, tmp: Path, encode=None, backend: str = "torch") -> float:
    """Trainer + PEFT; by default on torch's own linear layers, as a Trainer user runs it."""
    from transformers import Trainer, TrainingArguments

    model, obj = _setup(kind, encode, backend)

    class ObjectiveTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_sum, units = obj.loss(model, inputs)
            return loss_sum / units

    def collate(items):
        batch = obj.collate(items)
        batch.pop("num_tokens")
        return batch

    args = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=SETUPS[kind][3], max_steps=STEPS,
                             learning_rate=LR, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
                             logging_steps=STEPS, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = ObjectiveTrainer(model=model, args=args, train_dataset=records, data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def run() -> list[dict]:
    spec = OmegaConf.load(CONF / "dataset" / "arc_easy.yaml")
    most = max(b for *_, b in SETUPS.values())
    records = load_split(spec, "train", data_dir=_paths().data_dir, limit=STEPS * most).records
    rows = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, (name, _, metric, batch) in SETUPS.items():
            _, obj = _setup(kind)
            work = _amount(kind, obj, records, STEPS * batch)
            ours, ref, loop_ref = [], [], []
            for r in range(REPEATS):  # alternately: the machine's load drifts
                ours.append(loragen_run(kind, records, tmp / f"{kind}-ours{r}")[0])
                ref.append(trainer_run(kind, records, tmp / f"{kind}-ref{r}", padded if kind == "encoder" else None))
                if kind == "encoder":
                    loop_ref.append(trainer_run(kind, records, tmp / f"{kind}-loop{r}", backend=cpu_linear()))
            ours_s, ref_s = statistics.median(ours), statistics.median(ref)
            what = ("Trainer + PEFT, the objective straightforwardly (each of questions and choices one padded batch)"
                    if kind == "encoder" else "Trainer + PEFT, same objective and collate")
            what += f"; linear layers: loragen {cpu_linear()} (hardware.cpu_linear), Trainer torch's own"
            rows.append({"name": f"train_{kind}", "metric": f"{metric} ({name}, {STEPS} steps of batch {batch}, fp32 CPU)",
                         "loragen": work / ours_s, "reference": work / ref_s, "ratio": ref_s / ours_s,
                         "target": ">= 1.2" if kind == "encoder" else ">= 1.0",
                         "notes": f"reference: {what}; median of {REPEATS} alternate runs (s: ours {_spread(ours)}, "
                                  f"reference {_spread(ref)})"})
            if loop_ref:
                loop_s = statistics.median(loop_ref)
                rows.append({"name": f"train_{kind}_loop", "metric": f"{metric} ({name}): the loops alone",
                             "loragen": work / ours_s, "reference": work / loop_s, "ratio": loop_s / ours_s,
                             "target": ">= 1.0", "notes": f"reference: Trainer + PEFT with loragen's objective, "
                                                          f"collate and linear layers ({cpu_linear()}) "
                                                          f"(s: {_spread(loop_ref)})"})
            saves, steps, writes = [], [], []
            for r in range(REPEATS):
                total, ckpt = loragen_run(kind, records, tmp / f"{kind}-ckpt{r}", every=1)
                saves.append(ckpt.blocking / STEPS)
                steps.append((total - ckpt.blocking) / STEPS)
                writes.append(ckpt.writing / STEPS)
            fractions = [a / b for a, b in zip(saves, steps, strict=True)]
            k = fractions.index(statistics.median(fractions))
            rows.append({"name": f"train_ckpt_{kind}", "metric": f"checkpoint save / step time at ckpt.every=1 ({name})",
                         "loragen": saves[k], "reference": steps[k], "ratio": fractions[k], "target": "< 0.10",
                         "notes": "seconds per save on the training thread (snapshot, queue, flushes) vs seconds per "
                                  f"training step (adapter only, safetensors), median of {REPEATS} runs; the writer "
                                  f"thread spent {writes[k]:.4f} s per checkpoint in the background"})
    return rows


def _spread(values: list[float]) -> str:
    """Median and min-max of a side's seconds."""
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"
