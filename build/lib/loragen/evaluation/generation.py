"""Free generation: one batched loop (`generate_texts`) for every stage that lets a model write.

Also eval.method=generate on multiple-choice data: a lettered-options prompt, the answer letter
parsed, as the LoRA-transfer papers score instruction-tuned models. An answer with no valid
letter is counted as unparseable and scored wrong (prediction -1).
"""

from __future__ import annotations

import os
import re
import string
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from loragen.data.records import MCRecord
from loragen.errors import ConfigError
from loragen.runtime import ProgressBar

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings (config: eval.generation / chat.generation).

    Other decoding options (top_k, repetition penalty, ...) come from the model's own
    generation_config.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    chat_template: bool | str = "auto"  # how prompts are rendered: loragen.models.chat.render_prompt
    system: str | None = None

    @classmethod
    def from_cfg(cls, node: Any, seed: int = 0) -> "GenerationSettings":
        """From a config node holding max_new_tokens, do_sample, temperature, top_p, chat_template, system."""
        s = cls(max_new_tokens=int(node.max_new_tokens), do_sample=bool(node.do_sample),
                temperature=float(node.temperature), top_p=float(node.top_p), seed=int(seed),
                chat_template=node.chat_template, system=node.system)
        s.check()
        return s

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation max_new_tokens={self.max_new_tokens}; expected >= 1")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"generation temperature={self.temperature}; sampling needs > 0 (or do_sample=false)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation top_p={self.top_p}; expected 0 < top_p <= 1")
        if self.chat_template not in ("auto", True, False):
            raise ConfigError(f"generation chat_template={self.chat_template!r}; expected auto, true or false")


@dataclass(frozen=True)
class Generation:
    """One prompt's output. `tokens` counts new tokens before the end-of-sequence token;
    `terminated` is true when the model emitted it within max_new_tokens; `seconds` is the
    wall time of the prompt's batch divided by the batch size."""

    text: str
    tokens: int
    terminated: bool
    seconds: float


def is_seq2seq(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for v in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if v is not None:
            ids.update(v if isinstance(v, (list, tuple)) else [v])
    return ids


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], *, kind: str, batch_size: int, max_new_tokens: int,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                   desc: str = "", progress: bool = True) -> list[Generation]:
    """Generate a continuation for each (already rendered) prompt, in batches.

    Causal models get left padding (the tokenizer's padding side is restored afterwards) and
    only the tokens after the prompt are decoded; seq2seq models (config.is_encoder_decoder)
    decode only the decoder's output. Sampling runs under a forked RNG seeded with `seed`, so
    the same prompts, batch size and seed give the same texts, and the caller's RNG is untouched.
    """
    if kind not in ("causal", "seq2seq"):
        raise ConfigError(f"generation needs a causal or seq2seq model; this one is {kind!r}")
    if kind == "seq2seq" and not is_seq2seq(model):
        raise ConfigError("kind=seq2seq but the model's config is not encoder-decoder")
    if batch_size < 1:
        raise ConfigError(f"generation batch_size={batch_size}; expected >= 1")
    device = next(model.parameters()).device
    stops = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), 0)
    decoding: dict[str, Any] = {"do_sample": bool(do_sample), "max_new_tokens": int(max_new_tokens), "pad_token_id": pad}
    if do_sample:
        decoding.update(temperature=float(temperature), top_p=float(top_p))
    else:  # greedy: clear sampling knobs a model's generation_config may set (e.g. instruct models)
        decoding.update(temperature=None, top_p=None, top_k=None)
    side = tokenizer.padding_side
    if kind == "causal":
        tokenizer.padding_side = "left"
    bar = ProgressBar(len(prompts), desc or "generating", unit="prompt") if progress else None
    out: list[Generation] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(seed))
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                t0 = time.perf_counter()
                enc = tokenizer(chunk, return_tensors="pt", padding=True)
                enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
                seqs = model.generate(**enc, **decoding)
                # causal: the prompt (same padded length for all rows) comes first; seq2seq: the decoder start token
                new = seqs[:, enc["input_ids"].shape[1]:] if kind == "causal" else seqs[:, 1:]
                each = (time.perf_counter() - t0) / len(chunk)
                for row in new.tolist():
                    end = next((j for j, t in enumerate(row) if t in stops), None)
                    kept = row if end is None else row[:end]
                    text = tokenizer.decode(kept, skip_special_tokens=True)
                    out.append(Generation(text, len(kept), end is not None, each))
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        if bar is not None:
            bar.close()
    return out


def lettered_prompt(rec: MCRecord) -> str:
    if len(rec.contexts) > 1:  # winogrande: options are what differs between the contexts
        stem = os.path.commonprefix(list(rec.contexts))
        question = rec.prompt
        options = [c[len(stem):] for c in rec.contexts]
    else:
        question = re.sub(r"\s*Answer:\s*$", "", rec.contexts[0])
        options = list(rec.choices)
    lines = [question] + [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def parse_letter(text: str, n: int) -> int:
    m = re.search(rf"\b([{LETTERS[:n]}])\b", text)
    return LETTERS.index(m.group(1)) if m else -1


def lettered_predictions(model, tokenizer, records: Sequence[MCRecord], *, batch_size: int, desc: str = "",
                         max_new_tokens: int = 5, do_sample: bool = False, temperature: float = 1.0,
                         top_p: float = 1.0, seed: int = 0) -> list[int]:
    """The letter each record's generated answer names (-1: none). The lettered prompt is sent as is
    (eval.apply_chat_template wraps the records' contexts beforehand)."""
    kind = "seq2seq" if is_seq2seq(model) else "causal"
    gens = generate_texts(model, tokenizer, [lettered_prompt(r) for r in records], kind=kind,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_p=top_p, seed=seed, desc=desc)
    return [parse_letter(g.text, r.num_choices) for g, r in zip(gens, records)]
