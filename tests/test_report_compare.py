"""The report's "Pipelines compared" section: two dnd pipeline dirs, each role's acc in both and the paired
difference over documents, checked against hand-made per-document scores."""

import json
import re
import statistics
from pathlib import Path

import pytest

from loragen import io
from loragen.errors import DataError
from loragen.evaluation.metrics import mean_stderr
from loragen.evaluation.results import write_results
from loragen.pipeline.dnd import heldout_scores
from loragen.report.compare import pipelines_section
from tests.test_generator_generate import run_stage

N = 8
# role -> per-document acc on the held-out piqa (gen: two generated adapters)
WHOLE = {"base": [1, 0, 0, 1, 0, 1, 0, 0], "oracle": [1, 1, 0, 1, 0, 1, 1, 0], "average": [0, 0, 0, 1, 0, 1, 0, 0],
         "nearest": [1, 0, 0, 0, 0, 1, 0, 0], "gen-000": [1, 0, 0, 1, 0, 0, 0, 0], "gen-001": [1, 0, 1, 1, 0, 0, 0, 0]}
SUBTASKS = {**WHOLE, "average": [1, 1, 0, 1, 0, 1, 1, 1], "gen-000": [1, 1, 1, 1, 0, 1, 1, 0],
            "gen-001": [1, 1, 1, 1, 1, 1, 1, 0]}


def fake_pipeline(root: Path, docs: dict[str, list[int]], train_tasks: int, ids: list[str] | None = None) -> Path:
    """A dnd pipeline dir with what the comparison reads: table.json and evaluate/piqa (results + samples)."""
    h = "piqa"
    ids = ids or [f"piqa/validation/{i}" for i in range(N)]
    paths = {"base": None, "oracle": str(root / "lora" / h / "final"),
             "average": str(root / "generator" / h / "baselines" / "average"),
             "nearest": str(root / "generator" / h / "baselines" / "nearest"),
             "gen-000": str(root / "generate" / h / "adapters" / "gen-000"),
             "gen-001": str(root / "generate" / h / "adapters" / "gen-001")}
    entries, samples = [], []
    for label, acc in docs.items():
        entries.append({"label": label, "adapter_path": paths[label], "model": "minilm", "dataset": h,
                        "split": "validation@eval", "n": N, "acc": sum(acc) / N,
                        "acc_stderr": mean_stderr(acc), "acc_norm": None})
        samples += [{"label": label, "dataset": h, "id": i, "acc": float(a)} for i, a in zip(ids, acc)]
    write_results(root / "evaluate" / h, entries, samples, {"seed": 0})
    io.write_json(root / "table.json", {"rows": [{"heldout": h, "train_tasks": train_tasks}], "steps": {}})
    return root


def mean(xs):
    return sum(xs) / len(xs)


def cells(text: str) -> list[str]:
    row = next(line for line in text.splitlines() if line.startswith("| piqa "))
    return [c.strip() for c in row.strip("|").split("|")]


def test_roles_of_a_pipeline_dir(tmp_path):
    sc = heldout_scores(fake_pipeline(tmp_path / "a", WHOLE, 5), "piqa")
    assert (sc.split, sc.n) == ("validation@eval", N)
    assert sc.acc["oracle"] == mean(WHOLE["oracle"]) == 5 / 8
    assert sc.generated == [2 / 8, 3 / 8] and sc.acc["generated"] == 2.5 / 8
    assert list(sc.docs["generated"].values()) == [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_sub_tasks_vs_whole_differences_per_role(tmp_path):
    a = fake_pipeline(tmp_path / "whole", WHOLE, 5)
    b = fake_pipeline(tmp_path / "sub", SUBTASKS, 21)
    text = "\n".join(pipelines_section([a, b], seed=0))
    row = cells(text)
    assert row[:2] == ["piqa (validation@eval, 8)", "5 → 21"]
    base, oracle, average, nearest, generated = row[2:]
    assert base == "0.375 → 0.375 (+0.000 [+0.000, +0.000])"  # same model in both: the reproduction check
    assert oracle == "0.625 → 0.625 (+0.000 [+0.000, +0.000])"
    # average: 2/8 -> 6/8; generated per-document means 2.5/8 -> 6.5/8
    for cell, (acc_a, acc_b) in ((average, (2 / 8, 6 / 8)), (generated, (2.5 / 8, 6.5 / 8))):
        m = re.fullmatch(r"([\d.]+) → ([\d.]+) \(([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]\)", cell)
        assert m, cell
        assert float(m[1]) == pytest.approx(acc_a, abs=1e-3) and float(m[2]) == pytest.approx(acc_b, abs=1e-3)  # 3 decimals
        d, lo, hi = map(float, m.groups()[2:])
        assert d == pytest.approx(acc_b - acc_a, abs=5e-4) and lo <= d <= hi and hi <= 1.0
    # sanity of the hand numbers: the sub-task generated adapters are better on every document or equal
    assert all(x >= y for x, y in zip(map(statistics.mean, zip(SUBTASKS["gen-000"], SUBTASKS["gen-001"])),
                                      map(statistics.mean, zip(WHOLE["gen-000"], WHOLE["gen-001"]))))
    assert nearest.endswith("(+0.000 [+0.000, +0.000])")


def test_other_documents_are_not_paired(tmp_path):
    a = fake_pipeline(tmp_path / "a", WHOLE, 5)
    b = fake_pipeline(tmp_path / "b", WHOLE, 5, ids=[f"other/{i}" for i in range(N)])
    assert cells("\n".join(pipelines_section([a, b], seed=0)))[2] == "0.375 → 0.375 (– (not the same documents))"


def test_one_pipeline_or_other_dirs_give_no_section(tmp_path):
    a = fake_pipeline(tmp_path / "a", WHOLE, 5)
    assert pipelines_section([a], seed=0) == []
    assert pipelines_section([a, a], seed=0) == []  # the same dir twice counts once
    assert pipelines_section([a, tmp_path], seed=0) == []


def test_duplicate_document_ids_are_a_clear_error(tmp_path):
    a = fake_pipeline(tmp_path / "a", WHOLE, 5, ids=["same"] * N)
    with pytest.raises(DataError, match=r"samples.jsonl: 1 distinct base document ids for n=8"):
        heldout_scores(a, "piqa")


def test_report_stage_writes_the_section(tmp_path):
    a = fake_pipeline(tmp_path / "whole", WHOLE, 5)
    b = fake_pipeline(tmp_path / "sub", SUBTASKS, 21)
    out = tmp_path / "report"
    run_stage(["stage=report", f"report.runs=[{a},{b}]", f"hydra.run.dir={out}", "tracker=none"])
    text = (out / "report.md").read_text()
    assert "## Pipelines compared" in text and f"### `{b}` vs `{a}`" in text
    assert cells(text)[1] == "5 → 21"


def test_missing_evaluate_step_or_rows_are_clear_errors(tmp_path):
    a = fake_pipeline(tmp_path / "a", WHOLE, 5)
    samples = a / "evaluate" / "piqa" / "samples.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    kept = [r for r in rows if not (r["label"] == "gen-001" and r["id"] == "piqa/validation/7")]
    assert len(kept) == len(rows) - 1  # one document of one generated adapter dropped
    io.write_jsonl(samples, kept)
    with pytest.raises(DataError, match=r"samples.jsonl: the rows of 'gen-001' are not the base model's 8 documents"):
        heldout_scores(a, "piqa")
    (a / "evaluate" / "piqa" / "results.json").unlink()
    with pytest.raises(DataError, match=r"evaluate/piqa/results.json is missing; expected the evaluate step of "
                                        r"held-out piqa"):
        heldout_scores(a, "piqa")
