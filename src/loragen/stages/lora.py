"""stage=lora: fine-tune a LoRA on one dataset and keep its checkpoint trajectory.

Recipe: setup (data, base model, LoRA with the shared init seed, objective), train with the one
loop (trajectory checkpoints in checkpoints/step-XXXXXX/, full state in state/), save final/, and
evaluate base and final on the held-out split into results.json (the evaluate stage's writer).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from loragen import runtime
from loragen.data import dataset_specs, load_split
from loragen.data.registry import heldout_split
from loragen.errors import ConfigError
from loragen.evaluation import evaluate_records
from loragen.evaluation.results import result_entry, sample_rows, write_results
from loragen.lora.adapter_io import write_adapter
from loragen.lora.init import attach_lora
from loragen.models import load_model
from loragen.provenance import provenance
from loragen.tracking import make_tracker
from loragen.train import Checkpointer, fit
from loragen.train.objectives import make_objective
from loragen.train_env import make_accelerator

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    out = runtime.run_dir()
    spec = single_dataset(cfg)
    data_kw = dict(data_dir=cfg.paths.data_dir, seed=cfg.seed, skip_invalid=cfg.data.skip_invalid,
                   hash_train_fraction=cfg.data.hash_train_fraction)

    # setup
    accelerator = make_accelerator(cfg)
    train_split = load_split(spec, str(spec.train_split), limit=cfg.lora.train_limit, **data_kw)
    held_name = heldout_split(spec)
    lm = load_model(cfg.model, cfg.paths, cfg.hardware.precision, accelerator.device)
    model = attach_lora(lm.model, r=int(cfg.lora.r), alpha=float(cfg.lora.alpha), dropout=float(cfg.lora.dropout),
                        target_modules=list(cfg.lora.target_modules), init_seed=int(cfg.lora.init_seed))
    objective = make_objective(lm.kind, lm.tokenizer, max_length=int(cfg.lora.max_length),
                               temperature=float(cfg.lora.temperature))
    checkpointer = Checkpointer(out / "checkpoints", lambda path: save_adapter(model, path), every=int(cfg.ckpt.every),
                                start_step=int(cfg.ckpt.start_step), keep_last=cfg.ckpt.keep_last,
                                is_main=accelerator.is_main_process)
    eval_fn = None
    if int(cfg.train.eval_every) > 0:
        slice_ = load_split(spec, held_name, limit=cfg.lora.eval_limit, **data_kw)
        eval_fn = make_eval_fn(lm, slice_, cfg, accelerator)
    tracker = make_tracker(cfg, out, accelerator.is_main_process)

    # train
    result = fit(model, objective.loss, train_split.records, objective.collate, cfg.train, accelerator=accelerator,
                 state_dir=out / "state", fingerprint=fingerprint(cfg, spec), tracker=tracker, eval_fn=eval_fn,
                 checkpointer=checkpointer, data_name=f"dataset {spec.name} split {spec.train_split!r}")
    if result.status == "preempted":
        tracker.finish()
        return {"status": "preempted", "step": result.step}

    # save and evaluate
    if accelerator.is_main_process:
        save_adapter(model, out / "final")
    accelerator.wait_for_everyone()
    held = load_split(spec, held_name, limit=cfg.lora.final_eval_limit, **data_kw)
    entries, samples = [], []
    runs = ([("base", None)] if cfg.lora.eval_base else []) + [("final", str(out / "final"))]
    for label, path in runs:
        outcome = score(model, lm, held, cfg, accelerator, label, use_adapter=path is not None)
        entries.append(result_entry(label, path, lm.name, lm.path, held, outcome))
        samples += sample_rows(label, held.dataset, outcome)
        log.info("%-6s %s %s: acc %.4f ± %.4f (n=%d)", label, spec.name, held_name, outcome.acc, outcome.acc_stderr, outcome.n)
    tracker.log({f"final/{e['label']}_acc": e["acc"] for e in entries}, step=result.step)
    tracker.finish()
    prov = provenance(cfg, {spec.name: train_split.sha256, f"{spec.name}:{held_name}": held.sha256},
                      accelerator.num_processes)
    if accelerator.is_main_process:
        write_results(out, entries, samples, prov)
        log.info("final adapter in %s; results in %s", out / "final", out / "results.json")
    return {"status": "completed", "step": result.step, "results": entries, "history": result.history}


def single_dataset(cfg: DictConfig) -> DictConfig:
    specs = dataset_specs(cfg.dataset)
    if len(specs) != 1:
        raise ConfigError(f"stage=lora trains on one dataset; dataset={cfg.dataset.name} has {len(specs)} "
                          f"({', '.join(s.name for s in specs)}). Sweep them: loragen -m stage=lora dataset=a,b,...")
    return specs[0]


def save_adapter(peft_model, path: Path) -> None:
    from peft import get_peft_model_state_dict

    write_adapter(path, config=peft_model.peft_config["default"].to_dict(), tensors=get_peft_model_state_dict(peft_model))


def score(model, lm, split, cfg: DictConfig, accelerator, label: str, use_adapter: bool):
    model.eval()
    kwargs = dict(batch_size=int(cfg.hardware.eval_batch_size), accelerator=accelerator, desc=f"eval {label}",
                  has_acc_norm=split.has_acc_norm)
    if use_adapter:
        return evaluate_records(model, lm.tokenizer, lm.kind, split.records, **kwargs)
    with model.disable_adapter():
        return evaluate_records(model, lm.tokenizer, lm.kind, split.records, **kwargs)


def make_eval_fn(lm, split, cfg: DictConfig, accelerator):
    def eval_fn(model) -> dict[str, float]:
        o = evaluate_records(model, lm.tokenizer, lm.kind, split.records, batch_size=int(cfg.hardware.eval_batch_size),
                             accelerator=accelerator, desc="eval", has_acc_norm=split.has_acc_norm)
        return {"eval_acc": o.acc} | ({"eval_acc_norm": o.acc_norm} if o.acc_norm is not None else {})

    return eval_fn


def fingerprint(cfg: DictConfig, spec: DictConfig) -> dict:
    """What makes a training trajectory: resuming with any of these changed is refused."""
    lora = OmegaConf.to_container(cfg.lora, resolve=True)
    for k in ("eval_limit", "final_eval_limit", "eval_base"):
        lora.pop(k)
    return {"model": cfg.model.name, "dataset": spec.name, "train_split": str(spec.train_split), "lora": lora,
            "precision": cfg.hardware.precision}
