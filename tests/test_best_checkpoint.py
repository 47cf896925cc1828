"""ckpt.best_metric: the best adapter by a validation metric kept as best/ with best.json."""

import json

import pytest
from accelerate import Accelerator

from loragen.errors import ConfigError
from loragen.train import BestCheckpoint, fit
from tests.train_helpers import records, tiny_lora, train_cfg


class StepWriter:
    """A save_fn writing the step being evaluated into the saved dir, so a test can tell which one best/ holds."""

    step = 0

    def __call__(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "step.txt").write_text(str(self.step))


def feed(best: BestCheckpoint, key: str, values: list[float], steps: list[int]) -> list[bool]:
    out = []
    for step, v in zip(steps, values):
        best.save_fn.step = step
        out.append(best.update(step, {key: v, "loss": 9.0}))
    return out


def test_max_metric_keeps_the_first_best(tmp_path):
    best = BestCheckpoint(tmp_path, StepWriter(), metric="bleu")
    assert best.mode == "max" and best.key == "eval_bleu"
    saved = feed(best, "eval_bleu", [10.0, 30.0, 20.0, 30.0, 50.0, 40.0], [5, 10, 15, 20, 25, 30])
    assert saved == [True, True, False, False, True, False]  # a tie (step 20) keeps the earlier checkpoint
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 25, "metric": "bleu", "value": 50.0, "mode": "max"}
    assert (tmp_path / "best" / "step.txt").read_text() == "25"


def test_loss_is_minimised_and_names_are_normalised(tmp_path):
    best = BestCheckpoint(tmp_path, StepWriter(), metric="eval_loss")
    assert (best.metric, best.mode) == ("loss", "min")
    assert feed(best, "eval_loss", [2.0, 1.5, float("nan"), 1.7, 1.2], [1, 2, 3, 4, 5]) == [True, True, False, False, True]
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 5
    assert BestCheckpoint(tmp_path, print, metric="rougeL").key == "eval_rouge_l"
    assert BestCheckpoint(tmp_path, print, metric="acc").mode == "max"
    assert BestCheckpoint(tmp_path, print, metric="bleu", mode="min").mode == "min"  # explicit mode wins


def test_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="ckpt.best_metric='perplexity': no known direction; set ckpt.best_mode"):
        BestCheckpoint(tmp_path, print, metric="perplexity")
    assert BestCheckpoint(tmp_path, print, metric="perplexity", mode="min").mode == "min"
    with pytest.raises(ConfigError, match="ckpt.best_mode='up'"):
        BestCheckpoint(tmp_path, print, metric="bleu", mode="up")
    best = BestCheckpoint(tmp_path, print, metric="bleu")
    with pytest.raises(ConfigError, match=r"evaluation at step 10 reported no eval_bleu; it reported \['eval_acc'\]"):
        best.update(10, {"loss": 1.0, "eval_acc": 0.5})


def test_resume_keeps_a_best_written_before_the_resumed_step(tmp_path):
    best = BestCheckpoint(tmp_path, StepWriter(), metric="acc")
    feed(best, "eval_acc", [0.4, 0.6], [10, 20])
    again = BestCheckpoint(tmp_path, print, metric="acc")
    again.resume_at(20)
    assert again.record["step"] == 20 and not again.better(0.6) and again.better(0.61)
    again.resume_at(15)  # best.json is from a step the resumed run redoes
    assert again.record is None
    other = BestCheckpoint(tmp_path, print, metric="loss")
    other.resume_at(30)  # another metric's record is not this one's
    assert other.record is None


def test_fit_passes_every_evaluation_to_best(paths, tmp_path):
    model, obj, _ = tiny_lora(paths)
    accs = iter([0.2, 0.5, 0.3])  # evaluations at steps 2, 4, 6

    def eval_fn(m):
        return {"eval_acc": next(accs)}

    best = BestCheckpoint(tmp_path, lambda p: p.mkdir(parents=True, exist_ok=True), metric="acc")
    fit(model, obj.loss, records(), obj.collate, train_cfg(max_steps=6, eval_every=2), accelerator=Accelerator(cpu=True),
        state_dir=tmp_path / "state", eval_fn=eval_fn, best=best)
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 4, "metric": "acc", "value": 0.5, "mode": "max"}
    with pytest.raises(ConfigError, match="ckpt.best_metric needs periodic evaluations: set train.eval_every > 0"):
        fit(model, obj.loss, records(), obj.collate, train_cfg(max_steps=2), accelerator=Accelerator(cpu=True),
            state_dir=tmp_path / "state2", eval_fn=None, best=best)
