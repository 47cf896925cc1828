"""The prompt-to-weights experiment (recipe `dnd`), leave-one-out over datasets.

Steps: a LoRA trajectory per dataset (all from one init seed) -> tokenize each -> for every
held-out dataset h: a generator trained on the others -> generate adapters from h's unlabeled
prompts -> evaluate on h: the base model, every dataset's final LoRA (h's own is the oracle),
the weight average and the nearest-prompt LoRA of the training datasets, and the generated
adapters. The table reports each against the base with a paired bootstrap 95% interval; the last
step (stage=report) draws the curves, accuracy charts, similarity matrices and timing into report/.

With sub-tasks (a dataset whose `dataset.members.<d>.subtasks.by` is set, see loragen.data.subtasks), the
tasks are `<d>@<group>`: each sub-task gets its own LoRA trajectory (`lora/<d>@<group>`, trained on its part
of d's train split) and is one generator training task. For a held-out dataset h, every sub-task of h is
left out of the generator and of the average / nearest baselines; the oracle is h's LoRA trained on its
whole train split (`lora/h`), and h is evaluated on its whole evaluation split as before.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from loragen import io
from loragen.data import load_split, subtasks
from loragen.data.registry import heldout_split
from loragen.errors import ConfigError, DataError
from loragen.evaluation.metrics import paired_bootstrap
from loragen.pipeline.engine import Step, quote

BASELINES = ("average", "nearest")


def _heldout(cfg: DictConfig) -> list[str]:
    d = cfg.pipeline.dnd
    names = list(d.datasets)
    held = list(d.heldout) if d.heldout else names
    unknown = [h for h in held if h not in names]
    if unknown:
        raise ConfigError(f"pipeline.dnd.heldout {unknown} are not in pipeline.dnd.datasets {names}")
    return held


def _spec(cfg: DictConfig, name: str) -> DictConfig:
    members = cfg.dataset.get("members") or {}
    if name not in members:
        raise ConfigError(f"pipeline.dnd.datasets names {name!r}, which dataset={cfg.dataset.name} does not hold "
                          f"(its members: {sorted(members)})")
    return members[name]


def tasks(cfg: DictConfig) -> dict[str, list[str]]:
    """dataset -> its tasks: its sub-tasks `<dataset>@<group>` when its subtasks.by is set, else [dataset]."""
    out = {}
    for name in cfg.pipeline.dnd.datasets:
        spec = _spec(cfg, name)
        records = []
        if subtasks.enabled(spec):
            records = load_split(spec, str(spec.train_split), data_dir=cfg.paths.data_dir, seed=cfg.seed,
                                 skip_invalid=cfg.data.skip_invalid,
                                 hash_train_fraction=cfg.data.hash_train_fraction).records
        out[name] = subtasks.task_names(spec, records, cfg.paths)
    return out


def training_tasks(cfg: DictConfig, by_dataset: dict[str, list[str]], h: str) -> list[str]:
    """The generator's training tasks when h is held out: every task of every other dataset."""
    return [t for n in cfg.pipeline.dnd.datasets if n != h for t in by_dataset[n]]


def steps(cfg: DictConfig, root: Path) -> list[Step]:
    d = cfg.pipeline.dnd
    model, names = cfg.model.name, list(d.datasets)
    held = _heldout(cfg)
    by_dataset = tasks(cfg)
    train = {h: training_tasks(cfg, by_dataset, h) for h in held}
    needed = set(held).union(*train.values())  # held-out datasets whole (their oracle), every training task
    gen_ov = list(d.generator_overrides)
    out: list[Step] = []
    for t in (t for n in names for t in dict.fromkeys([n, *by_dataset[n]]) if t in needed):
        ds, group = subtasks.split_task(t)
        sub = [f"dataset.subtasks={quote(_subtask_cfg(cfg, ds, group))}"] if group else []
        out.append(Step(f"lora/{t}", ["stage=lora", f"model={model}", f"dataset={ds}", *sub, *d.lora_overrides],
                        ["final/adapter_config.json"]))
        out.append(Step(f"tokenize/{t}", ["stage=tokenize", f"model={model}", f"dataset={ds}",
                                          f"tokenize.checkpoints={quote(str(root / 'lora' / t))}", *d.tokenize_overrides],
                        ["tokens.safetensors", "layout.json"], [f"lora/{t}"]))
    for h in held:
        gen_tasks = [t for n in names for t in ([h] if n == h else by_dataset[n])]
        tokens = {t: str(root / "tokenize" / t) for t in gen_tasks}
        members = [f"dataset.members.{n}.subtasks={quote(_subtask_cfg(cfg, n, None))}"
                   for n in names if n != h and subtasks.enabled(_spec(cfg, n))]
        out.append(Step(f"generator/{h}", ["stage=generator", f"model={model}", f"dataset={cfg.dataset.name}", *members,
                                           f"generator.datasets={quote(gen_tasks)}", f"generator.heldout={h}",
                                           f"++generator.tokens={quote(tokens)}", *gen_ov, *d.generator_train_overrides],
                        ["metrics.json"], [f"tokenize/{t}" for t in gen_tasks]))
        out.append(Step(f"generate/{h}", ["stage=generate", f"model={model}", f"dataset={cfg.dataset.name}",
                                          f"generate.checkpoint={quote(str(root / 'generator' / h))}",
                                          f"generate.num_adapters={int(d.num_generated)}", *gen_ov],
                        ["adapters/gen-000/adapter_config.json"], [f"generator/{h}"]))
        trained = _evaluated_loras(cfg, by_dataset, h)
        out.append(Step(f"evaluate/{h}", ["stage=evaluate", f"model={model}", f"dataset={h}",
                                          f"eval.split={quote(heldout_split(_spec(cfg, h)))}",
                                          f"eval.adapters={quote(_adapters(cfg, root, h, trained))}", *d.eval_overrides,
                                          "eval.include_base=true"],  # the table compares everything with base
                        ["results.json"], [*(f"lora/{n}" for n in trained), f"generator/{h}", f"generate/{h}"]))
    out.append(Step("report", ["stage=report", f"report.runs={quote([str(root)])}"], ["report.md"], [s.name for s in out]))
    return out


def _subtask_cfg(cfg: DictConfig, dataset: str, group: str | None) -> dict:
    """The pipeline's dataset.subtasks of `dataset`, for a step that composes its own config (select=group)."""
    return {**OmegaConf.to_container(_spec(cfg, dataset).subtasks, resolve=True), "select": group}


def _evaluated_loras(cfg: DictConfig, by_dataset: dict[str, list[str]], h: str) -> list[str]:
    """Whole datasets: every dataset's LoRA (h's own is the oracle). With sub-tasks: h's whole-dataset LoRA only."""
    names = list(cfg.pipeline.dnd.datasets)
    return names if all(by_dataset[n] == [n] for n in names) else [h]


def _adapters(cfg: DictConfig, root: Path, h: str, trained: list[str]) -> list[str]:
    d = cfg.pipeline.dnd
    finals = [str(root / "lora" / n / "final") for n in trained]
    baselines = [str(root / "generator" / h / "baselines" / b) for b in BASELINES]
    generated = [str(root / "generate" / h / "adapters" / f"gen-{i:03d}") for i in range(int(d.num_generated))]
    return finals + baselines + generated


ROLES = ("base", "oracle", *BASELINES, "generated")


@dataclass
class HeldoutScores:
    """One held-out dataset's evaluate step, by role: per-document acc keyed by document id (samples order)."""
    split: str
    n: int
    acc: dict[str, float]                 # role -> acc (generated: the mean over its adapters)
    docs: dict[str, dict[str, float]]     # role -> {doc id: acc} (generated: the per-document mean)
    generated: list[float]                # each generated adapter's acc


def heldout_scores(root: Path, h: str) -> HeldoutScores:
    """The scores of evaluate/<h> of a dnd pipeline dir, by role (base, oracle, average, nearest, generated)."""
    ev = root / "evaluate" / h
    for f in ("results.json", "samples.jsonl"):
        if not (ev / f).is_file():
            raise DataError(f"{ev / f} is missing; expected the evaluate step of held-out {h} in the pipeline dir {root}")
    results = {e["adapter_path"]: e for e in io.read_json(ev / "results.json")["results"]}
    by_label: dict[str, dict[str, float]] = {}
    for n, line in enumerate((ev / "samples.jsonl").read_text().splitlines(), 1):
        try:
            s = json.loads(line)
            by_label.setdefault(s["label"], {})[str(s["id"])] = float(s["acc"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{ev / 'samples.jsonl'} line {n}: expected a JSON object with label, id and acc "
                            f"({type(e).__name__}: {e})") from None
    paths = {"oracle": str(root / "lora" / h / "final"),
             **{b: str(root / "generator" / h / "baselines" / b) for b in BASELINES}}
    missing = [p for p in [None, *paths.values()] if p not in results]
    if missing:
        raise DataError(f"{ev / 'results.json'}: no entry for the adapter(s) {missing}; expected the base model, "
                        f"the oracle and the baselines of held-out {h}")
    if len(by_label.get("base", {})) != results[None]["n"]:
        raise DataError(f"{ev / 'samples.jsonl'}: {len(by_label.get('base', {}))} distinct base document ids for "
                        f"n={results[None]['n']}; expected one row per document")
    def docs_of(label: str) -> dict[str, float]:
        if set(by_label.get(label, {})) != set(by_label["base"]):
            raise DataError(f"{ev / 'samples.jsonl'}: the rows of {label!r} are not the base model's "
                            f"{len(by_label['base'])} documents; expected one row per document for every results entry")
        return by_label[label]

    acc = {"base": results[None]["acc"], **{role: results[p]["acc"] for role, p in paths.items()}}
    docs = {"base": by_label["base"], **{role: docs_of(results[p]["label"]) for role, p in paths.items()}}
    gen = [p for p in results if p and "/generate/" in p]
    gen_docs = [docs_of(results[p]["label"]) for p in gen]
    docs["generated"] = {i: statistics.mean(d[i] for d in gen_docs) for i in gen_docs[0]} if gen_docs else {}
    generated = [results[p]["acc"] for p in gen]
    acc["generated"] = statistics.mean(generated) if generated else float("nan")
    return HeldoutScores(results[None]["split"], results[None]["n"], acc, docs, generated)


def table(cfg: DictConfig, root: Path) -> list[dict]:
    """Per held-out dataset: base, oracle, average, nearest, generated (mean ± sd), differences to base with 95% CIs."""
    rows = []
    for h in _heldout(cfg):
        sc = heldout_scores(root, h)
        base = list(sc.docs["base"].values())
        row: dict = {"heldout": h, "split": sc.split, "n": sc.n, "base": sc.acc["base"]}
        for role in ("oracle", *BASELINES):
            row[role] = sc.acc[role]
            row[f"{role}_diff"] = paired_bootstrap(base, [sc.docs[role][i] for i in sc.docs["base"]], seed=int(cfg.seed))
        row["generated"] = sc.acc["generated"]
        row["generated_sd"] = statistics.stdev(sc.generated) if len(sc.generated) > 1 else 0.0
        row["generated_k"] = len(sc.generated)
        row["generated_diff"] = paired_bootstrap(base, [sc.docs["generated"][i] for i in sc.docs["base"]],
                                                 seed=int(cfg.seed))
        nearest_info = io.read_json(root / "generator" / h / "baselines" / "nearest" / "baseline.json")
        row["nearest_dataset"] = nearest_info.get("nearest")
        row["train_tasks"] = len(io.read_json(root / "generator" / h / "metrics.json")["datasets"])
        rows.append(row)
    return rows


def markdown(cfg: DictConfig, rows: list[dict]) -> str:
    def cell(r: dict, key: str) -> str:
        diff, lo, hi = r[f"{key}_diff"]
        return f"{r[key]:.3f} ({diff:+.3f} [{lo:+.3f}, {hi:+.3f}])"

    lines = [f"# Prompt-to-weights, leave-one-out ({cfg.model.name})", "",
             "| held out (split, n) | training tasks | base | oracle (own LoRA) | weight average | nearest-prompt LoRA | "
             "generated (mean ± sd) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gd, glo, ghi = r["generated_diff"]
        lines.append(f"| {r['heldout']} ({r['split']}, {r['n']}) | {r['train_tasks']} | {r['base']:.3f} | {cell(r, 'oracle')} | "
                     f"{cell(r, 'average')} | {cell(r, 'nearest')} ({r['nearest_dataset']}) | {r['generated']:.3f} ± "
                     f"{r['generated_sd']:.3f} ({gd:+.3f} [{glo:+.3f}, {ghi:+.3f}], k={r['generated_k']}) |")
    lines += ["", "acc on the held-out dataset; in parentheses the difference to base with its paired-bootstrap 95% interval",
              "over documents (2000 resamples). Training tasks: how many tasks (LoRA trajectories) the generator, the",
              "weight average and the nearest-prompt LoRA drew on. Generated: adapters from independent batches of the",
              "held-out dataset's unlabeled eval-split prompts; its interval is for the per-document mean over them."]
    split = [n for n in cfg.pipeline.dnd.datasets if subtasks.enabled(_spec(cfg, n))]
    if split:
        lines += ["", f"Sub-tasks (`<dataset>@<group>`, each its own LoRA on its part of the train split) for {', '.join(split)}; "
                  "every sub-task of the held-out dataset is excluded from training and from the baselines. Oracle: the "
                  "held-out dataset's LoRA trained on its whole train split."]
    return "\n".join(lines) + "\n"
