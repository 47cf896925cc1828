"""stage=tokenize: LoRA checkpoints -> tokens.safetensors + layout.json (or, with analyze=true, statistics)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from loragen import io, runtime
from loragen.errors import ConfigError
from loragen.lora.tokenize import check_consistent, find_checkpoints, save_token_set, tokenize_checkpoints
from loragen.lora.tokenize.analyze import analyze_checkpoints, summary_markdown

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    tk = cfg.tokenize
    if not tk.checkpoints:
        raise ConfigError("tokenize.checkpoints is not set; pass a lora run dir or a directory of PEFT adapter dirs")
    out = runtime.run_dir()
    if tk.analyze:
        return analyze(str(tk.checkpoints), tk.max_checkpoints, out)
    ts = tokenize_checkpoints(
        str(tk.checkpoints), modules=list(cfg.model.linear_modules), scheme=tk.scheme, chunk=tk.chunk,
        token_shape=OmegaConf.to_object(tk.token_shape) if tk.token_shape is not None else None,
        max_checkpoints=tk.max_checkpoints, progress=runtime.progress,
    )
    summary = {"scheme": ts.layout.scheme, "num_checkpoints": len(ts.steps), "num_tokens": ts.layout.num_tokens,
               "token_shape": ts.layout.token_shape, "steps": ts.steps, "out_dir": str(out)}
    if runtime.is_main():
        save_token_set(ts, out)
        log.info("%d checkpoints -> tokens %s in %s", len(ts.steps), list(ts.tokens.shape), out)
    return summary


def analyze(source: str, max_checkpoints: int | None, out) -> dict:
    ckpts = find_checkpoints(source, max_checkpoints)
    check_consistent(ckpts)
    rows = analyze_checkpoints(ckpts, progress=runtime.progress)
    text = summary_markdown(rows)
    if runtime.is_main():
        io.write_json(out / "analysis.json", rows)
        io.write_text(out / "analysis.md", text)
        print(text)
    return {"num_checkpoints": len(ckpts), "rows": rows}
