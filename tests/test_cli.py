"""The CLI: run dir contents, stage dispatch, clear errors."""

import json

from omegaconf import OmegaConf

from loragen.tracking import NullTracker, make_tracker
from tests.conftest import compose, run_cli


def test_data_stage_writes_run_dir(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["stage=data", "dataset=arc_challenge", f"hydra.run.dir={run}"])
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["arc_challenge"]["test"]["n"] == 1172
    assert summary["arc_challenge"]["validation"]["n"] == 299
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.dataset.name == "arc_challenge" and cfg.paths.data_dir  # resolved, not interpolations
    assert (run / "loragen.log").is_file()
    assert "Planetary days will become shorter.'  <- gold" in proc.stdout
    assert not list(run.glob(".*.tmp"))  # no temp files left behind


def test_unknown_stage_lists_valid_ones():
    proc = run_cli(["stage.name=nope"], check=False)
    assert proc.returncode == 2
    assert "unknown stage 'nope'; valid stages: data, lora" in proc.stderr


def test_bad_split_is_a_clean_error(tmp_path):
    proc = run_cli(["stage=data", "dataset=arc_easy", "dataset.eval_split=dev", f"hydra.run.dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert "split 'dev' of dataset 'arc_easy' not found" in proc.stderr and "Traceback" not in proc.stderr


def test_trackers(tmp_path):
    assert isinstance(make_tracker(compose(["tracker=none"]), tmp_path), NullTracker)
    cfg = compose(["tracker=swanlab", "tracker.mode=disabled"])
    assert isinstance(make_tracker(cfg, tmp_path), NullTracker)
    cfg = compose(["tracker=swanlab", "tracker.mode=offline"])
    assert isinstance(make_tracker(cfg, tmp_path, is_main=False), NullTracker)
