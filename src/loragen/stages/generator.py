"""stage=generator: train the HyperConv prompt-to-weights generator on the token sets of several datasets.

    loragen stage=generator dataset=commonsense6 generator.heldout=arc_challenge \
        generator.tokens.arc_easy=<tokenize run> generator.tokens.arc_challenge=<tokenize run> ...

generator.objective=reconstruction (default): each training sample pairs a random checkpoint of dataset d with
a fresh random batch of N cached prompts of d; =task: the batch of prompts with a labeled mini-batch of d, the
generated LoRA applied to the frozen base model and trained on stage=lora's loss (loragen.generator.task_objective);
=mix: both losses, weighted by loss.recon_weight / loss.task_weight. generator.condition=description takes the
prompts from the dataset configs' task descriptions instead of its questions. The questions are the train
split's, unlabeled (a sub-task `<dataset>@<group>` in generator.datasets: those of its group, see
loragen.data.subtasks). With `generator.heldout=<d>`, d is left out of
training; every `train.eval_every` steps the generator rebuilds d's LoRA from its eval-split prompts
and the errors are logged, and at the end it is compared with the baselines (see generator.baselines):
the held-out dataset's own LoRA (oracle), the weight average of the training LoRAs, the training LoRA
with the nearest prompts, and the mean checkpoint. Outputs: `generator/` (weights + config + layout),
`baselines/<name>/` PEFT dirs, `generated/gen-XXX/` adapters for the held-out dataset, `metrics.json`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from loragen import io, rundir, runtime
from loragen.errors import CheckpointError, ConfigError
from loragen.generator import baselines as bl
from loragen.generator.checkpoint import generator_config, save_generator
from loragen.generator.prompts import DESCRIPTION, dataset_prompts, dataset_spec, descriptions, task_split
from loragen.generator.task_objective import FunctionalLoRA, task_objective
from loragen.generator.tasks import (
    PairSamples,
    Task,
    check_layouts,
    collate,
    labeled_collate,
    mean_checkpoint,
    mean_token_std,
    pick,
    prompt_batches,
    token_dir_of,
)
from loragen.lora.adapter_io import Adapter, is_adapter_dir, read_adapter, write_adapter
from loragen.lora.tokenize import Layout, TokenSet, detokenize, load_token_set
from loragen.models import load_model
from loragen.models.hyperconv import HyperConvDecoder
from loragen.models.prompt_cache import PromptStateCache, prompt_pool
from loragen.models.text_encoder import TextEncoder, load_text_encoder
from loragen.models.token_loss import token_loss, token_metrics, token_weights
from loragen.tracking import make_tracker
from loragen.train import fit
from loragen.train_env import make_accelerator

log = logging.getLogger(__name__)


OBJECTIVES = ("reconstruction", "task", "mix")
CONDITIONS = ("prompts", "description")


def run(cfg: DictConfig) -> dict:
    g = cfg.generator
    objective, condition = check_objective(cfg)
    out = runtime.run_dir()
    acc = make_accelerator(cfg)
    gen_cfg = generator_config(cfg)
    names, heldout = dataset_names(cfg)

    # setup: token sets (targets, or only the layout for the task objective), encoder + cached prompt states
    needs_targets = objective != "task"
    with_tokens = [n for n in names + ([heldout] if heldout else []) if needs_targets or (g.tokens.get(n))]
    if not with_tokens:
        raise ConfigError("generator.tokens names no token set; the task objective still needs one (of any task, "
                          "e.g. the held-out dataset's) for the layout of the adapters it generates")
    token_sets = {n: load_token_set(token_dir_of(g.tokens, n)) for n in with_tokens}
    check_layouts(token_sets, gen_cfg["features"][-1], {n: str(token_dir_of(g.tokens, n)) for n in token_sets})
    layout = next(iter(token_sets.values())).layout
    mask = layout.mask()
    encoder = load_text_encoder(g.encoder, cfg.paths, int(g.prompt_len))
    _check_encoder(encoder, gen_cfg)
    cache = PromptStateCache(cfg.paths.cache_dir, encoder)
    tasks = [load_task(cfg, n, token_sets.get(n), cache, str(dataset_spec(cfg, n).train_split), condition)
             for n in names]
    held = load_task(cfg, heldout, token_sets.get(heldout), cache, str(dataset_spec(cfg, heldout).eval_split),
                     condition) if heldout else None

    # the frozen base model the task objective trains through, and the model
    flora = None
    if objective != "reconstruction":
        for t in tasks:
            t.records = task_split(cfg, t.name, str(dataset_spec(cfg, t.name).train_split)).records
        lm = load_model(cfg.model, cfg.paths, cfg.hardware.precision, acc.device, cfg.hardware.cpu_linear)
        flora = FunctionalLoRA(lm, layout, task_objective(lm, g.task, tasks[0].records), init_seed=int(g.init_seed))
    base = None
    if gen_cfg["residual"]:
        base = flora.init_tokens(float(g.task.zero_std)) if objective == "task" else mean_checkpoint(tasks)
    torch.manual_seed(cfg.train.seed)  # the init depends on the seed alone, not on what ran before
    model = HyperConvDecoder(gen_cfg["features"], gen_cfg["kernel_size"], base=base,
                             border_bound=gen_cfg["border_bound"])
    weights = token_weights(mean_token_std(tasks)) if needs_targets else None
    samples = PairSamples(tasks, int(g.num_prompts), noise_cond=float(g.noise_cond),
                          noise_target=float(g.noise_target), seed=cfg.train.seed, targets=needs_targets,
                          task_batch=int(g.task.batch_size) if flora is not None else 0)
    log.info("generator: %.2fM parameters, objective %s, conditioned on %s; training on %d tasks %s%s",
             sum(p.numel() for p in model.parameters()) / 1e6, objective, condition, len(names), names,
             f", {heldout} held out" if heldout else "")

    def recon_loss(pred: torch.Tensor, batch: dict) -> torch.Tensor:
        return token_loss(pred, batch["target"].to(pred.device), mask.to(pred.device), weights.to(pred.device),
                          mse_weight=cfg.loss.mse_weight, l1_weight=cfg.loss.l1_weight)

    def task_loss(pred: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        total, units = pred.new_zeros(()), 0
        for tokens, labeled in zip(pred, batch["labeled"]):
            loss, n = flora.loss(tokens, labeled)
            total, units = total + loss, units + int(n)
        return total, units

    def loss_fn(m: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        pred = m(batch["cond"].to(acc.device))
        n = pred.shape[0]
        if objective == "reconstruction":
            return recon_loss(pred, batch) * n, n
        if objective == "task":
            return task_loss(pred, batch)
        total, units = task_loss(pred, batch)
        mixed = cfg.loss.recon_weight * recon_loss(pred, batch) + cfg.loss.task_weight * total / units
        return mixed * n, n

    # loop: the one training loop, with reconstruction errors (or the task loss) as its evaluation
    eval_batches = _eval_batches(tasks, held, int(g.num_prompts), int(g.eval_adapters), cfg.seed)
    can_reconstruct = all(t.tokens is not None for t in tasks)
    evaluate = (lambda m: reconstruction(m, eval_batches, mask, layout)) if can_reconstruct else \
        (lambda m: train_task_loss(m, eval_batches, flora, samples.task_batch, cfg.seed))
    tracker = make_tracker(cfg, out, acc.is_main_process)
    collate_fn = labeled_collate(flora.objective.collate) if flora is not None else collate
    result = fit(model, loss_fn, samples, collate_fn, cfg.train, accelerator=acc, state_dir=out / rundir.STATE,
                 fingerprint={"generator": OmegaConf.to_container(g, resolve=True), "loss": dict(cfg.loss)},
                 tracker=tracker, eval_fn=evaluate, data_name="the generator's (prompt batch, target) samples")
    if result.status != "completed":  # stopped by a signal after saving its state
        tracker.finish()
        result.raise_if_interrupted()  # SIGTERM/SIGINT: errors.Interrupted, exit 143/130
        return {"status": result.status, "step": result.step}  # preempted: SLURM requeues the job

    # save: the generator, and on a held-out dataset the generated adapters and the baselines
    summary: dict[str, Any] = {"status": "completed", "step": result.step, "datasets": names, "heldout": heldout,
                               "objective": objective, "condition": condition, "final": evaluate(model.eval())}
    if acc.is_main_process:
        save_generator(out, model, gen_cfg, layout, {
            "datasets": names, "heldout": heldout, "objective": objective, "condition": condition,
            "dataset_specs": {t.name: OmegaConf.to_container(dataset_spec(cfg, t.name), resolve=True)
                              for t in tasks + ([held] if held else [])},
            "tokens": {t.name: t.token_dir for t in tasks + ([held] if held else [])},
            "prompt_splits": {t.name: t.split for t in tasks + ([held] if held else [])},
        })
        if held is not None:
            summary["heldout_eval"] = compare_with_baselines(model, held, tasks, eval_batches["heldout"], out, layout)
        io.write_json(out / rundir.METRICS, {**summary, "history": result.history})
    tracker.finish()
    return summary


def check_objective(cfg: DictConfig) -> tuple[str, str]:
    """generator.objective / condition and the task objective's keys, checked before anything loads."""
    g = cfg.generator
    objective, condition = str(g.objective), str(g.condition)
    if objective not in OBJECTIVES:
        raise ConfigError(f"generator.objective={objective!r}; expected one of {OBJECTIVES}")
    if condition not in CONDITIONS:
        raise ConfigError(f"generator.condition={condition!r}; expected one of {CONDITIONS}")
    if objective != "reconstruction":
        if int(g.task.batch_size) < 1:
            raise ConfigError(f"generator.task.batch_size={g.task.batch_size}; expected >= 1 labeled records a sample")
        if float(g.task.temperature) <= 0:
            raise ConfigError(f"generator.task.temperature={g.task.temperature}; expected > 0")
    if objective != "reconstruction" and float(g.task.zero_std) < 0:
        raise ConfigError(f"generator.task.zero_std={g.task.zero_std}; expected >= 0 (0: the std floor)")
    if objective == "mix" and min(cfg.loss.recon_weight, cfg.loss.task_weight) < 0:
        raise ConfigError(f"loss.recon_weight={cfg.loss.recon_weight}, loss.task_weight={cfg.loss.task_weight}; "
                          "expected weights >= 0")
    return objective, condition


@torch.no_grad()
def train_task_loss(model: torch.nn.Module, eval_batches: dict, flora: FunctionalLoRA, batch_size: int,
                    seed: int) -> dict[str, float]:
    """The task loss per unit of each training task's generated adapters on a fixed labeled batch of its train
    split (the task objective's evaluation when there is no trajectory to compare with); never held-out data."""
    total, units = 0.0, 0
    for b in eval_batches["train"]:
        task = b["task"]
        gen = torch.Generator().manual_seed(seed)
        batch = flora.objective.collate([task.records[j] for j in pick(len(task.records), batch_size, gen).tolist()])
        for tokens in generate_tokens(model, b["cond"]):
            loss, n = flora.loss(tokens.to(next(model.parameters()).device), batch)
            total, units = total + float(loss), units + int(n)
    return {"train_task_loss": total / max(units, 1)}


def dataset_names(cfg: DictConfig) -> tuple[list[str], str | None]:
    """The training datasets (generator.datasets, default: every member of cfg.dataset, minus the held-out one)."""
    from loragen.data import dataset_specs

    all_names = list(cfg.generator.datasets or [s.name for s in dataset_specs(cfg.dataset)])
    for n in all_names:
        dataset_spec(cfg, n)  # names a dataset of cfg.dataset
    heldout = cfg.generator.heldout
    if heldout and heldout not in all_names:
        raise ConfigError(f"generator.heldout={heldout} is not one of the datasets {all_names}")
    names = [n for n in all_names if n != heldout]
    if not names:
        raise ConfigError(f"no training datasets left: generator.datasets={all_names}, generator.heldout={heldout}")
    return names, heldout


def load_task(cfg: DictConfig, name: str, tokens: TokenSet | None, cache: PromptStateCache, split: str,
              condition: str = "prompts") -> Task:
    """Dataset `name`: its token set and a fixed pool of its `split` prompts (or of its task descriptions) with
    their cached states."""
    if condition == "description":
        prompts, split = descriptions(cfg, name), DESCRIPTION
    else:
        prompts = prompt_pool(dataset_prompts(cfg, name, split), cfg.generator.prompt_pool, cfg.seed)
    token_dir = str(token_dir_of(cfg.generator.tokens, name)) if tokens is not None else None
    return Task(name, tokens, prompts, cache.states(prompts), split, token_dir)


def _check_encoder(encoder: TextEncoder, gen_cfg: dict) -> None:
    n, length, c = gen_cfg["features"][0]
    want = [gen_cfg["num_prompts"], gen_cfg["prompt_len"], encoder.hidden_size]
    if [n, length, c] != want:
        raise ConfigError(f"generator.features[0] = {[n, length, c]}; expected [num_prompts, prompt_len, encoder "
                          f"hidden size] = {want}")


def _eval_batches(tasks: list[Task], held: Task | None, num_prompts: int, count: int, seed: int) -> dict:
    """Fixed prompt batches for evaluation: `count` per task (training tasks and the held-out one)."""
    def batches(t: Task) -> dict:
        idx = prompt_batches(t.states.shape[0], num_prompts, count, seed, what=f"{t.name} ({t.split})")
        return {"task": t, "cond": torch.stack([t.states[i].float() for i in idx]), "prompt_idx": idx}
    out = {"train": [batches(t) for t in tasks]}
    if held is not None:
        out["heldout"] = batches(held)
    return out


@torch.no_grad()
def generate_tokens(model: torch.nn.Module, cond: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(cond.to(device)).float().cpu()


def reconstruction(model: torch.nn.Module, eval_batches: dict, mask: torch.Tensor, layout) -> dict[str, float]:
    """Token errors of the generated LoRAs against each task's final checkpoint (mean over tasks / batches)."""
    rows = []
    for b in eval_batches["train"]:
        pred = generate_tokens(model, b["cond"])
        rows.append(token_metrics(pred, b["task"].final_tokens().expand_as(pred), mask))
    metrics = {f"train_{k}": sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    if "heldout" in eval_batches and eval_batches["heldout"]["task"].tokens is not None:
        b = eval_batches["heldout"]
        pred = generate_tokens(model, b["cond"])
        metrics.update({f"heldout_{k}": v for k, v in token_metrics(pred, b["task"].final_tokens().expand_as(pred),
                                                                        mask).items()})
        oracle = detokenize(b["task"].final_tokens(), layout)
        metrics["heldout_weight_rel_error"] = sum(bl.relative_error(detokenize(p, layout), oracle)
                                                  for p in pred) / len(pred)
    return metrics


def final_lora(task: Task, layout: Layout) -> Adapter:
    """The task's trained LoRA: its last checkpoint as written by the lora stage when that file is still there and
    holds the tokenized tensors (so the nearest-prompt baseline is that LoRA itself, bit for bit, and evaluate scores
    it once); else its tokens detokenized (equal to float32 rounding)."""
    tokenized = detokenize(task.final_tokens(), layout)
    source = task.tokens.sources[-1] if task.tokens.sources else None
    if not source or not is_adapter_dir(source):
        return tokenized
    try:
        adapter = read_adapter(source)
    except CheckpointError as e:
        log.warning("task %s: cannot read its last checkpoint (%s); using its detokenized tokens", task.name, e)
        return tokenized
    if adapter.tensors.keys() == tokenized.tensors.keys() and all(
            v.shape == tokenized.tensors[k].shape and torch.allclose(
                v.float(), tokenized.tensors[k].float(), rtol=1e-4, atol=1e-4 * float(v.float().abs().max()))
            for k, v in adapter.tensors.items()):
        return adapter
    log.warning("task %s: its last checkpoint %s no longer holds the tensors of its token set; using its detokenized "
                "tokens", task.name, source)
    return tokenized


def compare_with_baselines(model: torch.nn.Module, held: Task, tasks: list[Task], batch: dict, out: Path,
                           layout: Layout) -> dict:
    """Write the generated adapters and the baselines as PEFT dirs; their errors against the held-out LoRA.

    The baselines need LoRA trajectories: the oracle the held-out task's, average / nearest / mean checkpoint
    every training task's; without them (the task objective on sub-tasks) only the generated adapters are written."""
    oracle = final_lora(held, layout) if held.tokens is not None else None
    candidates: dict[str, Any] = {}
    nearest, cosines = None, {}
    if oracle is not None:
        candidates["oracle"] = oracle
    if all(t.tokens is not None for t in tasks):
        finals = {t.name: final_lora(t, layout) for t in tasks}
        nearest, cosines = bl.nearest_by_prompts(held.prompt_embedding(),
                                                 {t.name: t.prompt_embedding() for t in tasks})
        candidates.update(average=bl.weight_average(list(finals.values())), nearest=finals[nearest],
                          mean_checkpoint=detokenize(mean_checkpoint(tasks), layout))
    error = (lambda a: bl.relative_error(a, oracle)) if oracle is not None else (lambda a: None)
    rows: dict[str, dict] = {}
    for name, adapter in candidates.items():
        path = write_adapter(out / rundir.BASELINES / name, adapter, extra_files={rundir.BASELINE_RECORD: {
            "baseline": name, "heldout": held.name, "nearest": nearest if name == "nearest" else None}})
        rows[name] = {"path": str(path), "weight_rel_error": error(adapter)}
    generated = []
    for i, tokens in enumerate(generate_tokens(model, batch["cond"])):
        adapter = detokenize(tokens, layout)
        prompts = [held.prompts[j] for j in batch["prompt_idx"][i].tolist()]
        path = write_adapter(out / rundir.GENERATED / rundir.generated_name(i), adapter, extra_files={rundir.PROMPTS_RECORD: {
            "prompts": prompts, "dataset": held.name, "split": held.split, "batch": i}})
        generated.append({"path": str(path), "weight_rel_error": error(adapter)})
    errors = [g["weight_rel_error"] for g in generated if g["weight_rel_error"] is not None]
    rows["generated"] = {"paths": [g["path"] for g in generated],
                         "weight_rel_error": sum(errors) / len(errors) if errors else None}
    if oracle is not None:
        log.info("held-out %s, relative weight error vs its own LoRA: %s", held.name,
                 ", ".join(f"{k} {v['weight_rel_error']:.3f}" for k, v in rows.items() if k != "oracle"))
    return {"dataset": held.name, "prompt_split": held.split, "nearest": nearest, "prompt_cosines": cosines,
            "adapters": rows}
