"""stage=chat: a model (optionally with a LoRA adapter) answers prompts.

    loragen stage=chat model=<m> chat.adapter=<dir>                        # interactive, on a terminal
    loragen stage=chat model=<m> chat.prompts=prompts.txt chat.out=a.jsonl # batch

Interactive: a `> ` prompt; each line is answered on its own (no conversation history); an empty line
is ignored; `/exit`, EOF (Ctrl-D) or Ctrl-C quits. Batch: every prompt of chat.prompts (.txt, one a
line; .jsonl with a "prompt" field) is answered into chat.out (JSONL: prompt, output, tokens,
terminated, seconds). Prompts are rendered by render_prompt and answered by generate_texts, exactly as
eval.method=generate does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from loragen import io, rundir, runtime
from loragen.data.prompt_files import read_prompt_file
from loragen.errors import ConfigError
from loragen.evaluation.adapters import AdapterSwitcher, check_adapter
from loragen.evaluation.generation import Generation, GenerationSettings, generate_texts
from loragen.models import load_model
from loragen.models.chat import render_prompt
from loragen.train_env import make_accelerator

log = logging.getLogger(__name__)
EXIT = "/exit"

Answer = Callable[[list[str], bool], list[Generation]]


def run(cfg: DictConfig) -> dict:
    c = cfg.chat
    settings = GenerationSettings.from_cfg(c.generation, seed=cfg.seed)
    prompts = read_prompt_file(c.prompts) if c.prompts else None  # bad files fail before the model loads
    accelerator = make_accelerator(cfg)
    lm = load_model(cfg.model, cfg.paths, cfg.hardware.precision, accelerator.device, cfg.hardware.cpu_linear)
    if lm.kind not in ("causal", "seq2seq"):
        raise ConfigError(f"stage=chat needs a causal or seq2seq LM; model {lm.name} is an {lm.kind}")
    model = lm.model
    if c.adapter:
        check_adapter(lm.model, c.adapter)
        model = AdapterSwitcher(lm.model).use(str(c.adapter))

    def answer(texts: list[str], progress: bool) -> list[Generation]:
        rendered = [render_prompt(lm.tokenizer, t, kind=lm.kind, chat_template=settings.chat_template,
                                  system=settings.system) for t in texts]
        return generate_texts(model, lm.tokenizer, rendered, kind=lm.kind, batch_size=int(c.batch_size),
                              max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                              temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                              desc="chat", progress=progress)

    if prompts is None:
        return {"mode": "interactive", "prompts": interactive(answer, settings.max_new_tokens)}
    out = Path(c.out) if c.out else runtime.run_dir() / rundir.CHAT_OUT
    return {"mode": "batch", "prompts": len(prompts), "out": str(batch(answer, prompts, out))}


def batch(answer: Answer, prompts: list[str], out: Path) -> Path:
    gens = answer(prompts, True)
    rows = [{"prompt": p, "output": g.text, "tokens": g.tokens, "terminated": g.terminated,
             "seconds": round(g.seconds, 4)} for p, g in zip(prompts, gens)]
    if runtime.is_main():
        io.write_jsonl(out, rows)
        log.info("%d answers in %s", len(rows), out)
    return out


def interactive(answer: Answer, max_new_tokens: int) -> int:
    """Read prompts until /exit or EOF; print each answer. Returns how many prompts were answered."""
    print(f"loragen chat: type a prompt and Enter; {EXIT} or Ctrl-D quits.", flush=True)
    n = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return n
        text = line.strip()
        if not text:
            continue
        if text == EXIT:
            return n
        g = answer([text], False)[0]
        print(g.text.strip(), flush=True)
        if not g.terminated:
            print(f"[cut at {max_new_tokens} new tokens: chat.generation.max_new_tokens]", flush=True)
        n += 1
