"""The pipeline engine (fingerprints, skip, rerun of what changed, resume) and the paw recipe end to end."""

import json

import pytest
from hydra import initialize_config_dir

from loragen import io
from loragen.errors import ConfigError
from loragen.pipeline.engine import Step, quote, run_steps
from tests.conftest import CONF, run_cli


class Recorder:
    """A fake executor: writes each step's outputs and records which steps ran."""

    def __init__(self, fail_on=None):
        self.ran, self.fail_on = [], fail_on

    def __call__(self, step, cfg, step_dir):
        step_dir.mkdir(parents=True, exist_ok=True)
        if step.name == self.fail_on:
            raise RuntimeError("boom")
        self.ran.append(step.name)
        for o in step.outputs:
            io.write_text(step_dir / o, cfg.dataset.name)


def chain(a_seed=0):
    return [
        Step("a", ["stage=data", "dataset=arc_easy", f"seed={a_seed}"], ["out.txt"]),
        Step("b", ["stage=data", "dataset=boolq"], ["out.txt"], ["a"]),
        Step("c", ["stage=data", "dataset=piqa"], ["out.txt"]),
    ]


def test_skip_rerun_and_resume(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        rec = Recorder()
        run_steps(chain(), tmp_path, [], rec)
        assert rec.ran == ["a", "c", "b"]  # waves: a and c need nothing, b waits for a
        assert (tmp_path / "b" / "out.txt").read_text() == "boolq"
        rec = Recorder()
        status = run_steps(chain(), tmp_path, [], rec)
        assert rec.ran == [] and {s["status"] for s in status.values()} == {"skipped"}
        # a's config changes: a and its dependant b rerun, c does not; old outputs are kept aside.
        rec = Recorder()
        run_steps(chain(a_seed=1), tmp_path, [], rec)
        assert rec.ran == ["a", "b"]
        assert len(list(tmp_path.glob("a.stale-*"))) == 1
        # An interrupted step (no fingerprint yet) runs again in place; finished ones stay skipped.
        (tmp_path / "c" / "fingerprint.json").unlink()
        rec = Recorder()
        run_steps(chain(a_seed=1), tmp_path, [], rec)
        assert rec.ran == ["c"]
        # A crash stops the pipeline without recording the failed step.
        rec = Recorder(fail_on="b")
        with pytest.raises(RuntimeError):
            run_steps(chain(a_seed=2), tmp_path, [], rec)
        assert json.loads((tmp_path / "a" / "fingerprint.json").read_text())["overrides"][-1] == "seed=2"
        assert len(list(tmp_path.glob("a.stale-*"))) == 2  # a changed twice, perhaps within one second
        assert not (tmp_path / "b" / "fingerprint.json").exists()


def test_independent_steps_go_out_together(tmp_path):
    class Batched(Recorder):
        def __init__(self):
            super().__init__()
            self.waves = []

        def run_many(self, items):
            self.waves.append([step.name for step, _, _ in items])
            for item in items:
                self(*item)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        rec = Batched()
        run_steps(chain(), tmp_path, [], rec)
    assert rec.waves == [["a", "c"]] and rec.ran == ["a", "c", "b"]  # b alone: no array of one


def test_bad_dependencies_and_missing_outputs(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigError, match=r"step b depends on \['zz'\], which no step defines"):
            run_steps([Step("b", ["stage=data"], [], ["zz"])], tmp_path, [], Recorder())
        with pytest.raises(ConfigError, match=r"step a finished without its outputs \['nope.txt'\]"):
            run_steps([Step("a", ["stage=data"], ["nope.txt"])], tmp_path, [], lambda s, c, d: d.mkdir(parents=True))
        with pytest.raises(ConfigError, match="step a: cannot compose its config"):
            run_steps([Step("a", ["model=no_such"], [])], tmp_path, [], Recorder())


def test_quote_makes_hydra_values():
    assert quote(None) == "null" and quote([1, "a b"]) == "[1,'a b']" and quote("it's") == "'it\\'s'"


def test_paw_tiny_end_to_end(tmp_path):
    run = tmp_path / "paw"
    lora = '["train.max_steps=4","train.lr=1e-2","ckpt.every=0","lora.eval_limit=10","lora.final_eval_limit=20","lora.eval_base=false"]'
    args = ["experiment=paw_tiny", f"hydra.run.dir={run}", f"pipeline.paw.lora_overrides={lora}",
            'pipeline.paw.eval_overrides=["eval.limit=20"]']
    proc = run_cli(args)
    table = json.loads((run / "table.json").read_text())
    (row,) = table["rows"]
    for col, step in [("source_base", "eval_source_base"), ("transferred", "eval_transferred"), ("target_lora", "eval_target_lora")]:
        (entry,) = json.loads((run / step / "arc_easy" / "results.json").read_text())["results"]
        assert row[col] == entry["acc"] and entry["n"] == 20
    assert (run / "transfer" / "arc_easy" / "adapter" / "adapter_config.json").is_file()
    assert "| arc_easy (test, 20) |" in (run / "table.md").read_text() and "transferred" in proc.stdout
    again = run_cli(args)
    assert again.stderr.count("skipped (done") + again.stdout.count("skipped (done") == 9  # 8 steps + report
    assert (run / "report" / "report.md").is_file()


TASK_VARIANT = ('++pipeline.dnd.generators={task:{objective:task,shape:["generator.residual=true"],'
                'overrides:["generator.task.batch_size=4","train.per_device_batch=1"]}}')


def test_dnd_recipe_end_to_end(tmp_path):
    """lora x3 -> tokenize -> generator (one held out) -> generate -> evaluate -> table, tiny settings; with the
    multi-task LoRA baseline and a task-objective generator beside the reconstruction one."""
    run = tmp_path / "dnd"
    args = ["experiment=dnd_minilm", "+debug=tiny", f"hydra.run.dir={run}", "pipeline.dnd.multitask=true", TASK_VARIANT,
            f"paths.cache_dir={tmp_path / 'cache'}"]
    dry = run_cli([*args, "pipeline.dry_run=true"]).stdout
    assert "multitask/arc_easy+arc_challenge" in dry and "generator-task/piqa" in dry and "generate-task/piqa" in dry
    assert "evaluate-task/piqa" in dry
    run_cli(args)
    (row,) = json.loads((run / "table.json").read_text())["rows"]
    results = [e for ev in ("evaluate", "evaluate-task") for e in
               json.loads((run / ev / "piqa" / "results.json").read_text())["results"]]
    by_path = {e["adapter_path"]: e for e in results}
    assert row["split"] == "validation@eval" and row["n"] == 30 and row["base"] == by_path[None]["acc"]
    assert row["oracle"] == by_path[str(run / "lora" / "piqa" / "final")]["acc"]
    gen_accs = [e["acc"] for p, e in by_path.items() if p and "/generate/" in p]
    assert len(gen_accs) == 2 and row["generated"] == pytest.approx(sum(gen_accs) / 2)
    roles = {e["label"]: e["role"] for e in results}
    assert roles["oracle"] == "oracle" and roles["multitask"] == "multitask" and roles["base"] == "base"
    assert roles["generated-task/gen-001"] == "generated-task" and roles["lora/arc_easy"] == "lora"
    mt = by_path[str(run / "multitask" / "arc_easy+arc_challenge" / "final")]
    assert row["multitask"] == mt["acc"]
    task_accs = [e["acc"] for e in results if e["role"] == "generated-task"]
    task = row["generators"]["task"]
    assert task["k"] == 2 and task["acc"] == pytest.approx(sum(task_accs) / 2) and task["train_tasks"] == 2
    # generated - multitask is the mean per-document difference, inside its interval
    samples = [json.loads(x) for ev in ("evaluate", "evaluate-task")
               for x in (run / ev / "piqa" / "samples.jsonl").read_text().splitlines()]
    per = {}
    for s in samples:
        per.setdefault(s["label"], []).append(s["acc"])
    gen_mean = [(a + b) / 2 for a, b in zip(per["generated-task/gen-000"], per["generated-task/gen-001"])]
    d, lo, hi = task["minus_multitask"]
    assert d == pytest.approx(sum(g - m for g, m in zip(gen_mean, per["multitask"])) / 30) and lo <= d <= hi
    assert "Generators against the multi-task LoRA" in (run / "table.md").read_text()
    assert "generated-task" in (run / "report" / "report.md").read_text()
    # the task generator trained on no LoRA of its training datasets: only the held-out one's token set
    task_meta = json.loads((run / "generator-task" / "piqa" / "generator" / "generator.json").read_text())
    assert task_meta["objective"] == "task" and task_meta["tokens"]["arc_easy"] is None
    # The difference to base is the mean per-document difference, inside its own interval.
    samples = [json.loads(x) for x in (run / "evaluate" / "piqa" / "samples.jsonl").read_text().splitlines()]
    base = [s["acc"] for s in samples if s["label"] == "base"]
    avg = [s["acc"] for s in samples if s["label"] == "average"]
    diff, lo, hi = row["average_diff"]
    assert diff == pytest.approx(sum(a - b for a, b in zip(avg, base)) / 30) and lo <= diff <= hi
    assert row["nearest_dataset"] in ("arc_easy", "arc_challenge")
    assert "| piqa (validation@eval, 30) |" in (run / "table.md").read_text()
