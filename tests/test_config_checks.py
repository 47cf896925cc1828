"""Bad values end in a ConfigError naming the key, before any model, tokenizer or dataset is loaded."""

import pytest

from loragen.errors import ConfigError
from tests.conftest import run_stage_in_process


@pytest.fixture(autouse=True)
def nothing_loads(monkeypatch):
    """Loading a model or a dataset fails the test: the checks must come first."""
    import loragen.data.registry as registry
    import loragen.models.registry as models

    def refuse(*a, **k):
        raise AssertionError("a model or dataset was loaded before the config was checked")

    for mod, name in ((models, "load_model"), (registry, "load_split")):
        monkeypatch.setattr(mod, name, refuse)
    for path in ("loragen.stages.lora", "loragen.stages.evaluate", "loragen.stages.generator", "loragen.data"):
        mod = __import__(path, fromlist=["x"])
        for name in ("load_model", "load_split"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse)


BAD = {
    "lora": [("train.max_steps=0", "train.max_steps"), ("train.lr=-1", "train.lr"), ("train.schedule=cosin", "train.schedule"),
             ("train.resume=sometimes", "train.resume"), ("lora.r=0", "lora.r"), ("lora.dropout=1.5", "lora.dropout"),
             ("lora.temperature=0", "lora.temperature"), ("ckpt.every=-1", "ckpt.every"),
             ("ckpt.keep_last=0", "ckpt.keep_last"), ("ckpt.best_mode=up", "ckpt.best_mode"),
             ("ckpt.best_metric=acc", "ckpt.best_metric=acc needs periodic evaluations"),
             ("ckpt.best_metric=perplexity", "ckpt.best_metric"), ("lora.eval_limit=0", "lora.eval_limit")],
    "evaluate": [("eval.method=guess", "eval.method"), ("eval.limit=0", "eval.limit"),
                 ("eval.sample_ratio=1.5", "eval.sample_ratio"), ("eval.num_fewshot=-1", "eval.num_fewshot"),
                 ("eval.adapters=/some/dir", "eval.adapters")],
    "tokenize": [("tokenize.scheme=zip", "tokenize.scheme"), ("tokenize.max_checkpoints=0", "tokenize.max_checkpoints"),
                 ("tokenize.checkpoints=null", "tokenize.checkpoints is not set")],
    "generator": [("generator.objective=sft", "generator.objective"), ("generator.condition=labels", "generator.condition"),
                  ("generator.kernel_size=4", "generator.kernel_size"), ("generator.num_prompts=0", "generator.num_prompts"),
                  ("train.warmup_steps=-2", "train.warmup_steps"), ("generator.task.batch_size=0", "generator.task.batch_size")],
    "generate": [("generate.checkpoint=null", "generate.checkpoint"), ("generate.num_adapters=0", "generate.num_adapters")],
    "transfer": [("transfer.similarity_threshold=2", "transfer.similarity_threshold"),
                 ("transfer.layer_map=random", "transfer.layer_map"), ("transfer.rank_svd=0", "transfer.rank_svd")],
}
GOOD = {"tokenize": ["tokenize.checkpoints=/x"], "generate": ["generate.checkpoint=/x"],
        "transfer": ["transfer.source_model=tiny_gemma2", "transfer.source_adapter=/x"]}


@pytest.mark.parametrize("stage,bad,key", [(s, b, k) for s, items in BAD.items() for b, k in items])
def test_bad_value_is_a_config_error_naming_the_key(stage, bad, key, tmp_path):
    overrides = [f"stage={stage}", "model=tiny_qwen2", "tracker=none", *GOOD.get(stage, []), bad]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("=", "=")):
        run_stage_in_process(overrides, run_dir=tmp_path / "run")


def test_wrong_types_and_unknown_keys_are_refused_at_compose_time():
    from hydra.errors import ConfigCompositionException

    from tests.conftest import compose

    with pytest.raises(ConfigCompositionException, match="train.max_steps"):
        compose(["stage=lora", "train.max_steps=abc"])
    with pytest.raises(ConfigCompositionException, match="Could not override 'lora.rank'"):
        compose(["stage=lora", "lora.rank=4"])
    with pytest.raises(ConfigCompositionException, match="pipeline.dnd.multitask"):
        compose(["experiment=dnd_minilm", "pipeline.dnd.multitask=maybe"])


def test_a_pipeline_checks_every_step_before_running_any(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli(["experiment=dnd_minilm", "+debug=tiny", "tracker=none", f"hydra.run.dir={tmp_path / 'p'}",
                    'pipeline.dnd.generator_train_overrides=["train.max_steps=0"]'], check=False)
    assert proc.returncode == 2
    assert "pipeline step generator/piqa: train.max_steps=0; expected >= 1" in proc.stderr
    assert not (tmp_path / "p" / "lora").exists()  # the LoRA steps, which come first, did not run

