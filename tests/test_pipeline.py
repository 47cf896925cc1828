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
        assert rec.ran == ["a", "b", "c"]
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
        assert not (tmp_path / "b" / "fingerprint.json").exists()


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
    assert again.stderr.count("skipped (done") + again.stdout.count("skipped (done") == 8
