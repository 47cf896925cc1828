"""One validation per stage: the value ranges and cross-key rules of its config, checked by `run_stage` (and by
the pipeline engine for every step) before any model, tokenizer or dataset is loaded and before any SLURM
submission. Types and the set of keys are the schemas' job (loragen.schema, at compose time)."""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from loragen.errors import ConfigError


def _need(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}; expected {expected}")


def check_train(t: DictConfig) -> None:
    from loragen.train.loop import RESUME
    from loragen.train.schedule import SCHEDULES

    _need(t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1")
    _need(t.lr > 0, "train.lr", t.lr, "> 0")
    _need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    _need(t.schedule in SCHEDULES, "train.schedule", t.schedule, f"one of {SCHEDULES}")
    _need(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0")
    _need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "in [0, 1]")
    _need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1")
    _need(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, ">= 0 (0 = no clipping)")
    _need(t.per_device_batch >= 1, "train.per_device_batch", t.per_device_batch, ">= 1")
    _need(t.resume in RESUME, "train.resume", t.resume, f"one of {RESUME}")
    for key in ("save_state_every", "eval_every"):
        _need(t[key] >= 0, f"train.{key}", t[key], ">= 0 (0 = off)")
    _need(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")


def check_lora(cfg: DictConfig) -> None:
    from loragen.train.checkpoints import ALIASES, MAXIMIZE, MINIMIZE, MODES

    check_train(cfg.train)
    lo, ck = cfg.lora, cfg.ckpt
    _need(lo.r >= 1, "lora.r", lo.r, ">= 1")
    _need(lo.alpha > 0, "lora.alpha", lo.alpha, "> 0")
    _need(0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "in [0, 1)")
    _need(lo.temperature > 0, "lora.temperature", lo.temperature, "> 0")
    _need(lo.max_length >= 2, "lora.max_length", lo.max_length, ">= 2")
    for key in ("train_limit", "eval_limit", "final_eval_limit"):
        _need(lo[key] is None or lo[key] >= 1, f"lora.{key}", lo[key], "null or >= 1")
    _need(ck.every >= 0, "ckpt.every", ck.every, ">= 0 (0 = off)")
    _need(ck.start_step >= 0, "ckpt.start_step", ck.start_step, ">= 0")
    _need(ck.keep_last is None or ck.keep_last >= 1, "ckpt.keep_last", ck.keep_last, "null or >= 1")
    _need(ck.best_mode is None or ck.best_mode in MODES, "ckpt.best_mode", ck.best_mode, f"null or one of {MODES}")
    if ck.best_metric:
        name = str(ck.best_metric).removeprefix("eval_")
        known = ck.best_mode is not None or ALIASES.get(name, name) in MAXIMIZE + MINIMIZE
        _need(known, "ckpt.best_metric", ck.best_metric, f"one of {MAXIMIZE + MINIMIZE} (or set ckpt.best_mode)")
        if cfg.train.eval_every <= 0:
            raise ConfigError(f"ckpt.best_metric={ck.best_metric} needs periodic evaluations: set train.eval_every > 0")
    if lo.datasets and cfg.train.eval_every > 0:
        raise ConfigError("lora.datasets (a multi-task LoRA) has no one held-out split for periodic evaluations: "
                          "use train.eval_every=0 (the final evaluation scores every dataset's held-out split)")


def check_evaluate(cfg: DictConfig) -> None:
    from loragen.stages.evaluate import METHODS, OVERLONG

    ev = cfg.eval
    _need(ev.method in METHODS, "eval.method", ev.method, f"one of {METHODS}")
    _need(ev.overlong in OVERLONG, "eval.overlong", ev.overlong, f"one of {OVERLONG}")
    _need(ev.limit is None or ev.limit >= 1, "eval.limit", ev.limit, "null or >= 1")
    _need(ev.sample_ratio is None or 0 < ev.sample_ratio <= 1, "eval.sample_ratio", ev.sample_ratio, "null or in (0, 1]")
    _need(ev.batch_size >= 1, "eval.batch_size", ev.batch_size, ">= 1")
    _need(ev.num_fewshot >= 0, "eval.num_fewshot", ev.num_fewshot, ">= 0")
    _need(ev.adapters is None or not isinstance(ev.adapters, str), "eval.adapters", ev.adapters,
          "a list of adapter dirs or {label: dir}")


def check_tokenize(cfg: DictConfig) -> None:
    from loragen.lora.tokenize.layout import SCHEMES

    tk = cfg.tokenize
    _need(tk.scheme in SCHEMES, "tokenize.scheme", tk.scheme, f"one of {SCHEMES}")
    _need(tk.max_checkpoints is None or tk.max_checkpoints >= 1, "tokenize.max_checkpoints", tk.max_checkpoints,
          "null or >= 1")
    _need(tk.chunk is None or tk.chunk >= 1, "tokenize.chunk", tk.chunk, "null or >= 1")
    _need(tk.token_shape is None or (len(tk.token_shape) == 2 and min(tk.token_shape) >= 1), "tokenize.token_shape",
          tk.token_shape, "null or [h, w] of positive ints")
    if not tk.checkpoints:
        raise ConfigError("tokenize.checkpoints is not set; pass a lora run dir or a directory of PEFT adapter dirs")


def check_generator(cfg: DictConfig) -> None:
    from loragen.stages.generator import check_objective

    check_train(cfg.train)
    g = cfg.generator
    for key in ("num_prompts", "prompt_len", "prompt_pool", "eval_adapters"):
        _need(g[key] >= 1, f"generator.{key}", g[key], ">= 1")
    _need(g.kernel_size >= 1 and g.kernel_size % 2 == 1, "generator.kernel_size", g.kernel_size, "an odd int >= 1")
    _need(g.task.batch_size >= 1, "generator.task.batch_size", g.task.batch_size, ">= 1 labeled records a sample")
    check_objective(cfg)


def check_generate(cfg: DictConfig) -> None:
    g = cfg.generate
    if not g.checkpoint:
        raise ConfigError("generate.checkpoint is not set: give the run dir of a stage=generator run")
    _need(g.num_adapters >= 1, "generate.num_adapters", g.num_adapters, "at least 1")
    if g.prompts and g.descriptions:
        raise ConfigError("generate.prompts and generate.descriptions are both set; give one")


def check_transfer(cfg: DictConfig) -> None:
    from loragen.lora.transfer import LAYER_MAPS

    t = cfg.transfer
    _need(t.rank_svd >= 1, "transfer.rank_svd", t.rank_svd, ">= 1")
    if not 0 <= t.similarity_threshold <= 1:
        raise ConfigError(f"transfer.similarity_threshold={t.similarity_threshold:g} is outside [0, 1] (similarities "
                          "lie in [0, 1])")
    _need(t.layer_map in LAYER_MAPS, "transfer.layer_map", t.layer_map, f"one of {LAYER_MAPS}")


def check_pipeline(cfg: DictConfig) -> None:
    from loragen.stages.pipeline import EXECUTORS, RECIPES

    p = cfg.pipeline
    _need(p.recipe in RECIPES, "pipeline.recipe", p.recipe, f"one of {sorted(RECIPES)} (set by experiment=...)")
    _need(p.executor in EXECUTORS, "pipeline.executor", p.executor, f"one of {sorted(EXECUTORS)}")
    _need(p.workers >= 1, "pipeline.workers", p.workers, ">= 1")
    _need(p.workers == 1 or p.executor == "local", "pipeline.workers", p.workers,
          f"1 with pipeline.executor={p.executor} (worker processes are the local executor's; submitit and SLURM "
          "run a wave's steps as one job array)")
    if p.recipe == "dnd":
        d = p.dnd
        _need(d.num_generated >= 1, "pipeline.dnd.num_generated", d.num_generated, ">= 1")
        _need(d.multitask_steps is None or d.multitask_steps >= 1, "pipeline.dnd.multitask_steps", d.multitask_steps,
              "null or >= 1")
        unknown = [h for h in (d.heldout or []) if h not in d.datasets]
        _need(not unknown, "pipeline.dnd.heldout", list(d.heldout or []), f"names among pipeline.dnd.datasets {list(d.datasets)}")


VALIDATORS: dict[str, Callable[[DictConfig], None]] = {
    "lora": check_lora, "evaluate": check_evaluate, "tokenize": check_tokenize, "generator": check_generator,
    "generate": check_generate, "transfer": check_transfer, "pipeline": check_pipeline,
}


def check_hardware(hw: DictConfig) -> None:
    from loragen.models.cpu_linear import BACKENDS
    from loragen.models.registry import DTYPES

    _need(hw.precision in DTYPES, "hardware.precision", hw.precision, f"one of {sorted(DTYPES)}")
    _need(hw.cpu_linear in BACKENDS, "hardware.cpu_linear", hw.cpu_linear, f"one of {list(BACKENDS)}")


def validate(cfg: DictConfig) -> None:
    """The hardware's and the stage's checks (no-op for stages without any)."""
    if "hardware" in cfg:
        check_hardware(cfg.hardware)
    check = VALIDATORS.get(str(cfg.stage.name))
    if check is not None:
        check(cfg)
