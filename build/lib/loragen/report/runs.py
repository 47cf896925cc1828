"""What a run directory is, from the files it holds, and what it recorded.

    lora       final/adapter_config.json + state/trainer.json (history, fingerprint); checkpoints/manifest.json
    generator  metrics.json + generator/ (history, held-out comparison)
    generate   generate.json (adapters with their generation seconds)
    evaluate   results.json (+ samples.jsonl)

results.json entries (a lora run's own, or an evaluate run's) are multiple-choice (acc, acc_stderr, acc_norm)
or prompt->text (bleu, rouge_l, exact_match, embed_sim, success_rate, gen_seconds, gen_tokens: text metrics);
a lora run may also hold best.json (the adapter kept by ckpt.best_metric in best/).
    pipeline   table.json, or step subdirectories (depth 1 or 2) with a fingerprint.json

A pipeline dir stands for its finished steps; steps of other kinds (tokenize, transfer, report) are
listed with their wall time only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loragen import rundir
from loragen.errors import DataError
from loragen.evaluation.text_evaluator import METRICS as TEXT_METRICS

EXPECTED = ("a pipeline dir (table.json or step dirs with fingerprint.json), a lora run (final/adapter_config.json "
            "and state/trainer.json), a generator run (metrics.json and generator/), a generate run (generate.json) "
            "or an evaluate run (results.json)")


@dataclass
class Run:
    path: Path
    name: str                      # the pipeline step name, or the dir name
    seconds: float | None = None   # the step's wall time, when a pipeline recorded it


@dataclass
class TrainedRun(Run):
    history: list[dict] = field(default_factory=list)   # the training loop's logged rows
    fingerprint: dict = field(default_factory=dict)     # state/trainer.json's (model, dataset, train, global_batch...)

    def elapsed(self) -> list[float]:
        """Cumulative training seconds at each history row, from the throughput the loop logged per interval."""
        batch, out, total, prev = int(self.fingerprint.get("global_batch", 0)), [], 0.0, 0
        for row in self.history:
            rate = row.get("samples_per_s")
            if rate and batch:
                total += (row["step"] - prev) * batch / rate
            out.append(total)
            prev = row["step"]
        return out


@dataclass
class LoraRun(TrainedRun):
    checkpoints: list[dict] = field(default_factory=list)  # manifest entries: step, path, loss, lr, eval metrics
    results: list[dict] = field(default_factory=list)      # its final evaluation (results.json)
    best: dict | None = None                               # best.json: step, metric, value, mode

    @property
    def dataset(self) -> str:
        return str(self.fingerprint.get("dataset", self.path.name))


@dataclass
class GeneratorRun(TrainedRun):
    metrics: dict = field(default_factory=dict)


@dataclass
class GenerateRun(Run):
    summary: dict = field(default_factory=dict)

    @property
    def adapter_paths(self) -> set[str]:
        return {str(Path(a["path"])) for a in self.summary.get("adapters", [])}


@dataclass
class EvaluateRun(Run):
    results: list[dict] = field(default_factory=list)

    def per_document(self) -> dict[tuple[str, str], dict[str, float]]:
        """(label, dataset) -> {document id: acc} from samples.jsonl (empty when the run has none).

        Rows of prompt->text entries (no acc: generated outputs) are left out."""
        path = self.path / rundir.SAMPLES
        text = {(e["label"], e["dataset"]) for e in self.results if is_text_entry(e)}
        out: dict[tuple[str, str], dict[str, float]] = {}
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    s = json.loads(line)
                    if (s["label"], s["dataset"]) in text:
                        continue
                    out.setdefault((s["label"], s["dataset"]), {})[str(s["id"])] = float(s["acc"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{path} line {n}: expected a JSON object with label, dataset, id and acc "
                                    f"({type(e).__name__}: {e})") from None
        return out


@dataclass
class Runs:
    lora: list[LoraRun] = field(default_factory=list)
    generator: list[GeneratorRun] = field(default_factory=list)
    generate: list[GenerateRun] = field(default_factory=list)
    evaluate: list[EvaluateRun] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # every run seen: name, kind, dir, seconds

    def lora_of(self, adapter_path: str | None) -> LoraRun | None:
        """The lora run whose final/ or trajectory checkpoint this adapter is."""
        if not adapter_path:
            return None
        p = Path(adapter_path)
        for run in self.lora:
            if p.parent == run.path or p.parent == run.path / rundir.CHECKPOINTS:
                return run
        return None


def is_text_entry(entry: dict) -> bool:
    """A prompt->text results.json entry (text metrics), not a multiple-choice one (acc)."""
    return "acc" not in entry


def kind_of(path: Path) -> str | None:
    if (path / rundir.FINAL / "adapter_config.json").is_file() and (path / rundir.STATE / rundir.TRAINER).is_file():
        return "lora"
    if (path / rundir.METRICS).is_file() and (path / "generator").is_dir():
        return "generator"
    if (path / rundir.GENERATE_SUMMARY).is_file():
        return "generate"
    if (path / rundir.RESULTS).is_file():
        return "evaluate"
    if (path / rundir.TABLE).is_file() or _step_dirs(path):
        return "pipeline"
    return None


def collect(paths: list[str | Path]) -> Runs:
    """Every run under the given dirs (a pipeline dir stands for its finished steps)."""
    if not paths:
        raise DataError(f"report.runs is empty; give one or more run dirs: {EXPECTED}")
    runs = Runs()
    for path in dict.fromkeys(Path(p).expanduser().resolve() for p in paths):  # a dir given twice counts once
        if not path.is_dir():
            raise DataError(f"report.runs: {path} is not a directory; expected {EXPECTED}")
        kind = kind_of(path)
        if kind is None:
            raise DataError(f"report.runs: {path} is not a run dir loragen knows; expected {EXPECTED}")
        if kind == "pipeline":
            for step in _step_dirs(path):
                name = step.relative_to(path).as_posix()
                seconds = read_json(step / rundir.STEP_RECORD).get("seconds")
                step_kind = kind_of(step)
                runs.steps.append({"name": name, "kind": step_kind or name.split("/")[0], "dir": str(step),
                                   "seconds": seconds})
                if step_kind in LOADERS:
                    _add(runs, LOADERS[step_kind](step, name, seconds))
        else:
            name = _unique(f"{kind}/{path.name}", {s["name"] for s in runs.steps})
            runs.steps.append({"name": name, "kind": kind, "dir": str(path), "seconds": None})
            _add(runs, LOADERS[kind](path, name, None))
    return runs


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`... when runs share a dir name (plots are named after runs)."""
    i, out = 1, name
    while out in taken:
        i += 1
        out = f"{name}-{i}"
    return out


def _step_dirs(root: Path) -> list[Path]:
    """Finished pipeline steps under root (a fingerprint.json at depth 1 or 2), stale copies left out."""
    found = [f.parent for pattern in ("*/fingerprint.json", "*/*/fingerprint.json") for f in root.glob(pattern)]
    return sorted(d for d in found if ".stale-" not in d.relative_to(root).as_posix())


def _add(runs: Runs, run: Run) -> None:
    getattr(runs, {LoraRun: "lora", GeneratorRun: "generator", GenerateRun: "generate",
                   EvaluateRun: "evaluate"}[type(run)]).append(run)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e})") from None


def _key(obj: dict, key: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{path}: expected a JSON object with the key {key!r}")
    return obj[key]


def read_results(path: Path) -> list[dict]:
    """results.json's entries, each checked to be a multiple-choice or a prompt->text entry."""
    results = _key(read_json(path), "results", path)
    for i, e in enumerate(results):
        where = path / f"results[{i}]"
        for k in ("label", "adapter_path", "dataset", "split", "n"):
            _key(e, k, where)
        if is_text_entry(e):
            missing = [k for k in TEXT_METRICS if k not in e]
            if missing:
                raise DataError(f"{where}: expected acc (a multiple-choice entry) or the text metrics "
                                f"{', '.join(TEXT_METRICS)} (a prompt->text entry); missing {', '.join(missing)}")
    return results


def load_lora(path: Path, name: str, seconds: float | None) -> LoraRun:
    trainer = read_json(path / rundir.STATE / rundir.TRAINER)
    manifest = path / rundir.CHECKPOINTS / rundir.MANIFEST
    results = read_results(path / rundir.RESULTS) if (path / rundir.RESULTS).is_file() else []
    best = None
    if (path / rundir.BEST_RECORD).is_file():
        best = read_json(path / rundir.BEST_RECORD)
        for k in ("step", "metric", "value", "mode"):
            _key(best, k, path / rundir.BEST_RECORD)
    return LoraRun(path, name, seconds, history=_key(trainer, "history", path / rundir.STATE / rundir.TRAINER),
                   fingerprint=trainer.get("fingerprint", {}),
                   checkpoints=_key(read_json(manifest), "checkpoints", manifest) if manifest.is_file() else [],
                   results=results, best=best)


def load_generator(path: Path, name: str, seconds: float | None) -> GeneratorRun:
    metrics = read_json(path / rundir.METRICS)
    trainer = path / rundir.STATE / rundir.TRAINER
    fp = read_json(trainer).get("fingerprint", {}) if trainer.is_file() else {}
    return GeneratorRun(path, name, seconds, history=_key(metrics, "history", path / rundir.METRICS), fingerprint=fp,
                        metrics=metrics)


def load_generate(path: Path, name: str, seconds: float | None) -> GenerateRun:
    summary = read_json(path / rundir.GENERATE_SUMMARY)
    _key(summary, "adapters", path / rundir.GENERATE_SUMMARY)
    return GenerateRun(path, name, seconds, summary=summary)


def load_evaluate(path: Path, name: str, seconds: float | None) -> EvaluateRun:
    return EvaluateRun(path, name, seconds, results=read_results(path / rundir.RESULTS))


LOADERS = {"lora": load_lora, "generator": load_generator, "generate": load_generate, "evaluate": load_evaluate}
