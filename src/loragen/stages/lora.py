"""stage=lora: fine-tune a LoRA on one dataset and keep its checkpoint trajectory.

Recipe: setup (data, base model, LoRA with the shared init seed, objective), train with the one
loop (trajectory checkpoints in checkpoints/step-XXXXXX/, full state in state/, the best adapter by
ckpt.best_metric in best/), save final/, and evaluate base, final (and best) on the held-out split into
results.json (the evaluate stage's writer).

Multiple-choice datasets train on the gold answer and are scored by the one scorer (acc). Prompt -> text
datasets (dataset=instruction, *_instruct) train with the SFT objective on the target text, prompts
rendered by lora.generation.chat_template/system, and are evaluated by validation loss and free
generation (BLEU-4, ROUGE-L, exact match, ...) with lora.generation's decoding settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from loragen import rundir, runtime
from loragen.data import dataset_specs, load_split, subtasks
from loragen.data.records import TextRecord
from loragen.data.registry import LoadedSplit, data_options, heldout_split
from loragen.errors import ConfigError
from loragen.evaluation import GenerationSettings, TextEvalOutcome, evaluate_records, evaluate_texts
from loragen.evaluation.results import result_entry, sample_rows, write_results
from loragen.fingerprint import TRAJECTORY_NEUTRAL, strip
from loragen.lora.adapter_io import write_adapter
from loragen.lora.init import attach_lora, disable_dropout
from loragen.lora.snapshot import AdapterSnapshot
from loragen.models import load_model
from loragen.provenance import provenance
from loragen.tracking import make_tracker
from loragen.train import BestCheckpoint, Checkpointer, fit
from loragen.train.objectives import Objective, make_objective, mean_loss, record_type_of
from loragen.train_env import make_accelerator

log = logging.getLogger(__name__)
TEXT_EVAL_METRICS = ("bleu", "rouge_l", "exact_match", "embed_sim", "success_rate", "gen_tokens")  # periodic eval


def run(cfg: DictConfig) -> dict:
    out = runtime.run_dir()
    specs = training_specs(cfg)
    spec = specs[0]
    multitask = len(specs) > 1
    data_kw = data_options(cfg)

    # setup
    accelerator = make_accelerator(cfg)
    if multitask:
        parts = [load_split(s, str(s.train_split), limit=cfg.lora.train_limit, **data_kw) for s in specs]
        train_split = mixture(parts, cfg.train.max_steps * global_batch(cfg, accelerator), cfg.train.seed)
    else:
        train_split = subtasks.restrict(spec, load_split(spec, str(spec.train_split), **data_kw), cfg.paths,
                                        limit=cfg.lora.train_limit)  # dataset.subtasks.select: one sub-task
    record_type = record_type_of(train_split.records)
    generation = GenerationSettings.from_cfg(cfg.lora.generation, seed=cfg.seed)
    held_name = heldout_split(spec)
    lm = load_model(cfg.model, cfg.paths, cfg.hardware.precision, accelerator.device, cfg.hardware.cpu_linear)
    if not cfg.lora.base_dropout:
        disable_dropout(lm.model)
    model = attach_lora(lm.model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                        target_modules=list(cfg.lora.target_modules), init_seed=cfg.lora.init_seed)
    objective = make_objective(lm.kind, lm.tokenizer, max_length=cfg.lora.max_length,
                               temperature=cfg.lora.temperature, record_type=record_type,
                               chat_template=generation.chat_template, system=generation.system)
    checkpointer = Checkpointer(out / rundir.CHECKPOINTS, AdapterSnapshot(model).deferred_write, every=cfg.ckpt.every,
                                start_step=cfg.ckpt.start_step, keep_last=cfg.ckpt.keep_last,
                                is_main=accelerator.is_main_process)
    best = None
    if cfg.ckpt.best_metric:
        best = BestCheckpoint(out, lambda path: save_adapter(model, path), metric=str(cfg.ckpt.best_metric),
                              mode=cfg.ckpt.best_mode, is_main=accelerator.is_main_process)
    eval_fn = None
    if cfg.train.eval_every > 0:
        slice_ = load_split(spec, held_name, limit=cfg.lora.eval_limit, **data_kw)
        eval_fn = make_eval_fn(lm, slice_, cfg, accelerator, objective, generation,
                               with_loss=record_type is TextRecord or (best is not None and best.metric == "loss"))
    tracker = make_tracker(cfg, out, accelerator.is_main_process)

    # train
    result = fit(model, objective.loss, train_split.records, objective.collate, cfg.train, accelerator=accelerator,
                 state_dir=out / rundir.STATE, fingerprint=trajectory_id(cfg, specs), tracker=tracker, eval_fn=eval_fn,
                 checkpointer=checkpointer, data_name=f"dataset {train_split.dataset} split {spec.train_split!r}",
                 best=best)
    if result.status != "completed":  # stopped by a signal after saving its state: no final/, never "done"
        tracker.finish()
        result.raise_if_interrupted()  # SIGTERM/SIGINT: errors.Interrupted, exit 143/130
        return {"status": result.status, "step": result.step}  # preempted: SLURM requeues the job

    # save and evaluate
    if accelerator.is_main_process:
        save_adapter(model, out / rundir.FINAL)
    accelerator.wait_for_everyone()
    helds = [load_split(s, heldout_split(s), limit=cfg.lora.final_eval_limit, **data_kw) for s in specs]
    entries, samples = [], []
    runs = ([("base", None)] if cfg.lora.eval_base else []) + [("final", str(out / rundir.FINAL))]
    if best is not None and best.record is not None:
        if best.record["step"] == result.step:
            log.info("the best adapter by %s is the final one (step %d)", best.metric, result.step)
        else:
            runs.append(("best", str(best.dir)))
    for label, path in runs:
        for held in helds:
            outcome = score(model, lm, held, cfg, accelerator, label, path, generation)
            entry = result_entry(label, path, lm.name, lm.path, held, outcome)
            if isinstance(outcome, TextEvalOutcome):
                with active(model, label, path):
                    entry["loss"] = mean_loss(model, objective, held.records,
                                              batch_size=cfg.hardware.eval_batch_size, accelerator=accelerator)
            entries.append(entry)
            samples += sample_rows(label, held.dataset, outcome)
            log_entry(held.dataset, held.split, entry)
    tracker.log({f"final/{e['label']}_{k}": e[k] for e in entries for k in ("acc", "bleu", "rouge_l", "loss") if k in e},
                step=result.step)
    tracker.finish()
    data_sha = {**({s.dataset: s.sha256 for s in parts} if multitask else {spec.name: train_split.sha256}),
                **{f"{h.dataset}:{h.split}": h.sha256 for h in helds}}
    prov = provenance(cfg, data_sha, accelerator.num_processes)
    if accelerator.is_main_process:
        write_results(out, entries, samples, prov)
        log.info("final adapter in %s; results in %s", out / rundir.FINAL, out / rundir.RESULTS)
    return {"status": "completed", "step": result.step, "results": entries, "history": result.history,
            "best": best.record if best is not None else None}


def single_dataset(cfg: DictConfig) -> DictConfig:
    specs = dataset_specs(cfg.dataset)
    if len(specs) != 1:
        raise ConfigError(f"stage=lora trains on one dataset; dataset={cfg.dataset.name} has {len(specs)} "
                          f"({', '.join(s.name for s in specs)}). Sweep them: loragen -m stage=lora dataset=a,b,...; "
                          f"or one multi-task LoRA on their union: lora.datasets=[a,b,...]")
    return specs[0]


def training_specs(cfg: DictConfig) -> list[DictConfig]:
    """The dataset trained on, or with lora.datasets the members of dataset=<collection> a multi-task LoRA mixes."""
    if not cfg.lora.datasets:
        return [single_dataset(cfg)]
    specs = {s.name: s for s in dataset_specs(cfg.dataset)}
    names = list(cfg.lora.datasets)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ConfigError(f"lora.datasets names {unknown}, not members of dataset={cfg.dataset.name} "
                          f"(its members: {sorted(specs)})")
    chosen = [specs[n] for n in names]
    split = [s.name for s in chosen if subtasks.enabled(s)]
    if split:
        raise ConfigError(f"lora.datasets: {split} have dataset.subtasks set; a multi-task LoRA trains on whole "
                          "datasets (their union is the same data)")
    return chosen


def global_batch(cfg: DictConfig, accelerator) -> int:
    return cfg.train.per_device_batch * accelerator.num_processes * cfg.train.grad_accum


def mixture(parts: list[LoadedSplit], length: int, seed: int) -> LoadedSplit:
    """`length` records of the union of `parts`, interleaved by a seeded sampler: each position draws a dataset
    uniformly, then that dataset's next record of its own seeded permutation (recycled when exhausted), so
    every dataset weighs the same whatever its size, as every task does in the generator's training."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    orders = [torch.randperm(len(p.records), generator=g).tolist() for p in parts]
    pos = [0] * len(parts)
    records = []
    for k in torch.randint(len(parts), (length,), generator=g).tolist():
        records.append(parts[k].records[orders[k][pos[k] % len(orders[k])]])
        pos[k] += 1
    log.info("multi-task LoRA: %d records from %s (%s of each)", length, [p.dataset for p in parts], pos)
    return LoadedSplit(dataset="+".join(p.dataset for p in parts), split="+".join(p.split for p in parts),
                       records=records, source=", ".join(p.source for p in parts),
                       sha256=hashlib.sha256("".join(str(p.sha256) for p in parts).encode()).hexdigest(),
                       has_acc_norm=parts[0].has_acc_norm)


def save_adapter(peft_model, path: Path) -> None:
    from peft import get_peft_model_state_dict

    write_adapter(path, config=peft_model.peft_config["default"].to_dict(), tensors=get_peft_model_state_dict(peft_model))


@contextlib.contextmanager
def active(model, label: str, path: str | None):
    """The PEFT model with the adapter of `label` active: none (base), the trained one (final) or `path` (best)."""
    model.eval()
    if path is None:
        with model.disable_adapter():
            yield model
    elif label == "final":
        yield model
    else:
        model.load_adapter(path, adapter_name=label, is_trainable=False)
        model.set_adapter(label)
        try:
            yield model
        finally:
            model.set_adapter("default")
            model.delete_adapter(label)


def score(model, lm, split: LoadedSplit, cfg: DictConfig, accelerator, label: str, path: str | None,
          generation: GenerationSettings):
    with active(model, label, path):
        if split.is_text:
            return evaluate_texts(model, lm.tokenizer, lm.kind, split.records, generation=generation,
                                  batch_size=cfg.hardware.eval_batch_size, language=split.meta.get("language"),
                                  accelerator=accelerator, desc=f"eval {label}")
        return evaluate_records(model, lm.tokenizer, lm.kind, split.records, batch_size=cfg.hardware.eval_batch_size,
                                accelerator=accelerator, desc=f"eval {label}", has_acc_norm=split.has_acc_norm)


def make_eval_fn(lm, split: LoadedSplit, cfg: DictConfig, accelerator, objective: Objective,
                 generation: GenerationSettings, *, with_loss: bool):
    """Periodic evaluation on the held-out slice: eval_loss (prompt -> text data, or when it picks the best
    checkpoint), eval_acc (multiple choice), text metrics (prompt -> text data with lora.eval_generate)."""
    batch_size = cfg.hardware.eval_batch_size

    def eval_fn(model) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if with_loss:
            metrics["eval_loss"] = mean_loss(model, objective, split.records, batch_size=batch_size, accelerator=accelerator)
        if not split.is_text:
            o = evaluate_records(model, lm.tokenizer, lm.kind, split.records, batch_size=batch_size,
                                 accelerator=accelerator, desc="eval", has_acc_norm=split.has_acc_norm)
            metrics["eval_acc"] = o.acc
            if o.acc_norm is not None:
                metrics["eval_acc_norm"] = o.acc_norm
        elif cfg.lora.eval_generate:
            o = evaluate_texts(model, lm.tokenizer, lm.kind, split.records, generation=generation, batch_size=batch_size,
                               language=split.meta.get("language"), accelerator=accelerator, desc="eval")
            metrics.update({f"eval_{k}": float(o.metrics[k]) for k in TEXT_EVAL_METRICS})
        return metrics

    return eval_fn


def log_entry(dataset: str, split: str, e: dict) -> None:
    if "acc" in e:
        log.info("%-6s %s %s: acc %.4f ± %.4f (n=%d)", e["label"], dataset, split, e["acc"], e["acc_stderr"], e["n"])
    else:
        log.info("%-6s %s %s: loss %.4f  BLEU-4 %.2f  ROUGE-L %.4f  EM %.4f  success %.4f (n=%d)", e["label"], dataset,
                 split, e["loss"], e["bleu"], e["rouge_l"], e["exact_match"], e["success_rate"], e["n"])


def trajectory_id(cfg: DictConfig, specs: list[DictConfig]) -> dict:
    """What makes a training trajectory: resuming with any of these changed is refused."""
    spec = specs[0]
    lora = strip(OmegaConf.to_container(cfg.lora, resolve=True), TRAJECTORY_NEUTRAL, prefix="lora")
    if lora.get("datasets") is None:
        lora.pop("datasets", None)  # single-dataset runs keep the fingerprint they had before lora.datasets existed
    task = subtasks.task_name(spec.name, subtasks.selected(spec))  # <dataset>@<group> when one sub-task
    if len(specs) > 1:
        task = "+".join(s.name for s in specs)
    return {"model": cfg.model.name, "dataset": task, "train_split": str(spec.train_split), "lora": lora,
            "precision": cfg.hardware.precision}
