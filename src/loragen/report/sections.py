"""The report's sections: each reads the collected runs, draws its plots into `out` and returns markdown lines.

Every accuracy printed is the value in a results.json, formatted with 4 decimals; every text metric is the
value in a results.json as results.md prints it (BLEU-4 2 decimals, fractions and loss 4, s / doc 3, tokens 1).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np

from loragen import rundir
from loragen.errors import CheckpointError, DataError
from loragen.evaluation.metrics import paired_bootstrap
from loragen.evaluation.results import TEXT_HEADERS, fmt_text_metric
from loragen.evaluation.text_evaluator import METRICS as TEXT_METRICS
from loragen.evaluation.text_metrics import EMBED_MODEL
from loragen.pipeline.dnd import FOREST_TITLE, forest_panels
from loragen.report import plots
from loragen.report.compare import dnd_pipelines_or_tables
from loragen.report.runs import EvaluateRun, LoraRun, Run, Runs, TrainedRun, is_text_entry, read_json
from loragen.report.similarity import cosine_of_dirs
from loragen.runtime import duration


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def fmt(v: float | None, spec: str = ".4f") -> str:
    return "–" if v is None or v != v else format(v, spec)


def image(path: Path, alt: str) -> str:
    return f"![{alt}]({path.name})"


# ---------------------------------------------------------------- held-out forest plot (dnd pipelines)

def forest_section(paths: list[str | Path], out: Path) -> list[str]:
    """The finding of a prompt-to-weights pipeline: each role's held-out accuracy − base with its interval, one
    panel per held-out dataset (one figure per pipeline dir among the given runs)."""
    tables = dnd_pipelines_or_tables(paths)
    if not tables:
        return []
    lines = ["## Held-out accuracy against the base model", ""]
    for root, (rows, source) in tables.items():
        name = "forest.png" if len(tables) == 1 else f"forest_{slug(root.name)}.png"
        title = FOREST_TITLE if len(tables) == 1 else f"{FOREST_TITLE}: {root.name}"
        png = plots.forest(forest_panels(rows), title, out / name)
        lines += [image(png, title), "",
                  f"Each point is a role's accuracy on the held-out dataset minus the base model's on the same documents, "
                  f"with its paired-bootstrap 95% interval over documents (2000 resamples); the numbers right of each "
                  f"panel are the pipeline table's ({source}). Filled: the interval excludes 0. Every panel has its "
                  "own x range. Generated: the per-document mean over the k adapters from independent prompt batches; "
                  "nearest-prompt LoRA: the training dataset whose LoRA it is is named after its numbers.", ""]
    return lines


# ---------------------------------------------------------------- runs

def steps_section(runs: Runs) -> list[str]:
    """The runs (steps) with their wall time, then the pipeline's profile by step (profile_section)."""
    lines = ["## Runs", "", "| run | kind | wall time (s) | dir |", "|---|---|---|---|"]
    for s in runs.steps:
        lines.append(f"| {s['name']} | {s['kind']} | {fmt(s['seconds'], '.1f')} | `{s['dir']}` |")
    return lines + [""] + profile_section(runs)


# ---------------------------------------------------------------- profile by step (pipelines)

def step_record(run_dir: str | Path) -> dict:
    """The pipeline step record (fingerprint.json) of a run dir: seconds, cpu_seconds, load; {} when it has none."""
    path = Path(run_dir) / rundir.STEP_RECORD
    if not path.is_file():
        return {}
    try:
        record = read_json(path)
    except DataError:
        return {}
    return record if isinstance(record, dict) else {}


def fmt_load(load: dict | None) -> str | None:
    """A step record's load as `load 1.9→2.3 / 2 cores` (1-minute load averages before and after the step), or None
    when it was not recorded."""
    if not isinstance(load, dict):
        return None
    before, after, cores = load.get("before"), load.get("after"), load.get("cores")
    ends = [f"{x[0]:.1f}" if x else "?" for x in (before, after)]
    if not before and not after:
        return None
    return f"load {ends[0]}→{ends[1]}" + (f" / {cores} cores" if cores else "")


def profile_rows(runs: Runs) -> list[dict]:
    """One row per pipeline step with a recorded wall time: name, kind, seconds, cpu_seconds, load (its record's)."""
    rows = []
    for s in runs.steps:
        if s["seconds"] is None:
            continue
        record = step_record(s["dir"])
        rows.append({"name": s["name"], "kind": s["kind"], "seconds": float(s["seconds"]),
                     "cpu_seconds": record.get("cpu_seconds"), "load": record.get("load")})
    return rows


def profile_section(runs: Runs) -> list[str]:
    """Where a pipeline's time went: seconds per kind of step and per step (wall, CPU where recorded), each with its
    share of the steps' total wall time, and the load each step ran under."""
    rows = profile_rows(runs)
    if not rows:
        return []
    total = sum(r["seconds"] for r in rows) or 1e-9
    kinds: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: -r["seconds"]):
        kinds.setdefault(r["kind"], []).append(r)
    kinds = dict(sorted(kinds.items(), key=lambda kv: -sum(r["seconds"] for r in kv[1])))

    def cpu(members: list[dict]) -> str:
        known = [r["cpu_seconds"] for r in members if r["cpu_seconds"] is not None]
        if not known:
            return "–"
        return fmt(sum(known), ".1f") + ("" if len(known) == len(members) else f" ({len(known)} of {len(members)})")

    lines = ["## Profile by step", "",
             f"Each finished step's cost from its record (fingerprint.json), over {len(rows)} steps and "
             f"{duration(total, hours=True)} of step wall time: wall seconds; CPU seconds (user+sys of the step's process "
             "and its child processes, over every core: above the wall time when several cores worked; – not recorded: "
             "a step run elsewhere, e.g. SLURM, in a job array, or recorded before CPU seconds were); share: of the "
             "steps' total wall time (steps skipped when resuming keep the time of the run that did them; steps run at "
             "once by pipeline.workers overlap, so their total exceeds the pipeline's wall time); load: the "
             "machine's 1-minute load average before→after the step and its core count (a load above the core count "
             "means the step shared the machine and its wall time is longer than on a quiet one).", "",
             "| kind | steps | wall s | share | CPU s |", "|---|---|---|---|---|"]
    for kind, members in kinds.items():
        secs = sum(r["seconds"] for r in members)
        lines.append(f"| {kind} | {len(members)} | {secs:.1f} | {100 * secs / total:.1f}% | {cpu(members)} |")
    lines.append(f"| total | {len(rows)} | {total:.1f} | 100% | {cpu(rows)} |")
    lines += ["", "| kind | step | wall s | share | CPU s | CPU / wall | load |", "|---|---|---|---|---|---|---|"]
    for kind, members in kinds.items():
        for r in members:
            c = r["cpu_seconds"]
            ratio = fmt(c / r["seconds"], ".2f") if c is not None and r["seconds"] > 0 else "–"
            lines.append(f"| {kind} | {r['name']} | {r['seconds']:.1f} | {100 * r['seconds'] / total:.1f}% | "
                         f"{fmt(c, '.1f')} | {ratio} | {fmt_load(r['load']) or '–'} |")
    return lines + [""]


# ---------------------------------------------------------------- accuracy

def trained_on(adapter_dir: Path) -> str | None:
    """The dataset of the lora run this adapter belongs to (its final/ or a trajectory checkpoint)."""
    for run_dir in (adapter_dir.parent, adapter_dir.parent.parent):
        trainer = run_dir / rundir.STATE / rundir.TRAINER
        if trainer.is_file():
            return read_json(trainer).get("fingerprint", {}).get("dataset")
    return None


def entry_role(entry: dict, dataset: str) -> str:
    """The role results.json records where it names a generator variant or the multi-task LoRA, else role_of."""
    recorded = str(entry.get("role") or "")
    if recorded == "multitask":
        return "multi-task LoRA"
    if recorded.startswith("generated-"):
        return recorded
    return role_of(entry["adapter_path"], dataset)


def role_of(adapter_path: str | None, dataset: str) -> str:
    if adapter_path is None:
        return "base"
    d = Path(adapter_path)
    if (d / rundir.PROMPTS_RECORD).is_file():
        return "generated"
    if (d / rundir.BASELINE_RECORD).is_file():
        return f"baseline: {read_json(d / 'baseline.json').get('baseline', d.name)}"
    trained = trained_on(d)
    if trained is not None:
        return "LoRA (own dataset)" if trained == dataset else "LoRA (other dataset)"
    if (d.parent / rundir.TRANSFER_REPORT).is_file():
        return "transferred"
    return "adapter"


def accuracy_rows(runs: Runs, seed: int) -> dict[str, list[dict]]:
    """dataset -> one row per evaluated (run, label): the results.json entry, its role and Δ vs its base.

    The base is the same run's base entry, else another run's base of the same model on the dataset;
    differences pair documents by id and are left out unless both scored the same documents.
    """
    groups: dict[str, list[tuple[EvaluateRun, dict]]] = {}
    for run in runs.evaluate:
        for e in run.results:
            if not is_text_entry(e):
                groups.setdefault(e["dataset"], []).append((run, e))
    out: dict[str, list[dict]] = {}
    for dataset, members in groups.items():
        counts = Counter(e["label"] for _, e in members)  # a label shared by runs gets the run's name
        docs = {id(r): r.per_document() for r, _ in members}
        bases = [(r, e) for r, e in members if e["label"] == "base" and e["adapter_path"] is None]
        rows = []
        for run, e in members:
            mine = docs[id(run)].get((e["label"], dataset))
            base_run = next((r for r, b in bases if r is run), None) or \
                next((r for r, b in bases if b["model"] == e["model"]), None)
            base = docs[id(base_run)].get(("base", dataset)) if base_run is not None else None
            rows.append({**e, "run": run.name, "role": entry_role(e, dataset),
                         "diff": paired(base, mine, seed) if e["adapter_path"] else None,
                         "display": f"{run.name}: {e['label']}" if counts[e["label"]] > 1 else e["label"],
                         "_docs": mine, "_base": base})
        out[dataset] = rows
    return out


def paired(base: dict[str, float] | None, other: dict[str, float] | None, seed: int):
    """paired_bootstrap over the same documents (by id), or None when there is nothing to pair."""
    if not base or not other or set(base) != set(other):
        return None
    ids = list(base)  # samples.jsonl order: the same resamples as the pipeline table's intervals
    return paired_bootstrap([base[i] for i in ids], [other[i] for i in ids], seed=seed)


def generated_summary(rows: list[dict], seed: int) -> dict | None:
    gen = [r for r in rows if r["role"] == "generated"]
    if not gen:
        return None
    accs = [r["acc"] for r in gen]
    summary = {"k": len(accs), "mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "accs": accs, "diff": None}
    docs = [r["_docs"] for r in gen]
    if all(docs) and all(set(d) == set(docs[0]) for d in docs):
        mean_doc = {i: statistics.mean(d[i] for d in docs) for i in docs[0]}
        summary["diff"] = paired(gen[0]["_base"], mean_doc, seed)
    return summary


def accuracy_section(runs: Runs, out: Path, seed: int) -> list[str]:
    if not runs.evaluate:
        return ["## Accuracy", "", "No evaluate run among the given runs.", ""]
    if not any(not is_text_entry(e) for run in runs.evaluate for e in run.results):
        return ["## Accuracy", "", "No multiple-choice evaluation among the given runs (prompt->text results are "
                "under Generation metrics).", ""]
    lines = ["## Accuracy", "",
             "acc from each results.json (± its stderr); Δ vs base: mean per-document difference to the base model "
             "of the same evaluate run with its paired-bootstrap 95% interval (2000 resamples).", ""]
    for dataset, rows in accuracy_rows(runs, seed).items():
        splits = sorted({f"{r['split']}, n={r['n']}" for r in rows})
        gen = generated_summary(rows, seed)
        chart_rows = [r | {"label": r["display"]} for r in rows if r["role"] != "generated"]
        title = f"Accuracy on {dataset} ({'; '.join(splits)})"
        png = plots.accuracy(chart_rows, {"accs": gen["accs"], "diff": gen["diff"]} if gen else None, title,
                             out / f"accuracy_{slug(dataset)}.png")
        lines += [f"### {dataset}", "", image(png, title), "",
                  "| label | role | model | split | n | acc ± stderr | acc_norm | Δ vs base [95% CI] |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['display']} | {r['role']} | {r['model']} | {r['split']} | {r['n']} | "
                         f"{fmt(r['acc'])} ± {fmt(r.get('acc_stderr'))} | {fmt(r.get('acc_norm'))} | {fmt_diff(r['diff'])} |")
        if gen:
            lines += ["", f"Generated adapters: mean {fmt(gen['mean'])} ± {fmt(gen['sd'])} (sd over k={gen['k']} "
                          f"adapters from independent prompt batches); Δ vs base of the per-document mean: "
                          f"{fmt_diff(gen['diff'])}."]
        lines.append("")
    return lines


def fmt_diff(diff: tuple[float, float, float] | None) -> str:
    if diff is None:
        return "–"
    d, lo, hi = diff
    return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"


# ---------------------------------------------------------------- generation metrics

def text_rows(runs: Runs) -> dict[str, list[dict]]:
    """dataset -> one row per prompt->text results.json entry (evaluate runs, then lora runs' own evaluation),
    with its role and display label (prefixed by the run's name when several runs evaluated the dataset)."""
    members: list[tuple[Run, dict]] = [(r, e) for r in [*runs.evaluate, *runs.lora] for e in r.results if is_text_entry(e)]
    out: dict[str, list[dict]] = {}
    for dataset in dict.fromkeys(e["dataset"] for _, e in members):
        mine = [(r, e) for r, e in members if e["dataset"] == dataset]
        multi = len({id(r) for r, _ in mine}) > 1
        out[dataset] = [{**e, "run": r.name, "role": entry_role(e, dataset),
                         "display": f"{r.name}: {e['label']}" if multi else e["label"]} for r, e in mine]
    return out


def generation_section(runs: Runs, out: Path) -> list[str]:
    groups = text_rows(runs)
    if not groups:
        return []
    lines = ["## Generation metrics", "",
             "Prompt->text evaluations (free generation on the held-out split), each value from its results.json. "
             "BLEU-4: sacreBLEU corpus BLEU (0-100); ROUGE-L F1: mean over documents (CJK text by characters); exact "
             "match: fraction of outputs equal to the reference (whitespace-normalised); embed sim: mean cosine of "
             f"{EMBED_MODEL} embeddings of output and reference; success: fraction of non-empty outputs that ended "
             "with end-of-sequence; s / doc and tokens / doc: mean generation time and new tokens per document; "
             "val loss: the lora run's validation loss per target token on the same documents.", ""]
    for dataset, rows in groups.items():
        splits = "; ".join(sorted({f"{r['split']}, n={r['n']}" for r in rows}))
        languages = ", ".join(dict.fromkeys(str(r.get("language", "?")) for r in rows))
        tokenize = ", ".join(dict.fromkeys(str(r.get("bleu_tokenize", "?")) for r in rows))
        with_loss = any(r.get("loss") is not None for r in rows)
        title = f"BLEU-4 and ROUGE-L on {dataset} ({splits})"
        png = plots.text_metric_bars([r | {"label": r["display"]} for r in rows], title,
                                     out / f"generation_{slug(dataset)}.png")
        head = ["label", "role", "model", "split", "n", *(TEXT_HEADERS[m] for m in TEXT_METRICS)] + \
            (["val loss"] if with_loss else [])
        lines += [f"### {dataset} (language {languages}; BLEU tokenize={tokenize})", "", image(png, title), "",
                  "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for r in rows:
            cells = [fmt_text_metric(m, r.get(m)) for m in TEXT_METRICS]
            if r.get("embed_sim_english_only"):
                cells[TEXT_METRICS.index("embed_sim")] += " †"
            if with_loss:
                cells.append(fmt_text_metric("loss", r.get("loss")))
            lines.append(f"| {r['display']} | {r['role']} | {r['model']} | {r['split']} | {r['n']} | "
                         + " | ".join(cells) + " |")
        flagged = sorted({str(r.get("language")) for r in rows if r.get("embed_sim_english_only")})
        if flagged:
            lines += ["", f"† {EMBED_MODEL} is an English-only model and these outputs are in {', '.join(flagged)} "
                          "(results.json: embed_sim_english_only): their embed sim is not a meaningful similarity."]
        lines.append("")
    return lines


# ---------------------------------------------------------------- training curves

def _series(run: TrainedRun, key: str) -> tuple[list[float], list[float]]:
    rows = [r for r in run.history if r.get(key) is not None]
    return [r["step"] for r in rows], [r[key] for r in rows]


INTERVAL_LOSS = "loss_interval"  # a history row's mean loss over every micro-batch since the previous logged row


def family(name: str) -> str:
    """A run's family, the first part of its name (lora, multitask, generator-task, ...): one figure row each."""
    return name.split("/")[0] if "/" in name else ""


def legend_names(names: list[str]) -> dict[str, str]:
    """Run name -> its legend entry within its family's row: the name without the family; a multi-task run named
    by its training datasets (`multitask/a+b+c`) as "all but <the one dataset the family's others hold>"."""
    short = {n: n.split("/", 1)[1] if "/" in n else n for n in names}
    parts = {n: set(s.split("+")) for n, s in short.items()}
    universe = set().union(*parts.values()) if parts else set()
    if len(names) > 1 and all(len(p) > 1 for p in parts.values()):
        for n, p in parts.items():
            missing = universe - p
            if len(missing) == 1:
                short[n] = f"all but {next(iter(missing))}"
    return short


def loss_series(runs: list[TrainedRun], names: dict[str, str]) -> tuple[list[plots.Series], str]:
    """Each run's training loss: its raw logged points and the curve drawn over them, the loop's per-interval mean
    (INTERVAL_LOSS) when it logged one, else a trailing running mean over the logged points; and what the bold
    curve is, for the panel's title."""
    out, windows, interval = [], set(), []
    for run in runs:
        x, y = _series(run, "loss")
        if not x:
            continue
        means = [r.get(INTERVAL_LOSS) for r in run.history if r.get("loss") is not None]
        if all(m is not None for m in means):
            interval.append(True)
            out.append(plots.Series(names[run.name], x, y, smoothed=means))
        else:
            window = plots.smoothing_window(len(y))
            windows.add(window)
            interval.append(False)
            out.append(plots.Series(names[run.name], x, y, smoothed=plots.running_mean(y, window)))
    if interval and all(interval):
        what = "bold: mean over each log interval; faint: each logged step's loss"
    else:
        w = "/".join(str(w) for w in sorted(windows))
        what = f"bold: mean of the last {w} logged points; faint: each logged step's batch loss"
    return out, what


def lora_panels(runs: list[LoraRun]) -> list[tuple[str, list[plots.Panel]]]:
    """One row per run family: training loss (smoothed over its raw points), lr, and every periodic evaluation the
    runs logged (accuracy, validation loss, text metrics); each run's best checkpoint (best.json) starred on the
    panel of its metric."""
    rows = []
    for fam, members in _by_family(runs).items():
        names = legend_names([r.name for r in members])
        series, what = loss_series(members, names)
        loss = plots.Panel(f"training loss ({what})", "loss (per loss unit)", series, logy=True)
        lr = plots.Panel("learning rate", "lr")
        acc = plots.Panel("in-training eval accuracy (held-out split slice)", "accuracy (fraction correct)",
                          value_format=".4f")
        val = plots.Panel("validation loss (held-out split slice)", "loss (mean per target token)", value_format=".4f")
        bleu = plots.Panel("in-training BLEU-4 (held-out split slice)", "BLEU-4 (0-100)", value_format=".2f")
        frac = plots.Panel("in-training text metrics (held-out split slice)", "fraction / mean (0-1)",
                           value_format=".4f")
        tokens = plots.Panel("in-training generation length (held-out split slice)", "new tokens per document",
                             value_format=".1f")
        where = {"lr": (lr, ""), "eval_acc": (acc, ""), "eval_acc_norm": (acc, "acc_norm"), "eval_loss": (val, ""),
                 "eval_bleu": (bleu, ""), "eval_rouge_l": (frac, "ROUGE-L F1"), "eval_exact_match": (frac, "exact match"),
                 "eval_embed_sim": (frac, "embed sim"), "eval_success_rate": (frac, "success"),
                 "eval_gen_tokens": (tokens, "")}
        for run in members:
            for key, (panel, what) in where.items():
                x, y = _series(run, key)
                if x:
                    panel.series.append(plots.Series(names[run.name], x, y, style=what))
            key = f"eval_{run.best['metric']}" if run.best else None
            if key in where:
                where[key][0].marks[f"{names[run.name]}: best/ by {run.best['metric']} (step {run.best['step']})"] = \
                    (run.best["step"], run.best["value"])
        rows.append((fam, [loss, lr, acc, val, bleu, frac, tokens]))
    return rows


def generator_panels(runs: list) -> list[tuple[str, list[plots.Panel]]]:
    """One row per generator family (the reconstruction generator, each variant): training loss (smoothed over its
    raw points), lr, and the reconstruction error on training and held-out datasets."""
    rows = []
    for fam, members in _by_family(runs).items():
        names = legend_names([r.name for r in members])
        series, what = loss_series(members, names)
        panels = [plots.Panel(f"training loss ({what})", "training loss (generator objective)", series, logy=True),
                  plots.Panel("learning rate", "lr"),
                  plots.Panel("reconstruction error vs the final checkpoint", "relative token error", logy=True)]
        for run in members:
            x, y = _series(run, "lr")
            if x:
                panels[1].series.append(plots.Series(names[run.name], x, y))
            for key, what in (("train_rel_error", "training datasets"), ("heldout_rel_error", "held out")):
                x, y = _series(run, key)
                if x:
                    panels[2].series.append(plots.Series(names[run.name], x, y, style=what))
        rows.append((fam, panels))
    return rows


def _by_family(runs: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(family(run.name), []).append(run)
    return out


LAST_EVAL = (("eval_acc", "acc", ".4f"), ("eval_loss", "loss", ".4f"), ("eval_bleu", "BLEU-4", ".2f"),
             ("eval_rouge_l", "ROUGE-L", ".4f"))


def last_eval(run: LoraRun) -> str:
    """The last periodic evaluation: its accuracy (multiple choice), validation loss, BLEU-4 and ROUGE-L."""
    rows = [r for r in run.history if any(key in r for key, _, _ in LAST_EVAL)]
    if not rows:
        return "–"
    r = rows[-1]
    return f"step {r['step']}: " + ", ".join(f"{name} {fmt(r[key], spec)}" for key, name, spec in LAST_EVAL if key in r)


def final_eval(run: LoraRun) -> str:
    """The final adapter's held-out results (results.json): acc, or BLEU-4, ROUGE-L and validation loss."""
    out = []
    for e in (e for e in run.results if e["label"] == "final"):
        head = f"{e['dataset']} {e['split']} n={e['n']}: "
        if not is_text_entry(e):
            out.append(head + fmt(e["acc"]))
        else:
            loss = f", loss {fmt_text_metric('loss', e['loss'])}" if e.get("loss") is not None else ""
            out.append(head + f"BLEU-4 {fmt_text_metric('bleu', e['bleu'])}, "
                              f"ROUGE-L {fmt_text_metric('rouge_l', e['rouge_l'])}{loss}")
    return ", ".join(out) or "–"


def best_note(run: LoraRun) -> str:
    """What best.json says about the adapter kept in best/, and where its evaluation is."""
    b = run.best
    what = f"{run.name}: best/ is the step-{b['step']} adapter, by {b['metric']} ({b['mode']}) = {fmt(b['value'])} " \
           f"on the periodic evaluation"
    final_step = run.history[-1]["step"] if run.history else None
    if any(e["label"] == "best" for e in run.results):
        return what + "; its held-out results are the `best` rows (results.json)."
    if b["step"] == final_step:
        return what + "; it is the final adapter (the `final` rows)."
    return what + "."


def training_section(runs: Runs, out: Path) -> list[str]:
    lines = ["## Training curves", ""]
    if runs.lora:
        png = plots.curves(lora_panels(runs.lora), "LoRA fine-tuning (one row per run family; legend: the run)",
                           out / "curves_lora.png")
        lines += ["### LoRA", "", image(png, "LoRA training curves"), "",
                  "| run | dataset | steps | final loss | last in-training eval | training s (loop) | checkpoints | "
                  "best (best.json) | final (results.json) |", "|---|---|---|---|---|---|---|---|---|"]
        for run in runs.lora:
            last = run.history[-1] if run.history else {}
            best = f"step {run.best['step']}: {run.best['metric']} {fmt(run.best['value'])}" if run.best else "–"
            lines.append(f"| {run.name} | {run.dataset} | {last.get('step', 0)} | {fmt(last.get('loss'))} | "
                         f"{last_eval(run)} | {fmt(run.elapsed()[-1] if run.history else None, '.1f')} | "
                         f"{len(run.checkpoints)} | {best} | {final_eval(run)} |")
        notes = [best_note(run) for run in runs.lora if run.best]
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    if runs.generator:
        png = plots.curves(generator_panels(runs.generator),
                           "HyperConv generator (one row per generator family; legend: the run, in a pipeline its held-out dataset)",
                           out / "curves_generator.png")
        lines += ["### Generator", "", image(png, "generator training curves"), "",
                  "| run | held out | training datasets | steps | final loss | train rel. error | held-out rel. error | "
                  "training s (loop) |", "|---|---|---|---|---|---|---|---|"]
        for run in runs.generator:
            m, last = run.metrics, run.history[-1] if run.history else {}
            final = m.get("final", {})
            lines.append(f"| {run.name} | {m.get('heldout') or '–'} | {', '.join(m.get('datasets', []))} | "
                         f"{last.get('step', 0)} | {fmt(last.get('loss'))} | {fmt(final.get('train_rel_error'))} | "
                         f"{fmt(final.get('heldout_rel_error'))} | {fmt(run.elapsed()[-1] if run.history else None, '.1f')} |")
        lines.append("")
    if not runs.lora and not runs.generator:
        lines += ["No lora or generator run among the given runs.", ""]
    return lines


# ---------------------------------------------------------------- similarity

def trajectory(run: LoraRun, max_checkpoints: int) -> tuple[list[str], list[Path]]:
    """Evenly spaced trajectory checkpoints (at most max_checkpoints, the last kept) and final/."""
    kept = [c for c in run.checkpoints if (run.path / rundir.CHECKPOINTS / c["path"]).is_dir()]
    if len(kept) > max_checkpoints:
        idx = np.unique(np.linspace(0, len(kept) - 1, max_checkpoints).round().astype(int))
        kept = [kept[i] for i in idx]
    labels = [f"step {c['step']}" for c in kept] + ["final"]
    return labels, [run.path / rundir.CHECKPOINTS / c["path"] for c in kept] + [run.path / rundir.FINAL]


def similarity_section(runs: Runs, out: Path, max_checkpoints: int) -> list[str]:
    lines = ["## Cosine similarity between adapters", "",
             "Cosine of the weight updates ΔW = (alpha/r)·B·A, concatenated over every LoRA module. A cosine is "
             "blind to scale: two adapters at cosine 1 can differ in norm, and in accuracy. A matrix whose entries are "
             "all >= 0 is colored over its own range (the colorbar says which), not over [-1, 1].", ""]
    drawn = 0
    for run in runs.lora:
        labels, dirs = trajectory(run, max_checkpoints)
        if len(dirs) < 2:
            continue
        cos = cosine_of_dirs(dirs)
        title = f"{run.name}: LoRA trajectory checkpoints"
        png = plots.heatmap(cos, labels, title, out / f"similarity_{slug(run.name)}.png")
        lines += [f"### {title}", "", image(png, title), "",
                  f"cos({labels[0]}, final) = {fmt(cos[0, -1], '.3f')}; mean over consecutive checkpoints "
                  f"{fmt(float(np.nanmean(np.diag(cos, 1))), '.3f')}.", ""]
        drawn += 1
    groups = evaluated_adapters(runs)
    for (dataset, model), adapters in groups.items():
        if len(adapters) < 2:
            continue
        several_models = sum(d == dataset for d, _ in groups) > 1
        title = f"adapters evaluated on {dataset}" + (f" (model {model})" if several_models else "")
        try:
            cos = cosine_of_dirs(list(adapters))
        except CheckpointError as e:
            lines += [f"### {title}", "", f"Not comparable: {e}", ""]
            continue
        labels = list(adapters.values())
        name = f"similarity_adapters_{slug(dataset)}" + (f"_{slug(model)}" if several_models else "")
        png = plots.heatmap(cos, labels, title, out / f"{name}.png")
        lines += [f"### {title}", "", image(png, title), ""] + matrix_table(cos, labels) + [""]
        drawn += 1
    if not drawn:
        lines += ["No lora trajectory or evaluate run with two or more adapters among the given runs.", ""]
    return lines


def evaluated_adapters(runs: Runs) -> dict[tuple[str, str], dict[str, str]]:
    """(dataset, model) -> {adapter path: label} over every evaluate run (a pipeline's evaluate/<h> and its
    variants' evaluate-<v>/<h> land in one matrix); a label two runs share gets its run's name."""
    entries = [(run, e) for run in runs.evaluate for e in run.results if e["adapter_path"]]
    counts = Counter((e["dataset"], e.get("model", "?"), e["label"]) for _, e in entries)
    out: dict[tuple[str, str], dict[str, str]] = {}
    for run, e in entries:
        key = (e["dataset"], e.get("model", "?"))
        label = e["label"] if counts[(*key, e["label"])] == 1 else f"{run.name}: {e['label']}"
        out.setdefault(key, {}).setdefault(e["adapter_path"], label)
    return out


def matrix_table(cos: np.ndarray, labels: list[str]) -> list[str]:
    if len(labels) > 16:
        return []
    rows = ["| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for lab, row in zip(labels, cos):
        rows.append(f"| {lab} | " + " | ".join(fmt(v, ".3f") for v in row) + " |")
    return rows


# ---------------------------------------------------------------- timing

def time_to_reach(run: LoraRun, target: float) -> tuple[int, float] | None:
    """(step, loop seconds) of the first in-training evaluation with eval_acc >= target."""
    for row, seconds in zip(run.history, run.elapsed()):
        if row.get("eval_acc") is not None and row["eval_acc"] >= target:
            return row["step"], seconds
    return None


def cpu_elapsed(run: TrainedRun) -> list[float | None]:
    """Cumulative process CPU seconds of the training loop at each history row (its `cpu_s` per interval); None from
    the first row that did not record it on (a run from before CPU seconds were logged)."""
    out, total = [], 0.0
    for row in run.history:
        if total is not None and row.get("cpu_s") is not None:
            total += float(row["cpu_s"])
        else:
            total = None
        out.append(total)
    return out


def cpu_at(run: TrainedRun, step: int | None = None) -> float | None:
    """The loop's CPU seconds up to `step` (default: the end), or None when not recorded."""
    cpu = cpu_elapsed(run)
    for row, c in zip(run.history, cpu):
        if step is not None and row["step"] >= step:
            return c
    return cpu[-1] if cpu and step is None else None


def timing_rows(runs: Runs) -> list[dict]:
    rows = []
    for g in runs.generate:
        dataset = g.summary.get("prompts", {}).get("dataset")
        paths = g.adapter_paths
        accs = [e["acc"] for r in runs.evaluate for e in r.results if not is_text_entry(e)
                and e["adapter_path"] and str(Path(e["adapter_path"])) in paths and e["dataset"] == dataset]
        gen_dir = Path(str(g.summary.get("checkpoint", ""))).resolve()
        step = "/".join(gen_dir.parts[-2:])  # a pipeline dir moved or copied since: its step of the same name
        generator = next((r for r in runs.generator if r.path == gen_dir), None) or \
            next((r for r in runs.generator if r.name == step), None)
        lora = next((r for r in runs.lora if r.dataset == dataset), None)
        row = {"run": g.name, "dataset": dataset, "k": len(accs), "generated_acc": statistics.mean(accs) if accs else None,
               "generate_s": statistics.mean(a["seconds"] for a in g.summary["adapters"]),
               "encoder_load_s": g.summary.get("encoder_load_seconds"),
               "generator_s": generator.elapsed()[-1] if generator and generator.history else None,
               "generator": generator.name if generator else None,
               "lora": lora.name if lora else None, "reach": None, "lora_s": None, "lora_steps": None,
               "lora_evals": 0, "generate_load": fmt_load(step_record(g.path).get("load")),
               "generator_cpu": cpu_at(generator) if generator and generator.history else None,
               "generator_load": fmt_load(step_record(generator.path).get("load")) if generator else None,
               "lora_cpu": None, "lora_load": None, "reach_cpu": None}
        if lora is not None and lora.history:
            row.update(lora_s=lora.elapsed()[-1], lora_steps=lora.history[-1]["step"],
                       lora_evals=len(_series(lora, "eval_acc")[0]), lora_cpu=cpu_at(lora),
                       lora_load=fmt_load(step_record(lora.path).get("load")))
            if accs:
                row["reach"] = time_to_reach(lora, row["generated_acc"])
                if row["reach"] is not None:
                    row["reach_cpu"] = cpu_at(lora, row["reach"][0])
        rows.append(row)
    return rows


def timing_section(runs: Runs, out: Path) -> list[str]:
    lines = ["## Timing: generating an adapter vs fine-tuning one", ""]
    rows = timing_rows(runs)
    if not rows:
        return lines + ["No generate run among the given runs.", ""]
    lines += ["Generation: encoding the prompt batch and decoding one adapter (generate.json, per adapter; the encoder "
              "load is paid once). Fine-tuning: the training loop's time (from its logged throughput, in-training "
              "evaluation included) until its in-training eval_acc first reached the generated adapters' mean accuracy "
              "(evaluations on the lora run's eval slice of the same split, so the accuracies are close, not identical).",
              "", "| held out | generated acc (k) | generate s / adapter | encoder load s | generator training s | "
              "LoRA run | LoRA step reaching it | LoRA s to reach it | LoRA full training s (steps) |",
              "|---|---|---|---|---|---|---|---|---|"]
    per_dataset = Counter(r["dataset"] for r in rows)
    for r in rows:
        held = r["dataset"] if per_dataset[r["dataset"]] == 1 else f"{r['dataset']} ({generated_name(r['run'], 'generate')})"
        if r["reach"] is not None:
            step, secs = r["reach"]
            reach_step, reach_s = str(step), fmt(secs, ".2f")
        elif r["lora"] is None:
            reach_step = reach_s = "no lora run on this dataset"
        elif not r["lora_evals"]:
            reach_step = reach_s = "no in-training evaluation (train.eval_every=0)"
        elif r["generated_acc"] is None:
            reach_step = reach_s = "generated adapters not evaluated"
        else:
            reach_step = reach_s = f"not reached in {r['lora_steps']} steps"
        lines.append(f"| {held} | {fmt(r['generated_acc'])} ({r['k']}) | {fmt(r['generate_s'], '.3f')} | "
                     f"{fmt(r['encoder_load_s'], '.3f')} | {fmt(r['generator_s'], '.1f')} | {r['lora'] or '–'} | "
                     f"{reach_step} | {reach_s} | {fmt(r['lora_s'], '.1f')} ({r['lora_steps'] or '–'}) |")
    groups = timing_groups(rows)
    extras = [b[3] for _, bars in groups for b in bars if len(b) > 3]
    has_cpu = any(e.get("cpu") is not None for e in extras)
    has_load = any(e.get("load") for e in extras)
    if has_cpu or has_load:
        xlabel = ("log scale; bars: wall-clock seconds" + ("; dark inner bars: CPU seconds (all cores) where recorded"
                                                           if has_cpu else "") +
                  "; load: 1-minute load average before→after the step / its cores")
    else:
        xlabel = "wall-clock seconds, log scale (CPU seconds and machine load were not recorded)"
    png = plots.timing(groups, "Generating an adapter vs fine-tuning one, per held-out dataset", xlabel,
                       out / "timing.png")
    if has_cpu or has_load:
        note = ("Bars are wall-clock seconds of steps that ran at different times; each is labelled with the load its "
                "step ran under (from its step record), and, where recorded, the CPU seconds it used (the dark inner "
                "bar: process CPU time over every core, which depends much less on what else the machine ran; above "
                "the wall time when several cores worked). Bars without CPU seconds or load are from records that "
                "predate them. LoRA and generator training: the training loop's own time (wall: from its logged "
                "throughput; CPU: its logged cpu_s), in-training evaluations in it, model loading and the final "
                "evaluation not; generating: wall seconds per adapter (generate.json; no CPU seconds).")
    else:
        note = ("All times are wall-clock seconds of steps that ran at different times: what else the machine "
                "was running then was not recorded, so bars of different steps compare only as well as their "
                "loads did. LoRA and generator training: the training loop's own time from its logged throughput "
                "(in-training evaluations in it; model loading and the final evaluation not).")
    return lines + ["", image(png, "timing"), "", note, ""]


def generated_name(name: str, stem: str) -> str:
    """`generate-task/arc_easy` -> "generated (task)", `generate/arc_easy` -> "generated" (stem "generate"); the
    generator's the same way (stem "generator")."""
    fam = family(name) or name
    word = {"generate": "generated", "generator": "generator"}[stem]
    return f"{word} ({fam.removeprefix(stem + '-')})" if fam.startswith(stem + "-") else word


def timing_groups(rows: list[dict]) -> list[tuple[str, list[tuple[str, float, str, dict]]]]:
    """Per held-out dataset: one bar per generate run (one adapter), per generator trained (once), per distinct
    LoRA step that reached a generated accuracy, and the LoRA's full fine-tune (once). A bar is (label, wall seconds,
    kind, {"cpu": CPU seconds or None, "load": its step's load as fmt_load says it, or None})."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r["dataset"]), []).append(r)
    out = []
    for dataset, members in groups.items():
        bars, seen = [], set()
        for r in members:
            bars.append((f"{generated_name(r['run'], 'generate')}: one adapter", r["generate_s"], "generate",
                         {"cpu": None, "load": r.get("generate_load")}))
        for r in members:
            if r["generator_s"] is not None and r["generator"] not in seen:
                seen.add(r["generator"])
                bars.append((f"{generated_name(r['generator'], 'generator')}: training", r["generator_s"], "generator",
                             {"cpu": r.get("generator_cpu"), "load": r.get("generator_load")}))
        reached: dict[int, tuple[float, list[str], dict]] = {}
        for r in members:
            if r["reach"] is not None:
                step, secs = r["reach"]
                extra = {"cpu": r.get("reach_cpu"), "load": r.get("lora_load")}
                reached.setdefault(step, (secs, [], extra))[1].append(generated_name(r["run"], "generate"))
        for step, (secs, names, extra) in sorted(reached.items()):
            bars.append((f"LoRA to step {step}, its first eval ≥ the acc of {', '.join(names)}", secs, "lora", extra))
        full = next((r for r in members if r["lora_s"] is not None), None)
        if full is not None:
            bars.append((f"LoRA full fine-tune ({full['lora_steps']} steps)", full["lora_s"], "lora",
                         {"cpu": full.get("lora_cpu"), "load": full.get("lora_load")}))
        out.append((dataset, bars))
    return out
