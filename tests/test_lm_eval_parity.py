"""Per-document parity with lm-evaluation-harness on a tiny model, base and adapter, over local JSON task configs.

The task YAMLs below restate lm-eval's own 0-shot configs (arc, openbookqa, boolq, piqa,
winogrande) against the local jsonl files, so both tools read the same documents.
"""

import json
import textwrap

import pytest

from tests.conftest import DATA_DIR, run_cli
from tests.test_evaluate import random_adapter

LIMIT = 25

TASKS = {
    "arc_easy": ("test", '"Question: {{question}}\\nAnswer:"', '"{{choices.label.index(answerKey)}}"', '"{{choices.text}}"', True),
    "arc_challenge": ("test", '"Question: {{question}}\\nAnswer:"', '"{{choices.label.index(answerKey)}}"', '"{{choices.text}}"', True),
    "openbookqa": ("test", "question_stem", '"{{choices.label.index(answerKey.lstrip())}}"', '"{{choices.text}}"', True),
    "boolq": ("validation", '"{{passage}}\\nQuestion: {{question}}?\\nAnswer:"', '"{{ 1 if answer else 0 }}"', '["no", "yes"]', False),
    "piqa": ("validation", '"Question: {{goal}}\\nAnswer:"', "label", '"{{[sol1, sol2]}}"', True),
    "winogrande": ("validation", "!function wino.doc_to_text", "!function wino.doc_to_target", "!function wino.doc_to_choice", False),
}

WINO = '''
def doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in [doc["option1"], doc["option2"]]]
'''


def write_tasks(d):
    d.mkdir()
    (d / "wino.py").write_text(WINO)
    for name, (split, text, target, choice, norm) in TASKS.items():
        metrics = "  - metric: acc\n" + ("  - metric: acc_norm\n" if norm else "")
        (d / f"lg_{name}.yaml").write_text(textwrap.dedent(f"""\
            task: lg_{name}
            dataset_path: json
            dataset_kwargs:
              data_files:
                {split}: {DATA_DIR}/{name}/{split}.jsonl
            output_type: multiple_choice
            {"test_split" if split == "test" else "validation_split"}: {split}
            doc_to_text: {text}
            doc_to_target: {target}
            doc_to_choice: {choice}
            """) + "metric_list:\n" + metrics)


def lm_eval_samples(tmp_path, model_dir, adapter=None):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    if not tasks.exists():
        write_tasks(tasks)
    args = f"pretrained={model_dir},dtype=float32" + (f",peft={adapter}" if adapter else "")
    out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[f"lg_{n}" for n in TASKS], limit=LIMIT,
                                  log_samples=True, batch_size=8, device="cpu", task_manager=TaskManager(include_path=str(tasks)))
    return {name: sorted(out["samples"][f"lg_{name}"], key=lambda s: s["doc_id"]) for name in TASKS}


@pytest.mark.parametrize("model,with_adapter", [("tiny_qwen2", False), ("tiny_qwen2", True), ("tiny_gemma2", False)])
def test_same_predictions_as_lm_eval(tmp_path, paths, model, with_adapter):
    from loragen.models import resolve_model_path
    from tests.test_evaluate import mcfg

    model_dir = resolve_model_path(mcfg(model), paths)
    adapter = random_adapter(paths, model, tmp_path / "ad", seed=5) if with_adapter else None
    ref = lm_eval_samples(tmp_path, model_dir, adapter)
    run = tmp_path / "ours"
    overrides = ["stage=evaluate", f"model={model}", "dataset=commonsense6", f"eval.limit={LIMIT}", f"hydra.run.dir={run}"]
    if adapter:
        overrides += [f"eval.adapters=[{adapter}]", "eval.include_base=false"]
    run_cli(overrides)
    ours = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    results = {e["dataset"]: e for e in json.loads((run / "results.json").read_text())["results"]}
    for name in TASKS:
        mine = [s for s in ours if s["dataset"] == name]
        theirs = ref[name]
        assert len(mine) == len(theirs) == LIMIT
        for s, t in zip(mine, theirs):
            lls = [r[0] for r in t["filtered_resps"]]
            assert s["scores"] == pytest.approx(lls, abs=2e-4), (name, s["id"])
            assert s["acc"] == t["acc"], (name, s["id"])
            if "acc_norm" in t:
                assert s["acc_norm"] == t["acc_norm"], (name, s["id"])
        assert results[name]["acc"] == pytest.approx(sum(t["acc"] for t in theirs) / LIMIT)
