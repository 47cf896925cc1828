"""End to end on CPU with tiny settings: lora on 3 datasets -> tokenize -> generator (one held out)
-> generate -> evaluate on the held-out dataset (base, the training datasets' LoRAs, a generated one)."""

import json
from pathlib import Path

from tests.test_generator_generate import run_stage

TRAIN, HELDOUT = ["arc_easy", "arc_challenge"], "openbookqa"
GEN = ["generator.num_prompts=4", "generator.prompt_len=16", "generator.prompt_pool=16",
       "generator.features=[[4,16,384],[8,8,64],[144,10,66]]"]  # MiniLM r=8 query/value: 144 tokens of 10x66


def test_lora_tokenize_generator_generate_evaluate(tmp_path):
    common = ["model=minilm", "tracker=none", f"paths.cache_dir={tmp_path / 'cache'}"]
    tokens = {}
    for name in [*TRAIN, HELDOUT]:
        lora, tok = tmp_path / "lora" / name, tmp_path / "tokens" / name
        run_stage(["stage=lora", f"dataset={name}", f"hydra.run.dir={lora}", "train.max_steps=4", "ckpt.every=2",
                   "train.per_device_batch=4", "lora.train_limit=16", "lora.eval_limit=8", "lora.final_eval_limit=8",
                   "lora.eval_base=false", *common])
        run_stage(["stage=tokenize", f"tokenize.checkpoints={lora}", f"hydra.run.dir={tok}", *common])
        tokens[name] = tok
    gen = tmp_path / "generator"
    run_stage(["stage=generator", "dataset=commonsense6", f"generator.datasets=[{','.join([*TRAIN, HELDOUT])}]",
               f"generator.heldout={HELDOUT}", *[f"+generator.tokens.{n}={p}" for n, p in tokens.items()],
               "train.max_steps=4", "train.eval_every=2", "train.per_device_batch=2", "generator.eval_adapters=1",
               f"hydra.run.dir={gen}", *GEN, *common])
    out = tmp_path / "generate"
    run_stage(["stage=generate", f"generate.checkpoint={gen}", "generate.num_adapters=1", f"hydra.run.dir={out}",
               *GEN, *common])
    adapters = [str(tmp_path / "lora" / n / "final") for n in TRAIN] + [str(out / "adapters" / "gen-000")]
    ev = tmp_path / "evaluate"
    run_stage(["stage=evaluate", f"dataset={HELDOUT}", f"eval.adapters=[{','.join(adapters)}]", "eval.limit=16",
               f"hydra.run.dir={ev}", *common])
    results = json.loads((ev / "results.json").read_text())["results"]
    assert len(results) == 4 and results[0]["label"] == "base"
    assert {r["adapter_path"] for r in results[1:]} == set(adapters)
    assert all(r["dataset"] == HELDOUT and r["n"] == 16 and 0 <= r["acc"] <= 1 for r in results)
    md = (ev / "results.md").read_text()
    assert "base" in md and "gen-000" in md
    assert Path(json.loads((gen / "metrics.json").read_text())["heldout_eval"]["adapters"]["average"]["path"]).is_dir()
