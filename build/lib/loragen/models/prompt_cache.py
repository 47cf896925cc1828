"""On-disk cache of the frozen encoder's prompt states, so training never re-encodes a prompt.

One fp16 safetensors file per prompt pool under `<cache_dir>/prompt_states/<encoder key>/L<prompt_len>/`,
named by a hash of the pool's prompt texts: the key is (encoder, prompt texts, L).
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loragen import io
from loragen.models.text_encoder import TextEncoder

log = logging.getLogger(__name__)


def prompt_pool(prompts: list[str], size: int, seed: int) -> list[str]:
    """A fixed pool of at most `size` distinct prompts, drawn with `seed` (all of them when fewer)."""
    distinct = list(dict.fromkeys(p for p in prompts if p.strip()))
    if len(distinct) <= size:
        return distinct
    return random.Random(seed).sample(distinct, size)


class PromptStateCache:
    def __init__(self, cache_dir: str | Path, encoder: TextEncoder):
        self.encoder = encoder
        self.dir = Path(cache_dir) / "prompt_states" / encoder.key / f"L{encoder.prompt_len}"
        self.hits = 0
        self.misses = 0

    def path_for(self, prompts: list[str]) -> Path:
        h = hashlib.sha256()
        for p in prompts:
            h.update(p.encode("utf-8") + b"\0")
        return self.dir / f"{h.hexdigest()[:32]}.safetensors"

    def states(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), L, C] fp16 states of `prompts`: from disk when cached, else encoded and stored."""
        path = self.path_for(prompts)
        expected = (len(prompts), self.encoder.prompt_len, self.encoder.hidden_size)
        if path.is_file():
            try:
                states = load_file(str(path))["states"]
            except (SafetensorError, KeyError, OSError) as e:
                log.warning("prompt cache %s is unreadable (%s); re-encoding", path, e)
            else:
                if tuple(states.shape) == expected:
                    self.hits += 1
                    return states
                log.warning("prompt cache %s has shape %s, expected %s; re-encoding", path, list(states.shape), list(expected))
        self.misses += 1
        states = self.encoder.encode(prompts).half().contiguous()
        with io.atomic_path(path) as tmp:
            save_file({"states": states}, str(tmp), metadata={"encoder": self.encoder.key, "count": str(len(prompts))})
        return states
