"""stage=generator: train the HyperConv prompt-to-weights generator on the token sets of several datasets.

    loragen stage=generator dataset=commonsense6 generator.heldout=arc_challenge \
        generator.tokens.arc_easy=<tokenize run> generator.tokens.arc_challenge=<tokenize run> ...

Each training sample pairs a random checkpoint of dataset d with a fresh random batch of N cached
prompts of d (its train split's unlabeled questions; a sub-task `<dataset>@<group>` in generator.datasets:
those of its group, see loragen.data.subtasks). With `generator.heldout=<d>`, d is left out of
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

from loragen import io, runtime
from loragen.errors import ConfigError
from loragen.generator import baselines as bl
from loragen.generator.checkpoint import generator_config, save_generator
from loragen.generator.prompts import dataset_prompts, dataset_spec
from loragen.generator.tasks import (
    PairSamples,
    Task,
    check_layouts,
    collate,
    mean_checkpoint,
    mean_token_std,
    prompt_batches,
    token_dir_of,
)
from loragen.lora.adapter_io import write_adapter
from loragen.lora.tokenize import TokenSet, detokenize, load_token_set
from loragen.models.hyperconv import HyperConvDecoder
from loragen.models.prompt_cache import PromptStateCache, prompt_pool
from loragen.models.text_encoder import TextEncoder, load_text_encoder
from loragen.models.token_loss import token_loss, token_metrics, token_weights
from loragen.tracking import make_tracker
from loragen.train import fit
from loragen.train_env import make_accelerator

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    g = cfg.generator
    out = runtime.run_dir()
    acc = make_accelerator(cfg)
    gen_cfg = generator_config(cfg)
    names, heldout = dataset_names(cfg)

    # setup: token sets, encoder + cached prompt states, model, loss
    token_sets = {n: load_token_set(token_dir_of(g.tokens, n)) for n in names + ([heldout] if heldout else [])}
    check_layouts(token_sets, gen_cfg["features"][-1], {n: str(token_dir_of(g.tokens, n)) for n in token_sets})
    encoder = load_text_encoder(g.encoder, cfg.paths, int(g.prompt_len))
    _check_encoder(encoder, gen_cfg)
    cache = PromptStateCache(cfg.paths.cache_dir, encoder)
    tasks = [load_task(cfg, n, token_sets[n], cache, str(dataset_spec(cfg, n).train_split)) for n in names]
    held = load_task(cfg, heldout, token_sets[heldout], cache, str(dataset_spec(cfg, heldout).eval_split)) \
        if heldout else None
    layout, mask = tasks[0].tokens.layout, tasks[0].tokens.mask
    model = HyperConvDecoder(gen_cfg["features"], gen_cfg["kernel_size"],
                             base=mean_checkpoint(tasks) if gen_cfg["residual"] else None)
    weights = token_weights(mean_token_std(tasks))
    samples = PairSamples(tasks, int(g.num_prompts), noise_cond=float(g.noise_cond),
                          noise_target=float(g.noise_target), seed=int(cfg.train.seed))
    log.info("generator: %.2fM parameters; training on %s%s", sum(p.numel() for p in model.parameters()) / 1e6,
             names, f", {heldout} held out" if heldout else "")

    def loss_fn(m: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        pred = m(batch["cond"].to(acc.device))
        n = pred.shape[0]
        loss = token_loss(pred, batch["target"].to(pred.device), mask.to(pred.device), weights.to(pred.device),
                          mse_weight=float(cfg.loss.mse_weight), l1_weight=float(cfg.loss.l1_weight))
        return loss * n, n

    # loop: the one training loop, with reconstruction errors as its evaluation
    eval_batches = _eval_batches(tasks, held, int(g.num_prompts), int(g.eval_adapters), int(cfg.seed))
    tracker = make_tracker(cfg, out, acc.is_main_process)
    result = fit(model, loss_fn, samples, collate, cfg.train, accelerator=acc, state_dir=out / "state",
                 fingerprint={"generator": OmegaConf.to_container(g, resolve=True), "loss": dict(cfg.loss)},
                 tracker=tracker, eval_fn=lambda m: reconstruction(m, eval_batches, mask, layout),
                 data_name="the generator's (prompt batch, checkpoint) pairs")
    if result.status != "completed":
        return {"status": result.status, "step": result.step}

    # save: the generator, and on a held-out dataset the generated adapters and the baselines
    summary: dict[str, Any] = {"status": "completed", "step": result.step, "datasets": names, "heldout": heldout,
                               "final": reconstruction(model.eval(), eval_batches, mask, layout)}
    if acc.is_main_process:
        save_generator(out, model, gen_cfg, layout, {
            "datasets": names, "heldout": heldout,
            "dataset_specs": {t.name: OmegaConf.to_container(dataset_spec(cfg, t.name), resolve=True)
                              for t in tasks + ([held] if held else [])},
            "tokens": {t.name: t.token_dir for t in tasks + ([held] if held else [])},
            "prompt_splits": {t.name: t.split for t in tasks + ([held] if held else [])},
        })
        if held is not None:
            summary["heldout_eval"] = compare_with_baselines(model, held, tasks, eval_batches["heldout"], out)
        io.write_json(out / "metrics.json", {**summary, "history": result.history})
    tracker.finish()
    return summary


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


def load_task(cfg: DictConfig, name: str, tokens: TokenSet, cache: PromptStateCache, split: str) -> Task:
    """Dataset `name`: its token set and a fixed pool of its `split` prompts with their cached states."""
    prompts = prompt_pool(dataset_prompts(cfg, name, split), int(cfg.generator.prompt_pool), int(cfg.seed))
    return Task(name, tokens, prompts, cache.states(prompts), split, str(token_dir_of(cfg.generator.tokens, name)))


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
    if "heldout" in eval_batches:
        b = eval_batches["heldout"]
        pred = generate_tokens(model, b["cond"])
        metrics.update({f"heldout_{k}": v for k, v in token_metrics(pred, b["task"].final_tokens().expand_as(pred),
                                                                        mask).items()})
        oracle = detokenize(b["task"].final_tokens(), layout)
        metrics["heldout_weight_rel_error"] = sum(bl.relative_error(detokenize(p, layout), oracle)
                                                  for p in pred) / len(pred)
    return metrics


def compare_with_baselines(model: torch.nn.Module, held: Task, tasks: list[Task], batch: dict, out: Path) -> dict:
    """Write the generated adapters and the baselines as PEFT dirs; their errors against the held-out LoRA."""
    layout = held.tokens.layout
    oracle = detokenize(held.final_tokens(), layout)
    finals = {t.name: detokenize(t.final_tokens(), layout) for t in tasks}
    nearest, cosines = bl.nearest_by_prompts(held.prompt_embedding(), {t.name: t.prompt_embedding() for t in tasks})
    candidates = {
        "oracle": oracle,
        "average": bl.weight_average(list(finals.values())),
        "nearest": finals[nearest],
        "mean_checkpoint": detokenize(mean_checkpoint(tasks), layout),
    }
    rows: dict[str, dict] = {}
    for name, adapter in candidates.items():
        path = write_adapter(out / "baselines" / name, adapter, extra_files={"baseline.json": {
            "baseline": name, "heldout": held.name, "nearest": nearest if name == "nearest" else None}})
        rows[name] = {"path": str(path), "weight_rel_error": bl.relative_error(adapter, oracle)}
    generated = []
    for i, tokens in enumerate(generate_tokens(model, batch["cond"])):
        adapter = detokenize(tokens, layout)
        prompts = [held.prompts[j] for j in batch["prompt_idx"][i].tolist()]
        path = write_adapter(out / "generated" / f"gen-{i:03d}", adapter, extra_files={"prompts.json": {
            "prompts": prompts, "dataset": held.name, "split": held.split, "batch": i}})
        generated.append({"path": str(path), "weight_rel_error": bl.relative_error(adapter, oracle)})
    rows["generated"] = {"paths": [g["path"] for g in generated],
                         "weight_rel_error": sum(g["weight_rel_error"] for g in generated) / len(generated)}
    log.info("held-out %s, relative weight error vs its own LoRA: %s", held.name,
             ", ".join(f"{k} {v['weight_rel_error']:.3f}" for k, v in rows.items() if k != "oracle"))
    return {"dataset": held.name, "prompt_split": held.split, "nearest": nearest, "prompt_cosines": cosines,
            "adapters": rows}
