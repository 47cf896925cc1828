"""The generator's frozen prompt encoder: prompts -> per-token states [N, L, C].

The default is the packaged all-MiniLM-L6-v2 (model config `minilm`); any sentence-transformers
directory works through a model config with `source: pretrained` and `hub_id: <dir>`. The
states are the encoder's last hidden states, each prompt padded or truncated to L tokens on its
own, with padding positions zeroed, so a prompt's states do not depend on its batch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import DictConfig

from loragen.errors import ConfigError
from loragen.models.registry import LoadedModel, load_model


class TextEncoder:
    def __init__(self, loaded: LoadedModel, prompt_len: int, batch_size: int = 64):
        if loaded.kind != "encoder":
            raise ConfigError(f"generator.encoder {loaded.name!r} has kind {loaded.kind!r}; expected an encoder")
        if prompt_len < 1:
            raise ConfigError(f"generator.prompt_len = {prompt_len}; expected a positive int")
        self.loaded = loaded
        self.prompt_len = int(prompt_len)
        self.batch_size = batch_size
        self.model = loaded.model.eval().requires_grad_(False)
        self.tokenizer = loaded.tokenizer
        self.hidden_size = int(self.model.config.hidden_size)
        self.key = encoder_key(loaded)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), prompt_len, hidden] float32 states (zeros at padding positions)."""
        if not prompts:
            raise ConfigError("no prompts to encode")
        out = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=self.prompt_len,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            out.append(hidden * enc["attention_mask"].unsqueeze(-1).to(hidden))
        return torch.cat(out).cpu()


def load_text_encoder(encoder_cfg: DictConfig, paths: DictConfig, prompt_len: int, device: str = "cpu") -> TextEncoder:
    """The frozen encoder of `generator.encoder` (a model config), always in fp32."""
    return TextEncoder(load_model(encoder_cfg, paths, precision="fp32", device=device), prompt_len)


def encoder_key(loaded: LoadedModel) -> str:
    """Identifies the encoder's weights: its name, path and the size and mtime of its weight files."""
    h = hashlib.sha256(f"{loaded.name}|{loaded.path}".encode())
    path = Path(loaded.path)
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            st = f.stat()
            h.update(f"|{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{loaded.name}-{h.hexdigest()[:16]}"
