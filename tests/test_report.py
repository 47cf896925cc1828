"""stage=report: files, valid PNGs, numbers equal to results.json, ΔW cosines, timing, errors.

Fast tests use a synthetic dnd-shaped pipeline dir written with the stages' own writers (write_adapter,
Checkpointer, write_results) and hand-chosen numbers; a slow test runs the tiny dnd recipe, whose last
step is the report.
"""

import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loragen import io
from loragen.errors import CheckpointError, DataError
from loragen.evaluation.metrics import mean_stderr
from loragen.evaluation.results import write_results
from loragen.lora.adapter_io import Adapter, write_adapter
from loragen.report.runs import collect, kind_of
from loragen.report.similarity import delta_cosine_matrix
from loragen.train.checkpoints import Checkpointer
from tests.conftest import run_cli, run_stage_in_process
from tests.test_generator_generate import run_stage

R, HIDDEN, MODULES = 2, 6, ["query", "value"]
G = torch.Generator().manual_seed(0)
A_FIXED = {m: torch.randn(R, HIDDEN, generator=G) for m in MODULES}  # one shared lora_A (one init seed)


def adapter(b_scale: float, b_seed: int) -> Adapter:
    g = torch.Generator().manual_seed(b_seed)
    tensors = {}
    for m in MODULES:
        prefix = f"base_model.model.encoder.layer.0.attention.self.{m}"
        tensors[f"{prefix}.lora_A.weight"] = A_FIXED[m].clone()
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, R, generator=g) * b_scale
    return Adapter({"peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": MODULES}, tensors)


# Per-document correctness (10 documents) of each evaluated label on the held-out dataset "piqa".
DOCS = {
    "base":                [1, 0, 0, 1, 0, 1, 0, 0, 1, 0],
    "arc_easy/final":      [1, 1, 0, 1, 0, 1, 0, 0, 1, 0],
    "piqa/final":          [1, 1, 1, 1, 0, 1, 1, 0, 1, 0],
    "average":             [0, 0, 0, 1, 0, 1, 0, 0, 1, 0],
    "gen-000":             [1, 1, 0, 1, 1, 1, 0, 0, 1, 0],
    "gen-001":             [1, 0, 0, 1, 0, 1, 1, 1, 1, 0],
}
HISTORY = [  # global batch 4: interval seconds = steps * 4 / samples_per_s -> 4.0 s, then 2.0 s
    {"step": 2, "loss": 1.5, "lr": 1e-4, "grad_norm": 1.0, "eval_acc": 0.4, "units_per_s": 2.0, "samples_per_s": 2.0},
    {"step": 4, "loss": 0.9, "lr": 5e-5, "grad_norm": 1.0, "eval_acc": 0.7, "units_per_s": 4.0, "samples_per_s": 4.0},
]


def write_lora(run: Path, dataset: str, b_seed: int) -> None:
    ckpt = Checkpointer(run / "checkpoints", lambda p: None, every=2)
    for i, row in enumerate(HISTORY):
        ckpt.save_fn = lambda p, i=i: write_adapter(p, adapter(0.5 * (i + 1), b_seed))
        ckpt.save(row["step"], {k: v for k, v in row.items() if k != "step"})
    write_adapter(run / "final", adapter(1.0, b_seed))
    io.write_json(run / "state" / "trainer.json", {"step": 4, "world_size": 1, "history": HISTORY,
                                                   "fingerprint": {"model": "minilm", "dataset": dataset,
                                                                   "global_batch": 4}})
    entry = {"label": "final", "adapter_path": str(run / "final"), "model": "minilm", "model_path": "m",
             "dataset": dataset, "split": "validation", "n": 8, "acc": 0.625, "acc_stderr": 0.18, "acc_norm": None,
             "seconds": 0.1}
    write_results(run, [entry], [], {"seed": 0})
    io.write_json(run / "fingerprint.json", {"fingerprint": "x", "deps": [], "overrides": [], "seconds": 9.5})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A dnd pipeline dir: lora/{arc_easy,piqa}, tokenize/piqa, generator/piqa, generate/piqa, evaluate/piqa."""
    root = tmp_path_factory.mktemp("report") / "dnd"
    write_lora(root / "lora" / "arc_easy", "arc_easy", b_seed=1)
    write_lora(root / "lora" / "piqa", "piqa", b_seed=2)
    (root / "tokenize" / "piqa").mkdir(parents=True)
    io.write_json(root / "tokenize" / "piqa" / "fingerprint.json", {"fingerprint": "t", "seconds": 0.2})

    gen = root / "generator" / "piqa"
    (gen / "generator").mkdir(parents=True)
    write_adapter(gen / "baselines" / "average", adapter(1.0, 1), extra_files={"baseline.json": {"baseline": "average"}})
    gen_hist = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": 0.1, "train_rel_error": 1.0 / s,
                 "heldout_rel_error": 2.0 / s, "units_per_s": 10.0, "samples_per_s": 10.0} for s in (5, 10)]
    io.write_json(gen / "metrics.json", {"status": "completed", "step": 10, "datasets": ["arc_easy"], "heldout": "piqa",
                                         "final": {"train_rel_error": 0.1, "heldout_rel_error": 0.2},
                                         "history": gen_hist})
    io.write_json(gen / "state" / "trainer.json", {"step": 10, "history": gen_hist, "fingerprint": {"global_batch": 2}})
    io.write_json(gen / "fingerprint.json", {"fingerprint": "g", "seconds": 3.0})

    out = root / "generate" / "piqa"
    records = []
    for i, (scale, seed) in enumerate([(-1.0, 1), (3.0, 2)]):  # gen-000 = -(arc_easy's final), gen-001 = 3 x piqa's
        path = write_adapter(out / "adapters" / f"gen-{i:03d}", adapter(scale, seed),
                             extra_files={"prompts.json": {"prompts": ["q"], "dataset": "piqa"}})
        records.append({"name": f"gen-{i:03d}", "path": str(path), "dataset": "piqa", "split": "validation",
                        "num_prompts": 4, "encode_seconds": 0.05, "decode_seconds": 0.01 * (i + 1),
                        "seconds": 0.06 + 0.01 * i})
    io.write_json(out / "generate.json", {"checkpoint": str(gen), "prompts": {"source": "piqa:validation",
                                          "dataset": "piqa", "split": "validation"}, "encoder_load_seconds": 0.5,
                                          "adapters": records, "mean_seconds_per_adapter": 0.065})
    io.write_json(out / "fingerprint.json", {"fingerprint": "p", "seconds": 1.0})

    ev = root / "evaluate" / "piqa"
    paths = {"base": None, "arc_easy/final": str(root / "lora" / "arc_easy" / "final"),
             "piqa/final": str(root / "lora" / "piqa" / "final"), "average": str(gen / "baselines" / "average"),
             "gen-000": records[0]["path"], "gen-001": records[1]["path"]}
    entries, samples = [], []
    for label, docs in DOCS.items():
        entries.append({"label": label, "adapter_path": paths[label], "model": "minilm", "model_path": "m",
                        "dataset": "piqa", "split": "validation@eval", "n": len(docs), "acc": sum(docs) / len(docs),
                        "acc_stderr": mean_stderr(docs), "acc_norm": None, "seconds": 0.5})
        samples += [{"label": label, "dataset": "piqa", "id": f"piqa/validation/{i}", "gold": 0, "scores": [0.0, 0.0],
                     "pred": 0, "acc": float(a)} for i, a in enumerate(docs)]
    write_results(ev, entries, samples, {"seed": 0})
    io.write_json(ev / "fingerprint.json", {"fingerprint": "e", "seconds": 4.0})
    return root


@pytest.fixture(scope="module")
def report(pipeline, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_out")
    run_stage(["stage=report", f"report.runs=[{pipeline}]", f"hydra.run.dir={out}", "tracker=none"])
    return out


def table_rows(text: str, header_start: str) -> dict[str, list[str]]:
    """First column -> cells of the markdown table whose header starts with `header_start`."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_report_files_and_valid_pngs(report):
    text = (report / "report.md").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == ["accuracy_piqa.png", "curves_generator.png", "curves_lora.png", "similarity_adapters_piqa.png",
                    "similarity_lora_arc_easy.png", "similarity_lora_piqa.png", "timing.png"]
    for name in pngs:
        with Image.open(report / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
        assert f"]({name})" in text  # every plot is linked from report.md


def test_accuracy_table_equals_results_json(pipeline, report):
    text = (report / "report.md").read_text()
    rows = table_rows(text, "| label | role |")
    results = json.loads((pipeline / "evaluate" / "piqa" / "results.json").read_text())["results"]
    assert set(rows) == {e["label"] for e in results}
    for e in results:
        role, model, split, n, acc, _, _ = rows[e["label"]]
        assert acc == f"{e['acc']:.4f} ± {e['acc_stderr']:.4f}" and int(n) == e["n"] and split == e["split"]
    assert rows["base"][0] == "base" and rows["piqa/final"][0] == "LoRA (own dataset)"
    assert rows["arc_easy/final"][0] == "LoRA (other dataset)" and rows["average"][0] == "baseline: average"
    assert rows["gen-000"][0] == rows["gen-001"][0] == "generated"
    # Δ vs base: the mean per-document difference, inside its interval (hand-computed from DOCS).
    diff = re.match(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", rows["piqa/final"][-1]).groups()
    assert float(diff[0]) == pytest.approx(0.3) and float(diff[1]) <= 0.3 <= float(diff[2])
    gen = [sum(DOCS[k]) / 10 for k in ("gen-000", "gen-001")]
    assert f"mean {statistics.mean(gen):.4f} ± {statistics.stdev(gen):.4f} (sd over k=2" in text
    lora = table_rows(text, "| run | dataset | steps |")
    assert lora["lora/piqa"][-1] == "piqa validation n=8: 0.6250" and lora["lora/piqa"][4] == "6.0"


def test_similarity_matrices(report):
    text = (report / "report.md").read_text()
    m = table_rows(text, "| | arc_easy/final |")
    # gen-000 is -1 x arc_easy's final, gen-001 is 3 x piqa's, average is arc_easy's: cosines of ΔW are exact.
    assert m["gen-000"][0] == "-1.000" and m["gen-001"][1] == "1.000" and m["average"][0] == "1.000"
    a, p = adapter(1.0, 1), adapter(1.0, 2)
    (expected,) = [delta_cosine_matrix([a, p])[0, 1]]
    assert m["arc_easy/final"][1] == f"{expected:.3f}"
    # trajectory: checkpoints at steps 2 and 4 are 0.5x and 1x final's B with the same A: all cosines 1.
    assert "cos(step 2, final) = 1.000" in text


def test_timing_from_recorded_throughput(report):
    rows = table_rows((report / "report.md").read_text(), "| held out | generated acc")
    gen_acc = statistics.mean(sum(DOCS[k]) / 10 for k in ("gen-000", "gen-001"))  # 0.6: eval_acc 0.7 at step 4
    acc, per_adapter, load, generator_s, lora, step, secs, full = rows["piqa"]
    assert acc == f"{gen_acc:.4f} (2)" and per_adapter == "0.065" and load == "0.500" and lora == "lora/piqa"
    assert generator_s == "2.0" and step == "4" and secs == "6.00" and full == "6.0 (4)"  # generator: 2 x (5 x 2 / 10)


def test_delta_cosine_matches_explicit_delta_w():
    g = torch.Generator().manual_seed(3)
    ads = []
    for i, r in enumerate((2, 3, 4)):
        t = {f"m{k}.lora_A.weight": torch.randn(r, 5, generator=g, dtype=torch.float64) for k in range(2)}
        t |= {f"m{k}.lora_B.weight": torch.randn(4, r, generator=g, dtype=torch.float64) for k in range(2)}
        ads.append(Adapter({"r": r, "lora_alpha": 2 * r + i}, t))
    vec = [torch.cat([(a.scale * a.tensors[f"m{k}.lora_B.weight"] @ a.tensors[f"m{k}.lora_A.weight"]).flatten()
                      for k in range(2)]) for a in ads]
    ref = np.array([[float(x @ y / (x.norm() * y.norm())) for y in vec] for x in vec])
    np.testing.assert_allclose(delta_cosine_matrix(ads), ref, atol=1e-12)
    other = Adapter({"r": 2, "lora_alpha": 2}, {"x.lora_A.weight": torch.ones(2, 5), "x.lora_B.weight": torch.ones(4, 2)})
    with pytest.raises(CheckpointError, match="share no LoRA module of the same shape"):
        delta_cosine_matrix([ads[0], other])


def test_kinds_and_single_run_dirs(pipeline, tmp_path):
    assert kind_of(pipeline) == "pipeline" and kind_of(pipeline / "lora" / "piqa") == "lora"
    assert kind_of(pipeline / "generator" / "piqa") == "generator" and kind_of(pipeline / "generate" / "piqa") == "generate"
    assert kind_of(pipeline / "evaluate" / "piqa") == "evaluate" and kind_of(pipeline / "tokenize" / "piqa") is None
    runs = collect([pipeline / "lora" / "piqa", pipeline / "evaluate" / "piqa"])
    assert [s["name"] for s in runs.steps] == ["lora/piqa", "evaluate/piqa"] and runs.lora[0].elapsed() == [4.0, 6.0]
    copy = shutil.copytree(pipeline / "lora" / "piqa", tmp_path / "other" / "piqa")
    names = [s["name"] for s in collect([pipeline / "lora" / "piqa", copy, pipeline / "lora" / "piqa"]).steps]
    assert names == ["lora/piqa", "lora/piqa-2"]  # plots are named after runs: no two alike
    steps = {s["name"]: s for s in collect([pipeline]).steps}
    assert steps["tokenize/piqa"]["kind"] == "tokenize" and steps["lora/piqa"]["seconds"] == 9.5


def test_unrecognised_dirs_are_clear_errors(pipeline, tmp_path):
    with pytest.raises(DataError, match=rf"report.runs: {re.escape(str(pipeline / 'tokenize' / 'piqa'))} is not a run "
                                        r"dir loragen knows; expected a pipeline dir .*an evaluate run \(results.json\)"):
        collect([pipeline / "tokenize" / "piqa"])
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'nope'))} is not a directory"):
        collect([tmp_path / "nope"])
    with pytest.raises(DataError, match="report.runs is empty"):
        collect([])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"bad/results.json: expected a JSON object with the key 'results'"):
        collect([tmp_path / "bad"])
    shutil.copytree(pipeline / "evaluate" / "piqa", tmp_path / "ev")
    with open(tmp_path / "ev" / "samples.jsonl", "a") as f:
        f.write('{"label": "base"}\n')
    with pytest.raises(DataError, match=r"ev/samples.jsonl line 61: expected a JSON object with label, dataset, id and acc"):
        collect([tmp_path / "ev"]).evaluate[0].per_document()


def test_cli_error_names_the_dir(tmp_path):
    proc = run_cli(["stage=report", f"report.runs=[{tmp_path}]", f"hydra.run.dir={tmp_path / 'out'}"], check=False)
    assert proc.returncode == 2
    assert f"loragen: error: report.runs: {tmp_path} is not a run dir loragen knows" in proc.stderr


@pytest.mark.slow
def test_dnd_recipe_ends_with_a_report(tmp_path):
    """The tiny dnd recipe: its report step's numbers equal the evaluate step's results.json."""
    run = tmp_path / "dnd"
    gen = '["generator.num_prompts=4","generator.prompt_len=16","generator.prompt_pool=16",' \
          '"generator.features=[[4,16,384],[8,8,64],[144,10,66]]"]'
    lora = '["train.max_steps=4","ckpt.every=2","train.per_device_batch=4","lora.train_limit=16","lora.eval_limit=8",' \
           '"lora.final_eval_limit=8","lora.eval_base=false","train.eval_every=2"]'
    run_cli(["experiment=dnd_minilm", f"hydra.run.dir={run}", "pipeline.dnd.datasets=[arc_easy,piqa]",
             "pipeline.dnd.heldout=[piqa]", "pipeline.dnd.num_generated=2", f"pipeline.dnd.lora_overrides={lora}",
             f"pipeline.dnd.generator_overrides={gen}",
             'pipeline.dnd.generator_train_overrides=["train.max_steps=4","train.eval_every=2","train.log_every=2",'
             '"train.per_device_batch=2","generator.eval_adapters=1"]',
             'pipeline.dnd.eval_overrides=["eval.limit=20"]', f"paths.cache_dir={tmp_path / 'cache'}"])
    text = (run / "report" / "report.md").read_text()
    rows = table_rows(text, "| label | role |")
    for e in json.loads((run / "evaluate" / "piqa" / "results.json").read_text())["results"]:
        assert rows[e["label"]][4] == f"{e['acc']:.4f} ± {e['acc_stderr']:.4f}"
    (table,) = json.loads((run / "table.json").read_text())["rows"]
    d, lo, hi = table["oracle_diff"]  # the pipeline table's interval: same documents, order and seed
    assert rows["oracle"][-1] == f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    assert (run / "report" / "timing.png").is_file() and (run / "report" / "similarity_lora_piqa.png").is_file()
    assert "| piqa |" in text  # the timing row of the held-out dataset
    # the forest plot is the report's first figure, and the pipeline draws it next to table.md too
    assert [line for line in text.splitlines() if line.startswith("![")][0].endswith("(forest.png)")
    assert (run / "report" / "forest.png").is_file() and (run / "forest.png").is_file()
    assert "computed from the evaluate steps" in text


# ---------------------------------------------------------------- prompt -> text runs

# A hand-made evaluate run on Chinese instructions (eval.method=generate): label -> text metrics, with the
# cells the report must print (BLEU-4 2 decimals, fractions 4, s / doc 3, tokens / doc 1; embed sim flagged †).
ZH = {
    "base": ({"bleu": 3.14159, "rouge_l": 0.125, "exact_match": 0.0, "embed_sim": 0.33333, "success_rate": 0.5,
              "gen_seconds": 0.12345, "gen_tokens": 7.25},
             ["3.14", "0.1250", "0.0000", "0.3333 †", "0.5000", "0.123", "7.2"]),
    "zh_lora": ({"bleu": 41.666, "rouge_l": 0.5625, "exact_match": 0.25, "embed_sim": 0.71875, "success_rate": 1.0,
                 "gen_seconds": 0.0625, "gen_tokens": 4.0},
                ["41.67", "0.5625", "0.2500", "0.7188 †", "1.0000", "0.062", "4.0"]),
}


@pytest.fixture(scope="module")
def text_eval(tmp_path_factory) -> Path:
    """An evaluate run holding prompt->text entries (zh, English-only embed sim) and one multiple-choice entry."""
    run = tmp_path_factory.mktemp("text_eval") / "gen_zh"
    ad = write_adapter(run.parent / "zh_lora", adapter(1.0, 3))
    entries, samples = [], []
    for label, (metrics, _) in ZH.items():
        entries.append({"label": label, "adapter_path": None if label == "base" else str(ad), "model": "tiny_qwen2",
                        "model_path": "m", "dataset": "alpaca_zh", "split": "validation", "n": 4, **metrics,
                        "language": "zh", "bleu_tokenize": "zh", "embed_sim_english_only": True, "seconds": 1.0})
        samples += [{"label": label, "dataset": "alpaca_zh", "id": f"zh/{i}", "prompt": "问题", "output": "答案",
                     "reference": "答案", "tokens": 2, "terminated": True, "seconds": 0.1, "bleu": 0.0, "rouge_l": 1.0,
                     "exact_match": 1.0, "embed_sim": 0.5, "success": True} for i in range(4)]
    entries.append({"label": "base", "adapter_path": None, "model": "tiny_qwen2", "model_path": "m",
                    "dataset": "arc_easy", "split": "test", "n": 4, "acc": 0.75, "acc_stderr": 0.25, "acc_norm": None,
                    "seconds": 1.0})
    samples += [{"label": "base", "dataset": "arc_easy", "id": f"arc/{i}", "gold": 0, "scores": [0.0], "pred": 0,
                 "acc": float(i > 0)} for i in range(4)]
    write_results(run, entries, samples, {"seed": 0})
    return run


def generation_rows(text: str, dataset: str) -> dict[str, list[str]]:
    """The Generation metrics table of `dataset`: display label -> cells."""
    section = text[text.index("## Generation metrics"):]
    return table_rows(section[section.index(f"### {dataset} "):], "| label | role | model | split | n | BLEU-4 |")


def test_text_and_multiple_choice_runs_in_one_report(text_eval, pipeline, tmp_path):
    out = tmp_path / "out"
    run_stage(["stage=report", f"report.runs=[{text_eval},{pipeline / 'evaluate' / 'piqa'}]", f"hydra.run.dir={out}",
               "tracker=none"])
    text = (out / "report.md").read_text()
    rows = generation_rows(text, "alpaca_zh")
    assert list(rows) == ["base", "zh_lora"]  # one run evaluated alpaca_zh: labels without the run's name
    for label, (_, cells) in ZH.items():
        role, model, split, n, *metrics = rows[label]
        assert (model, split, n) == ("tiny_qwen2", "validation", "4") and metrics == cells
    assert rows["base"][0] == "base" and rows["zh_lora"][0] == "adapter"
    assert "### alpaca_zh (language zh; BLEU tokenize=zh)" in text
    assert "† all-MiniLM-L6-v2 is an English-only model and these outputs are in zh" in text
    # the multiple-choice entries of both runs keep their accuracy tables (text rows left out of per_document)
    assert table_rows(text, "| label | role |")["base"][4] == "0.7500 ± 0.2500"
    assert table_rows(text[text.index("### piqa"):], "| label | role |")["piqa/final"][4] == "0.7000 ± 0.1528"  # 7 of 10
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "generation_alpaca_zh.png" in pngs and "accuracy_arc_easy.png" in pngs and "accuracy_piqa.png" in pngs
    with Image.open(out / "generation_alpaca_zh.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 600
    assert "](generation_alpaca_zh.png)" in text


def test_text_entry_without_its_metrics_is_a_clear_error(tmp_path):
    entry = {"label": "base", "adapter_path": None, "dataset": "d", "split": "test", "n": 2, "bleu": 1.0,
             "rouge_l": 0.5}
    io.write_json(tmp_path / "ev" / "results.json", {"results": [entry]})
    with pytest.raises(DataError, match=r"ev/results.json/results\[0\]: expected acc \(a multiple-choice entry\) or the "
                                        r"text metrics bleu, .* missing exact_match, embed_sim, success_rate, "
                                        r"gen_seconds, gen_tokens"):
        collect([tmp_path / "ev"])


TEXT_LORA = ["stage=lora", "model=tiny_qwen2", "dataset=arc_easy_instruct", "hardware=cpu", "tracker=none",
             "train.per_device_batch=4", "train.lr=5e-3", "lora.train_limit=8", "lora.eval_limit=4",
             "lora.final_eval_limit=6", "train.max_steps=3", "train.eval_every=2", "train.log_every=1", "ckpt.every=2",
             "ckpt.best_metric=bleu", "lora.generation.max_new_tokens=6"]


@pytest.fixture(scope="module")
def text_lora(tmp_path_factory) -> Path:
    """A real, tiny lora run on converted ARC-Easy instructions (SFT, periodic loss + text metrics, best/)."""
    out = tmp_path_factory.mktemp("text_lora") / "arc_instruct"
    run_stage_in_process(TEXT_LORA, out)
    return out


def text_cells(e: dict) -> list[str]:
    """The metric cells results.md prints for a results.json entry (en: no † flag), then val loss."""
    return [f"{e['bleu']:.2f}", f"{e['rouge_l']:.4f}", f"{e['exact_match']:.4f}", f"{e['embed_sim']:.4f}",
            f"{e['success_rate']:.4f}", f"{e['gen_seconds']:.3f}", f"{e['gen_tokens']:.1f}", f"{e['loss']:.4f}"]


@pytest.mark.slow
def test_report_of_a_real_text_lora_run(text_lora, tmp_path):
    out = tmp_path / "out"
    run_stage(["stage=report", f"report.runs=[{text_lora}]", f"hydra.run.dir={out}", "tracker=none"])
    text = (out / "report.md").read_text()
    results = json.loads((text_lora / "results.json").read_text())["results"]
    best = json.loads((text_lora / "best.json").read_text())
    # the one periodic evaluation (step 2) is the best; final is step 3, so best/ is evaluated too
    assert (best["step"], best["metric"]) == (2, "bleu") and [e["label"] for e in results] == ["base", "final", "best"]
    rows = generation_rows(text, "arc_easy_instruct")
    assert list(rows) == ["base", "final", "best"]
    for e in results:
        role, model, split, n, *metrics = rows[e["label"]]
        assert (model, split, int(n)) == ("tiny_qwen2", "test", 6) and metrics == text_cells(e)
    assert rows["final"][0] == rows["best"][0] == "LoRA (own dataset)" and rows["base"][0] == "base"
    lora = table_rows(text, "| run | dataset | steps |")["lora/arc_instruct"]
    final = next(e for e in results if e["label"] == "final")
    assert lora[-2] == "step 2: bleu 0.0000" and lora[-1] == (
        f"arc_easy_instruct test n=6: BLEU-4 {final['bleu']:.2f}, ROUGE-L {final['rouge_l']:.4f}, loss {final['loss']:.4f}")
    history = json.loads((text_lora / "state" / "trainer.json").read_text())["history"]
    (ev,) = [h for h in history if "eval_loss" in h]
    assert lora[3] == f"step 2: loss {ev['eval_loss']:.4f}, BLEU-4 {ev['eval_bleu']:.2f}, ROUGE-L {ev['eval_rouge_l']:.4f}"
    assert "lora/arc_instruct: best/ is the step-2 adapter, by bleu (max)" in text and "the `best` rows" in text
    assert "No multiple-choice evaluation" not in text and "No evaluate run among the given runs." in text
    assert {"curves_lora.png", "generation_arc_easy_instruct.png", "similarity_lora_arc_instruct.png"} <= \
        {p.name for p in out.glob("*.png")}


@pytest.mark.slow
def test_mixed_report_of_a_text_run_and_a_multiple_choice_run(text_lora, pipeline, tmp_path):
    out = tmp_path / "out"
    run_stage(["stage=report", f"report.runs=[{text_lora},{pipeline / 'lora' / 'piqa'},{pipeline / 'evaluate' / 'piqa'}]",
               f"hydra.run.dir={out}", "tracker=none"])
    text = (out / "report.md").read_text()
    rows = generation_rows(text, "arc_easy_instruct")
    for e in json.loads((text_lora / "results.json").read_text())["results"]:
        assert rows[e["label"]][4:] == text_cells(e)
    acc = table_rows(text, "| label | role |")
    for e in json.loads((pipeline / "evaluate" / "piqa" / "results.json").read_text())["results"]:
        assert acc[e["label"]][4] == f"{e['acc']:.4f} ± {e['acc_stderr']:.4f}"
    lora = table_rows(text, "| run | dataset | steps |")
    assert lora["lora/piqa"][-1] == "piqa validation n=8: 0.6250" and lora["lora/piqa"][3] == "step 4: acc 0.7000"
    assert lora["lora/arc_instruct"][-1].startswith("arc_easy_instruct test n=6: BLEU-4 ")
    assert {"accuracy_piqa.png", "generation_arc_easy_instruct.png", "curves_lora.png"} <= {p.name for p in out.glob("*.png")}
