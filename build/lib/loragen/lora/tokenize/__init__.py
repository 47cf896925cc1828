"""LoRA checkpoints <-> token tensors, lossless both ways (to fp32 rounding).

Public API (what the generator and the tokenize stage use):

- `tokenize_checkpoints(source, modules=, scheme="dnd"|"flat", chunk=, token_shape=, max_checkpoints=)
  -> TokenSet`: the checkpoints of a lora run dir (`checkpoints/step-*`, not `final/`), of a
  directory of PEFT adapter dirs, or one adapter dir, ordered by the step in their names,
  streamed one at a time. `tokenize_adapters(adapters, ...)` does the same for in-memory adapters.
- `TokenSet(tokens [N, T, h, w], layout, mask [T, h, w], token_std [T], steps, sources,
  chunk_mean/chunk_std [N, T] for dnd)`; `save_token_set(ts, dir)` writes `tokens.safetensors`,
  `layout.json`, `checkpoints.json`; `load_token_set(dir) -> TokenSet`.
- `detokenize(tokens [T, h, w], layout) -> Adapter`; write it with
  `lora.adapter_io.write_adapter(dir, adapter)`: a PEFT dir with the original adapter_config.json.
- `Layout`: `.shape` = (num_tokens, h, w), `.num_tokens`, `.token_shape` = [h, w], `.mask()`,
  `Layout.load(dir_or_file)`, `.save(file)`.

Schemes (details in `layout` and `codec`): `dnd` is DnD's chunked, self-describing token of
(r+2) x (chunk+2) cells, chunk from the hidden size by `default_chunk`; `flat` concatenates the
tensors and cuts them into `token_shape` tokens, each tensor normalised by its statistics over
the checkpoints, kept in the layout.
"""

from loragen.lora.tokenize.checkpoints import Checkpoint, check_consistent, find_checkpoints, read_header
from loragen.lora.tokenize.layout import Layout, TensorSlot, build_layout, default_chunk
from loragen.lora.tokenize.token_set import (
    TokenSet,
    detokenize,
    load_token_set,
    save_token_set,
    tokenize_adapters,
    tokenize_checkpoints,
)

__all__ = [
    "Checkpoint", "Layout", "TensorSlot", "TokenSet", "build_layout", "check_consistent", "default_chunk",
    "detokenize", "find_checkpoints", "load_token_set", "read_header", "save_token_set", "tokenize_adapters",
    "tokenize_checkpoints",
]
