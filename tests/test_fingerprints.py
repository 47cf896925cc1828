"""Pipeline fingerprints by content: result-neutral keys declared once, data hashed, not its path."""

import json
import shutil

import pytest
from hydra import initialize_config_dir

from loragen.errors import ConfigError
from loragen.pipeline.engine import Step, run_steps
from tests.conftest import CONF, DATA_DIR
from tests.test_pipeline import Recorder


def lora_steps(*extra):
    """Two LoRA steps (arc_easy, piqa) and one that depends on the first."""
    return [Step("lora/arc_easy", ["stage=lora", "model=minilm", "dataset=arc_easy", *extra], ["out.txt"]),
            Step("lora/piqa", ["stage=lora", "model=minilm", "dataset=piqa", *extra], ["out.txt"]),
            Step("tokenize/arc_easy", ["stage=tokenize", "model=minilm", "dataset=arc_easy", "tokenize.checkpoints=/x"], ["out.txt"],
                 ["lora/arc_easy"])]


def run(steps, root, data_dir=DATA_DIR):
    rec = Recorder()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        run_steps(steps, root, [f"paths.data_dir={data_dir}"], rec)
    return rec.ran


@pytest.mark.parametrize("neutral", ["lora.eval_limit=7", "train.log_every=3", "train.eval_every=5", "tracker=none",
                                     "paths.cache_dir=/elsewhere"])
def test_result_neutral_keys_skip_a_finished_step(tmp_path, neutral):
    assert run(lora_steps(), tmp_path) == ["lora/arc_easy", "lora/piqa", "tokenize/arc_easy"]
    assert run(lora_steps(neutral), tmp_path) == []
    assert not list(tmp_path.glob("*/*.stale-*"))


def test_the_same_data_under_another_path_skips(tmp_path):
    link = tmp_path / "data-link"
    link.symlink_to(DATA_DIR)
    copy = tmp_path / "data-copy"
    shutil.copytree(DATA_DIR, copy)
    run(lora_steps(), tmp_path / "run")
    assert run(lora_steps(), tmp_path / "run", data_dir=link) == []
    assert run(lora_steps(), tmp_path / "run", data_dir=copy) == []


def test_a_changed_key_or_data_file_reruns_exactly_what_depends_on_it(tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    run(lora_steps(), tmp_path / "run", data_dir=data)
    with caplog.at_level("INFO", logger="loragen.pipeline.engine"):
        assert run(lora_steps("lora.r=4"), tmp_path / "run", data_dir=data) == ["lora/arc_easy", "lora/piqa",
                                                                               "tokenize/arc_easy"]
    assert "config.lora.r: 8 -> 4" in caplog.text and "moved aside in this run" in caplog.text
    piqa = data / "piqa" / "validation.jsonl"
    piqa.chmod(0o644)
    piqa.write_text(piqa.read_text().replace("a", "A", 1))
    caplog.clear()
    with caplog.at_level("INFO", logger="loragen.pipeline.engine"):
        assert run(lora_steps("lora.r=4"), tmp_path / "run", data_dir=data) == ["lora/piqa"]
    assert "data.piqa:" in caplog.text
    assert len(list((tmp_path / "run" / "lora").glob("piqa.stale-*"))) == 2


def test_an_unset_data_dir_while_offline_moves_nothing(tmp_path, monkeypatch):
    run(lora_steps(), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="no local data dir.*Nothing was moved or run"):
        run(lora_steps(), tmp_path, data_dir="null")
    with pytest.raises(ConfigError, match="does not exist; nothing was moved or run"):
        run(lora_steps(), tmp_path, data_dir=tmp_path / "nowhere")
    assert not list(tmp_path.glob("*/*.stale-*"))


def test_a_step_recorded_before_content_fingerprints_is_kept_when_its_overrides_match(tmp_path):
    run(lora_steps(), tmp_path)
    for step in lora_steps():  # the old engine's record: a hash of the whole config, no content
        (tmp_path / step.name / "fingerprint.json").write_text(json.dumps(
            {"fingerprint": "0123456789abcdef", "deps": step.deps, "overrides": step.overrides}))
    assert run(lora_steps(), tmp_path) == []
    record = json.loads((tmp_path / "tokenize" / "arc_easy" / "fingerprint.json").read_text())
    assert "content" in record and record["fingerprint"] != "0123456789abcdef"
    # an old record made with other overrides is redone, and what depends on it too
    (tmp_path / "lora" / "piqa" / "fingerprint.json").write_text(json.dumps(
        {"fingerprint": "0123456789abcdef", "deps": [], "overrides": ["stage=lora", "model=minilm", "dataset=piqa",
                                                                       "lora.r=4"]}))
    assert run(lora_steps(), tmp_path) == ["lora/piqa"]
