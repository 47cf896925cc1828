"""The prompt-to-weights experiment (recipe `dnd`), leave-one-out over datasets.

Steps: a LoRA trajectory per dataset (all from one init seed) -> tokenize each -> for every
held-out dataset h: a generator trained on the others -> generate adapters from h's unlabeled
prompts -> evaluate on h: the base model, every dataset's final LoRA (h's own is the oracle),
the weight average and the nearest-prompt LoRA of the training datasets, and the generated
adapters. The table reports each against the base with a paired bootstrap 95% interval, and forest.png
(beside table.md) draws those differences; the last step (stage=report) draws the same forest plot first, then
the curves, accuracy charts, similarity matrices and timing into report/.

With sub-tasks (a dataset whose `dataset.members.<d>.subtasks.by` is set, see loragen.data.subtasks), the
tasks are `<d>@<group>`: each sub-task gets its own LoRA trajectory (`lora/<d>@<group>`, trained on its part
of d's train split) and is one generator training task. For a held-out dataset h, every sub-task of h is
left out of the generator and of the average / nearest baselines; the oracle is h's LoRA trained on its
whole train split (`lora/h`), and h is evaluated on its whole evaluation split as before.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from loragen import io, rundir
from loragen.data import load_split, subtasks
from loragen.data.registry import data_options, heldout_split
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
            records = load_split(spec, str(spec.train_split), **data_options(cfg)).records
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
                        [f"{rundir.FINAL}/adapter_config.json"]))
        out.append(Step(f"tokenize/{t}", ["stage=tokenize", f"model={model}", f"dataset={ds}",
                                          f"tokenize.checkpoints={quote(str(root / 'lora' / t))}", *d.tokenize_overrides],
                        [rundir.TOKENS, rundir.LAYOUT], [f"lora/{t}"]))
    for h in held:
        if d.multitask:
            out += [s for s in [multitask_step(cfg, root, h)] if s.name not in {o.name for o in out}]
        for v, spec in variants(cfg).items():
            out += variant_steps(cfg, root, h, v, spec)
        gen_tasks = [t for n in names for t in ([h] if n == h else by_dataset[n])]
        tokens = {t: str(root / "tokenize" / t) for t in gen_tasks}
        members = [f"dataset.members.{n}.subtasks={quote(_subtask_cfg(cfg, n, None))}"
                   for n in names if n != h and subtasks.enabled(_spec(cfg, n))]
        out.append(Step(f"generator/{h}", ["stage=generator", f"model={model}", f"dataset={cfg.dataset.name}", *members,
                                           f"generator.datasets={quote(gen_tasks)}", f"generator.heldout={h}",
                                           f"++generator.tokens={quote(tokens)}", *gen_ov, *d.generator_train_overrides],
                        [rundir.METRICS], [f"tokenize/{t}" for t in gen_tasks]))
        out.append(Step(f"generate/{h}", ["stage=generate", f"model={model}", f"dataset={cfg.dataset.name}",
                                          f"generate.checkpoint={quote(str(root / 'generator' / h))}",
                                          f"generate.num_adapters={int(d.num_generated)}", *gen_ov],
                        [f"{rundir.ADAPTERS}/{rundir.generated_name(0)}/adapter_config.json"], [f"generator/{h}"]))
        trained = _evaluated_loras(cfg, by_dataset, h)
        out.append(Step(f"evaluate/{h}", ["stage=evaluate", f"model={model}", f"dataset={h}",
                                          f"eval.split={quote(heldout_split(_spec(cfg, h)))}",
                                          f"eval.adapters={quote(_adapters(cfg, root, h, trained))}", *d.eval_overrides,
                                          "eval.include_base=true"],  # the table compares everything with base
                        [rundir.RESULTS], [*(f"lora/{n}" for n in trained), f"generator/{h}", f"generate/{h}",
                                           *([multitask_name(cfg, h)] if d.multitask else [])]))
        for v in variants(cfg):  # its own evaluate step: adding a variant to a finished run re-evaluates nothing else
            out.append(Step(f"evaluate-{v}/{h}", ["stage=evaluate", f"model={model}", f"dataset={h}",
                                                  f"eval.split={quote(heldout_split(_spec(cfg, h)))}",
                                                  f"eval.adapters={quote(_generated(cfg, root, h, v))}",
                                                  *d.eval_overrides, "eval.include_base=false"],
                            [rundir.RESULTS], [f"generate-{v}/{h}"]))
    out.append(Step("report", ["stage=report", f"report.runs={quote([str(root)])}"], [rundir.REPORT], [s.name for s in out]))
    return out


def _subtask_cfg(cfg: DictConfig, dataset: str, group: str | None) -> dict:
    """The pipeline's dataset.subtasks of `dataset`, for a step that composes its own config (select=group)."""
    return {**OmegaConf.to_container(_spec(cfg, dataset).subtasks, resolve=True), "select": group}


def _evaluated_loras(cfg: DictConfig, by_dataset: dict[str, list[str]], h: str) -> list[str]:
    """Whole datasets: every dataset's LoRA (h's own is the oracle; pipeline.dnd.eval_other_loras=false: the oracle
    only). With sub-tasks: h's whole-dataset LoRA only."""
    names = list(cfg.pipeline.dnd.datasets)
    whole = all(by_dataset[n] == [n] for n in names)
    return names if whole and cfg.pipeline.dnd.eval_other_loras else [h]


def _adapters(cfg: DictConfig, root: Path, h: str, trained: list[str]) -> dict[str, str]:
    """{label: adapter dir} of evaluate/<h>; a label's first `/` part is its role in results.json."""
    d = cfg.pipeline.dnd
    out = {("oracle" if n == h else f"lora/{n}"): str(root / "lora" / n / rundir.FINAL) for n in trained}
    out.update({b: str(root / "generator" / h / rundir.BASELINES / b) for b in BASELINES})
    if d.multitask:
        out["multitask"] = str(root / multitask_name(cfg, h) / rundir.FINAL)
    return {**out, **_generated(cfg, root, h, None)}


def _generated(cfg: DictConfig, root: Path, h: str, v: str | None) -> dict[str, str]:
    """{generated[-<v>]/gen-XXX: dir} of the generate step of variant v (None: the reconstruction generator)."""
    role, step = ("generated", "generate") if v is None else (f"generated-{v}", f"generate-{v}")
    return {f"{role}/gen-{i:03d}": str(root / step / h / rundir.ADAPTERS / rundir.generated_name(i))
            for i in range(cfg.pipeline.dnd.num_generated)}


def _datasets_other_than(cfg: DictConfig, h: str) -> list[str]:
    return [n for n in cfg.pipeline.dnd.datasets if n != h]


def multitask_name(cfg: DictConfig, h: str) -> str:
    """multitask/<training datasets>: named by its training set, so held-out datasets that share one share it."""
    return "multitask/" + "+".join(_datasets_other_than(cfg, h))


def multitask_steps(cfg: DictConfig, h: str) -> int:
    """pipeline.dnd.multitask_steps, default: a per-task LoRA's train.max_steps x the number of training datasets."""
    d = cfg.pipeline.dnd
    if d.multitask_steps is not None:
        return int(d.multitask_steps)
    per_task = [o.split("=", 1)[1] for o in d.lora_overrides if str(o).startswith("train.max_steps=")]
    if not per_task:
        raise ConfigError("pipeline.dnd.multitask_steps=null takes the per-task step count from "
                          "pipeline.dnd.lora_overrides' train.max_steps, which is not there; set one of them")
    return int(per_task[-1]) * len(_datasets_other_than(cfg, h))


def multitask_step(cfg: DictConfig, root: Path, h: str) -> Step:
    """One LoRA on the union of the training datasets (same init seed and LoRA settings as the per-task ones)."""
    d = cfg.pipeline.dnd
    return Step(multitask_name(cfg, h), ["stage=lora", f"model={cfg.model.name}", f"dataset={cfg.dataset.name}",
                                         f"lora.datasets={quote(_datasets_other_than(cfg, h))}", *d.lora_overrides,
                                         f"train.max_steps={multitask_steps(cfg, h)}", "ckpt.every=0",
                                         "train.eval_every=0", *d.multitask_overrides],
                [f"{rundir.FINAL}/adapter_config.json"])


def variants(cfg: DictConfig) -> dict[str, DictConfig]:
    """pipeline.dnd.generators: extra generators beside the reconstruction one, by name."""
    out = dict(cfg.pipeline.dnd.generators or {})
    for v, spec in out.items():
        unknown = set(spec) - {"objective", "condition", "subtasks", "overrides", "shape"}
        if unknown:
            raise ConfigError(f"pipeline.dnd.generators.{v} has unknown keys {sorted(unknown)}; expected objective, "
                              "condition, subtasks, overrides, shape")
    return out


def variant_tasks(cfg: DictConfig, h: str, spec: DictConfig) -> tuple[list[str], list[str]]:
    """(training tasks, dataset.members overrides) of a generator variant: whole datasets, or with `subtasks`
    ({dataset: dataset.subtasks settings}) the sub-tasks of every training dataset it names."""
    tasks, members = [], []
    for n in _datasets_other_than(cfg, h):
        sub = (spec.get("subtasks") or {}).get(n)
        if not sub:
            tasks.append(n)
            continue
        merged = OmegaConf.merge(_spec(cfg, n), {"subtasks": sub})
        records = load_split(merged, str(merged.train_split), **data_options(cfg)).records
        tasks += subtasks.task_names(merged, records, cfg.paths)
        members.append(f"dataset.members.{n}.subtasks={quote(OmegaConf.to_container(merged.subtasks, resolve=True))}")
    return tasks, members


def variant_steps(cfg: DictConfig, root: Path, h: str, v: str, spec: DictConfig) -> list[Step]:
    """generator-<v>/<h> and generate-<v>/<h>. The task objective gets only h's token set (the layout and the
    oracle comparison): it needs no LoRA of its training tasks; mix gets every training dataset's."""
    d = cfg.pipeline.dnd
    objective = str(spec.get("objective") or "reconstruction")
    tasks, members = variant_tasks(cfg, h, spec)
    with_tokens = [h] if objective == "task" else [h, *tasks]
    if objective != "task" and any("@" in t for t in tasks):
        raise ConfigError(f"pipeline.dnd.generators.{v}: objective={objective} on sub-tasks needs a LoRA per sub-task; "
                          "the sub-task variants take objective=task")
    tokens = {t: str(root / "tokenize" / t) for t in with_tokens}
    shape = [*d.generator_overrides, *(spec.get("shape") or [])]
    gen = Step(f"generator-{v}/{h}", ["stage=generator", f"model={cfg.model.name}", f"dataset={cfg.dataset.name}",
                                      *members, f"generator.datasets={quote([*tasks, h])}", f"generator.heldout={h}",
                                      f"++generator.tokens={quote(tokens)}", f"generator.objective={objective}",
                                      f"generator.condition={spec.get('condition') or 'prompts'}", *shape,
                                      *d.generator_train_overrides, *(spec.get("overrides") or [])],
               [rundir.METRICS], [f"tokenize/{t}" for t in with_tokens])
    generate = Step(f"generate-{v}/{h}", ["stage=generate", f"model={cfg.model.name}", f"dataset={cfg.dataset.name}",
                                          f"generate.checkpoint={quote(str(root / gen.name))}",
                                          f"generate.num_adapters={int(d.num_generated)}", *shape],
                    [f"{rundir.ADAPTERS}/{rundir.generated_name(0)}/adapter_config.json"], [gen.name])
    return [gen, generate]


ROLES = ("base", "oracle", *BASELINES, "generated")


@dataclass
class HeldoutScores:
    """One held-out dataset's evaluate step, by role: per-document acc keyed by document id (samples order)."""
    split: str
    n: int
    acc: dict[str, float]                 # role -> acc (generated roles: the mean over their adapters)
    docs: dict[str, dict[str, float]]     # role -> {doc id: acc} (generated roles: the per-document mean)
    generated: list[float]                # each generated adapter's acc (the reconstruction generator's)
    variants: dict[str, list[float]] = field(default_factory=dict)  # generated-<v> -> each of its adapters' acc


def heldout_scores(root: Path, h: str) -> HeldoutScores:
    """The scores of evaluate/<h> of a dnd pipeline dir, by role (base, oracle, average, nearest, generated and,
    where evaluated, multitask and generated-<variant>). Roles come from results.json's `role`; a run written
    before roles were recorded is read by its adapter paths."""
    ev = root / "evaluate" / h
    entries: list[dict] = []
    by_label: dict[str, dict[str, float]] = {}
    # evaluate/<h>, then the generator variants' evaluate-<v>/<h> (their entries carry their roles)
    for d in [ev, *sorted(p.parent for p in root.glob(f"evaluate-*/{h}/results.json"))]:
        for f in (rundir.RESULTS, rundir.SAMPLES):
            if not (d / f).is_file():
                raise DataError(f"{d / f} is missing; expected the evaluate step of held-out {h} in the pipeline dir {root}")
        entries += io.read_json(d / rundir.RESULTS)["results"]
        for n, line in enumerate((d / rundir.SAMPLES).read_text().splitlines(), 1):
            try:
                s = json.loads(line)
                by_label.setdefault(s["label"], {})[str(s["id"])] = float(s["acc"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{d / 'samples.jsonl'} line {n}: expected a JSON object with label, id and acc "
                                f"({type(e).__name__}: {e})") from None
    roles = _roles(entries, root, h)
    missing = [r for r in ("base", "oracle", *BASELINES) if r not in roles]
    if missing:
        raise DataError(f"{ev / 'results.json'}: no entry for {missing}; expected the base model, the oracle and the "
                        f"baselines of held-out {h}")
    base = roles["base"][0]
    if len(by_label.get(base["label"], {})) != base["n"]:
        raise DataError(f"{ev / 'samples.jsonl'}: {len(by_label.get(base['label'], {}))} distinct base document ids "
                        f"for n={base['n']}; expected one row per document")
    base_ids = set(by_label[base["label"]])

    def docs_of(label: str) -> dict[str, float]:
        if set(by_label.get(label, {})) != base_ids:
            raise DataError(f"{ev / 'samples.jsonl'}: the rows of {label!r} are not the base model's "
                            f"{len(base_ids)} documents; expected one row per document for every results entry")
        return by_label[label]

    acc, docs, per_adapter = {}, {}, {}
    for role, group in roles.items():
        group_docs = [docs_of(e["label"]) for e in group]
        docs[role] = {i: statistics.mean(d[i] for d in group_docs) for i in group_docs[0]}
        per_adapter[role] = [e["acc"] for e in group]
        acc[role] = statistics.mean(per_adapter[role])
    generated = per_adapter.get("generated", [])
    acc.setdefault("generated", float("nan"))
    docs.setdefault("generated", {})
    return HeldoutScores(base["split"], base["n"], acc, docs, generated,
                         {r: a for r, a in per_adapter.items() if r.startswith("generated-")})


def _roles(entries: list[dict], root: Path, h: str) -> dict[str, list[dict]]:
    """role -> its results entries (in order). Legacy runs without `role`: by adapter path."""
    out: dict[str, list[dict]] = {}
    if all("role" in e for e in entries):
        for e in entries:
            out.setdefault(e["role"], []).append(e)
        return out
    paths = {None: "base", str(root / "lora" / h / rundir.FINAL): "oracle",
             **{str(root / "generator" / h / rundir.BASELINES / b): b for b in BASELINES}}
    for e in entries:
        p = e["adapter_path"]
        role = paths.get(p) or ("generated" if p and Path(p).parent.name == rundir.ADAPTERS else None)
        if role:
            out.setdefault(role, []).append(e)
    return out


def table(cfg: DictConfig, root: Path) -> list[dict]:
    """Per held-out dataset: base, oracle, average, nearest, generated (mean ± sd), differences to base with 95% CIs."""
    rows = []
    for h in _heldout(cfg):
        sc = heldout_scores(root, h)
        base = list(sc.docs["base"].values())
        row: dict = {"heldout": h, "split": sc.split, "n": sc.n, "base": sc.acc["base"]}
        for role in ("oracle", *BASELINES):
            row[role] = sc.acc[role]
            row[f"{role}_diff"] = paired_bootstrap(base, [sc.docs[role][i] for i in sc.docs["base"]], seed=cfg.seed)
        row["generated"] = sc.acc["generated"]
        row["generated_sd"] = statistics.stdev(sc.generated) if len(sc.generated) > 1 else 0.0
        row["generated_k"] = len(sc.generated)
        row["generated_diff"] = paired_bootstrap(base, [sc.docs["generated"][i] for i in sc.docs["base"]],
                                                 seed=cfg.seed)
        nearest_info = io.read_json(root / "generator" / h / rundir.BASELINES / "nearest" / rundir.BASELINE_RECORD)
        row["nearest_dataset"] = nearest_info.get("nearest")
        row["train_tasks"] = len(io.read_json(root / "generator" / h / rundir.METRICS)["datasets"])
        row.update(_against_multitask(cfg, root, h, sc))
        rows.append(row)
    return rows


def _against_multitask(cfg: DictConfig, root: Path, h: str, sc: HeldoutScores) -> dict:
    """The multi-task LoRA and every generator variant: acc, its difference to base and, for each generator,
    generated - multitask, each with its paired-bootstrap interval over documents."""
    ids = list(sc.docs["base"])
    base = [sc.docs["base"][i] for i in ids]
    seed = cfg.seed
    out: dict = {}
    mt = [sc.docs["multitask"][i] for i in ids] if "multitask" in sc.docs else None
    if mt is not None:
        out["multitask"] = sc.acc["multitask"]
        out["multitask_diff"] = paired_bootstrap(base, mt, seed=seed)
    generators = {"generated": ("reconstruction", "generator", sc.generated),
                  **{r: (r.removeprefix("generated-"), f"generator-{r.removeprefix('generated-')}", a)
                     for r, a in sc.variants.items()}}
    out["generators"] = {}
    for role, (name, step, accs) in generators.items():
        if not sc.docs.get(role):
            continue
        docs = [sc.docs[role][i] for i in ids]
        metrics = root / step / h / rundir.METRICS
        meta = io.read_json(metrics) if metrics.is_file() else {}
        out["generators"][name] = {
            "objective": meta.get("objective", "reconstruction"), "condition": meta.get("condition", "prompts"),
            "acc": sc.acc[role], "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0, "k": len(accs),
            "diff": paired_bootstrap(base, docs, seed=seed),
            "minus_multitask": paired_bootstrap(mt, docs, seed=seed) if mt is not None else None,
            "train_tasks": len(meta["datasets"]) if "datasets" in meta else None,
        }
    return out


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
    if any("multitask" in r or len(r.get("generators", {})) > 1 for r in rows):
        lines += ["", *generators_markdown(rows)]
    if len({n for r in rows for n in task_count_series(r)}) > 1 and all("multitask" in r for r in rows):
        lines += ["", *task_count_markdown(rows)]
    split = [n for n in cfg.pipeline.dnd.datasets if subtasks.enabled(_spec(cfg, n))]
    if split:
        lines += ["", f"Sub-tasks (`<dataset>@<group>`, each its own LoRA on its part of the train split) for {', '.join(split)}; "
                  "every sub-task of the held-out dataset is excluded from training and from the baselines. Oracle: the "
                  "held-out dataset's LoRA trained on its whole train split."]
    return "\n".join(lines) + "\n"


def generators_markdown(rows: list[dict]) -> list[str]:
    """The second table: the multi-task LoRA and each generator, against base and against the multi-task LoRA."""
    def ci(t) -> str:
        return "n/a" if t is None else f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]"

    names = list(dict.fromkeys(n for r in rows for n in r.get("generators", {})))
    lines = ["## Generators against the multi-task LoRA", "",
             "| held out (split, n) | base | multi-task LoRA (Δ base) | " + " | ".join(f"generated ({n})" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        mt = f"{r['multitask']:.3f} ({ci(r['multitask_diff'])})" if "multitask" in r else "n/a"
        cells = []
        for n in names:
            g = r["generators"].get(n)
            cells.append("n/a" if g is None else
                         f"{g['acc']:.3f} ± {g['sd']:.3f} (k={g['k']}, tasks={g['train_tasks']}); Δ base {ci(g['diff'])}; "
                         f"− multi-task {ci(g['minus_multitask'])}")
        lines.append(f"| {r['heldout']} ({r['split']}, {r['n']}) | {r['base']:.3f} | {mt} | " + " | ".join(cells) + " |")
    lines += ["", "Each generated cell: mean acc ± sd over its k adapters (independent prompt or description batches), the",
              "number of training tasks, the difference to base and generated − multi-task LoRA, each with its paired-",
              "bootstrap 95% interval over documents (per-document mean over the k adapters)."]
    return lines


def task_count_series(row: dict) -> dict[int, tuple[str, list[float]]]:
    """number of training tasks -> (generator, generated - multitask [diff, lo, hi]) of the row's prompt-conditioned
    task-objective generators (the task-count experiment)."""
    out = {}
    for name, g in row.get("generators", {}).items():
        if g["objective"] == "task" and g["condition"] == "prompts" and g["minus_multitask"] is not None:
            out[int(g["train_tasks"])] = (name, list(g["minus_multitask"]))
    return dict(sorted(out.items()))


def task_count_markdown(rows: list[dict]) -> list[str]:
    names = list(dict.fromkeys(n for r in rows for n, _ in task_count_series(r).values()))
    lines = ["## The task objective against the number of training tasks", "",
             "| held out | " + " | ".join(f"{n}: tasks, generated − multi-task [95% CI]" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for r in rows:
        by_name = {n: (k, d) for k, (n, d) in task_count_series(r).items()}
        cells = [f"{by_name[n][0]}: {by_name[n][1][0]:+.3f} [{by_name[n][1][1]:+.3f}, {by_name[n][1][2]:+.3f}]"
                 if n in by_name else "n/a" for n in names]
        lines.append(f"| {r['heldout']} | " + " | ".join(cells) + " |")
    lines += ["", "The same multi-task LoRA (the union of the five training datasets) in every column; task_count.png "
              "plots these differences against the number of training tasks."]
    return lines


FOREST_TITLE = "Held-out accuracy − base, with paired-bootstrap 95% intervals over documents"


def forest_entries(row: dict) -> list[dict]:
    """A table row's roles for the forest plot, in drawing order: label, kind, diff [d, lo, hi] (the row's own
    numbers) and a note (the nearest-prompt LoRA's source dataset). Roles the row lacks are left out: the
    multi-task LoRA, generator variants, and the generated adapters of a run that generated none."""
    gens = row.get("generators") or {}
    variants = {n: g for n, g in gens.items() if n != "reconstruction"}
    out = [{"label": "oracle (own LoRA)", "kind": "oracle", "diff": row["oracle_diff"]}]
    if row.get("multitask_diff") is not None:
        out.append({"label": "multi-task LoRA", "kind": "multitask", "diff": row["multitask_diff"]})
    out.append({"label": "weight average", "kind": "average", "diff": row["average_diff"]})
    out.append({"label": "nearest-prompt LoRA", "kind": "nearest", "diff": row["nearest_diff"],
                "note": f"({row['nearest_dataset']}'s LoRA)" if row.get("nearest_dataset") else ""})
    if row.get("generated_k"):
        name = "generated (reconstruction)" if variants else "generated"
        out.append({"label": f"{name}, k={row['generated_k']}", "kind": "generated", "diff": row["generated_diff"]})
    for n, g in variants.items():
        out.append({"label": f"generated ({n}), k={g['k']}", "kind": "variant", "diff": g["diff"]})
    return [e for e in out if e["diff"] is not None and all(v == v for v in e["diff"])]


def forest_panels(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """One forest panel per held-out dataset: its title (dataset, split, n, base acc) and forest_entries."""
    return [(f"{r['heldout']} ({r['split']}, n={r['n']}), base {r['base']:.3f}", forest_entries(r)) for r in rows]


def plots(cfg: DictConfig, rows: list[dict], root: Path) -> list[Path]:
    """forest.png: each role's held-out accuracy − base with its interval, one panel per held-out dataset (the
    table's numbers); task_count.png: generated (task) - multi-task per held-out dataset against the number of
    training tasks, when the run varied it."""
    from loragen.report.plots import forest, task_count_plot

    out = [forest(forest_panels(rows), FOREST_TITLE, root / "forest.png")] if rows else []
    series = {r["heldout"]: task_count_series(r) for r in rows}
    if any(len(s) > 1 for s in series.values()):
        out.append(task_count_plot(series, root / "task_count.png"))
    return out
