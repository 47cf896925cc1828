"""stage=evaluate: the base model and any number of adapters on one or more datasets.

Recipe: load the splits and the base model once, check every adapter fits, then for each
(label, dataset) score through the one scorer (multiple choice) or generate and compute text
metrics (prompt->text data, eval.method=generate), and write results.json, samples.jsonl,
results.csv and results.md.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from loragen import fingerprint as fp
from loragen import io, rundir, runtime
from loragen.data import LoadedSplit, dataset_specs, load_split
from loragen.data.registry import data_options
from loragen.errors import CheckpointError, ConfigError
from loragen.evaluation import EvalOutcome, GenerationSettings, TextEvalOutcome, evaluate_records, evaluate_texts
from loragen.evaluation.adapters import AdapterSwitcher, check_adapter
from loragen.evaluation.prompting import with_chat_template, with_fewshot
from loragen.evaluation.results import result_entry, sample_rows, write_results
from loragen.lora.adapter_io import is_adapter_dir, not_an_adapter, read_adapter
from loragen.lora.svd_cache import weight_digest
from loragen.models import load_model
from loragen.provenance import provenance
from loragen.train_env import make_accelerator

log = logging.getLogger(__name__)
METHODS = ("loglikelihood", "generate")
OVERLONG = ("error", "truncate")
GENERATIVE = ("causal", "seq2seq")


def run(cfg: DictConfig) -> dict:
    out = runtime.run_dir()
    if (out / rundir.RESULTS).is_file() and not cfg.eval.overwrite:
        log.info("%s exists: evaluation already done (eval.overwrite=true to redo)", out / rundir.RESULTS)
        return io.read_json(out / rundir.RESULTS)
    if cfg.eval.method not in METHODS:
        raise ConfigError(f"eval.method={cfg.eval.method!r}; expected one of {METHODS}")

    # setup
    labelled = labelled_adapters(cfg.eval.adapters)
    for _, a in labelled:  # a wrong path fails before anything loads (a run dir: pointed to its adapter)
        if not is_adapter_dir(a):
            raise CheckpointError(not_an_adapter(a))
    accelerator = make_accelerator(cfg)
    splits = load_eval_splits(cfg)
    check_text_splits(cfg, splits)
    generation = GenerationSettings.from_cfg(cfg.eval.generation, seed=cfg.seed)
    lm = load_model(cfg.model, cfg.paths, cfg.hardware.precision, accelerator.device, cfg.hardware.cpu_linear)
    if cfg.eval.method == "generate" and lm.kind not in GENERATIVE:
        raise ConfigError(f"eval.method=generate needs a causal or seq2seq LM; model {lm.name} is an {lm.kind}")
    if cfg.eval.apply_chat_template:
        splits = [s if s.is_text else _replace_records(s, with_chat_template(s.records, lm.tokenizer)) for s in splits]
    for _, a in labelled:  # every adapter is checked before any scoring
        check_adapter(lm.model, a, model_name=lm.name, model_path=lm.path,
                      allow_base_mismatch=bool(cfg.eval.allow_base_mismatch), override="eval.allow_base_mismatch=true")
    runs = ([("base", None)] if cfg.eval.include_base else []) + labelled
    if not runs:
        raise ConfigError("nothing to evaluate: eval.include_base=false and eval.adapters is empty")

    # loop
    switcher = AdapterSwitcher(lm.model)
    entries, samples = [], []
    scored: dict[str | None, tuple[str, list]] = {}  # adapter digest -> (first label, its outcome per split)
    for label, path in runs:
        key = adapter_digest(path) if path else None
        same = scored.get(key)
        if same is not None:
            log.info("%s: the same adapter (config and weights) as %s; its scores are reused", label, same[0])
        else:
            model = switcher.use(path)
            outcomes = [evaluate_split(cfg, model, lm, split, generation, accelerator, desc=f"{label} {split.dataset}")
                        for split in splits]
            scored[key] = (label, outcomes)
        for split, outcome in zip(splits, scored[key][1], strict=True):
            entry = {**result_entry(label, path, lm.name, lm.path, split, outcome), "role": role_of(label, path)}
            if same is not None:
                entry["same_as"] = same[0]
            entries.append(entry)
            samples += sample_rows(label, split.dataset, outcome)
            log_outcome(label, split.dataset, outcome)

    # save
    prov = provenance(cfg, {s.dataset: s.sha256 for s in splits}, accelerator.num_processes)
    weight = next(lm.model.parameters())  # where it ran and in what dtype, as measured, not as requested
    prov.update(device=str(weight.device), dtype=str(weight.dtype).removeprefix("torch."))
    result = {"results": entries, "provenance": prov}
    if runtime.is_main():
        write_results(out, entries, samples, result["provenance"])
        print((out / rundir.RESULTS_MD).read_text())
        log.info("results in %s", out / rundir.RESULTS)
    return result


def adapter_digest(path: str) -> str:
    """A digest of an adapter's config and tensors (each by its bytes, dtype and shape): two labels with one digest
    score the same (the nearest-prompt baseline is a training dataset's LoRA, evaluated beside it)."""
    try:
        adapter = read_adapter(path, check_finite=False)
    except CheckpointError:  # scoring it reports what is wrong with it
        return f"unreadable:{path}"
    return fp.digest({"config": adapter.config, "tensors": {n: weight_digest(t) for n, t in adapter.tensors.items()}})


def evaluate_split(cfg: DictConfig, model, lm, split: LoadedSplit, generation: GenerationSettings, accelerator,
                   desc: str) -> EvalOutcome | TextEvalOutcome:
    if split.is_text:
        return evaluate_texts(model, lm.tokenizer, lm.kind, split.records, generation=generation,
                              batch_size=cfg.eval.batch_size, language=split.meta.get("language"),
                              accelerator=accelerator, desc=desc)
    letters = replace(generation, max_new_tokens=cfg.eval.generation.letter_max_new_tokens)
    return evaluate_records(model, lm.tokenizer, lm.kind, split.records, batch_size=cfg.eval.batch_size,
                            accelerator=accelerator, desc=desc, has_acc_norm=split.has_acc_norm,
                            method=cfg.eval.method, generation=letters, overlong=cfg.eval.overlong,
                            where=f"dataset {split.dataset} split {split.split}")


def log_outcome(label: str, dataset: str, outcome: EvalOutcome | TextEvalOutcome) -> None:
    if isinstance(outcome, TextEvalOutcome):
        m = outcome.metrics
        log.info("%-24s %-14s BLEU-4 %.2f  ROUGE-L %.4f  EM %.4f  success %.4f  (n=%d, %.1fs)", label, dataset,
                 m["bleu"], m["rouge_l"], m["exact_match"], m["success_rate"], outcome.n, outcome.seconds)
    else:
        log.info("%-24s %-14s acc %.4f ± %.4f%s  (n=%d, %.1fs)", label, dataset, outcome.acc, outcome.acc_stderr,
                 "" if outcome.acc_norm is None else f"  acc_norm {outcome.acc_norm:.4f}", outcome.n, outcome.seconds)
        if outcome.truncated:
            log.warning("%s %s: %d of %d documents had a choice longer than the model's context; its last tokens "
                        "were scored (eval.overlong=truncate)", label, dataset, outcome.truncated, outcome.n)


def load_eval_splits(cfg: DictConfig) -> list[LoadedSplit]:
    splits = []
    for spec in dataset_specs(cfg.dataset):
        split = load_split(
            spec, cfg.eval.split or spec.eval_split, limit=cfg.eval.limit, sample_ratio=cfg.eval.sample_ratio,
            **data_options(cfg),
        )
        if cfg.eval.num_fewshot and not split.is_text:
            pool = load_split(spec, cfg.eval.fewshot_split or spec.train_split, **data_options(cfg))
            split = _replace_records(split, with_fewshot(split.records, pool.records, cfg.eval.num_fewshot, cfg.seed))
        splits.append(split)
    return splits


def check_text_splits(cfg: DictConfig, splits: list[LoadedSplit]) -> None:
    """Prompt->text data is evaluated by eval.method=generate alone; the multiple-choice prompt options do not apply."""
    for s in (s for s in splits if s.is_text):
        if cfg.eval.method != "generate":
            raise ConfigError(f"dataset {s.dataset} holds prompt->text records (no choices to score): "
                              f"eval.method={cfg.eval.method} cannot evaluate it; use eval.method=generate")
        if cfg.eval.num_fewshot:
            raise ConfigError(f"dataset {s.dataset} holds prompt->text records: eval.num_fewshot={cfg.eval.num_fewshot} "
                              "applies to multiple-choice data only; use 0")
        if cfg.eval.apply_chat_template:
            raise ConfigError(f"dataset {s.dataset} holds prompt->text records: eval.apply_chat_template applies to "
                              "multiple-choice data only; prompts are rendered by eval.generation.chat_template "
                              "(auto | true | false)")


def labelled_adapters(adapters) -> list[tuple[str, str]]:
    """(label, path) of eval.adapters: a list of dirs (labels from their names) or a {label: dir} mapping."""
    if adapters is None:
        return []
    if isinstance(adapters, (dict, DictConfig)):
        return [(str(k), str(Path(v))) for k, v in adapters.items()]
    if isinstance(adapters, str):
        raise ConfigError(f"eval.adapters={adapters!r}; expected a list of adapter dirs ([dir,...]) or {{label: dir}}")
    paths = [str(Path(a)) for a in adapters]
    return list(zip(adapter_labels(paths), paths))


def role_of(label: str, path: str | None) -> str:
    """An entry's role in results.json: base; with eval.adapters={label: dir}, the label's first `/` part (the dnd
    pipeline's oracle, lora, average, nearest, multitask, generated, generated-<variant>); else adapter."""
    if path is None:
        return "base"
    return label.split("/")[0] if "/" in label or label in ROLE_LABELS else "adapter"


ROLE_LABELS = ("oracle", "average", "nearest", "multitask")


def adapter_labels(paths: list[str]) -> list[str]:
    """The directory name, or its last two parts where names repeat (e.g. several `final/`)."""
    names = [Path(p).name for p in paths]
    return [n if names.count(n) == 1 else "/".join(Path(p).parts[-2:]) for n, p in zip(names, paths)]


def _replace_records(split: LoadedSplit, records) -> LoadedSplit:
    return replace(split, records=list(records))
