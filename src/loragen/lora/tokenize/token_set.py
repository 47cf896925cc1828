"""Tokenize a trajectory of checkpoints into one tensor; save and load token sets; detokenize."""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loragen import io, rundir
from loragen.errors import CheckpointError
from loragen.lora.adapter_io import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, Adapter, read_adapter
from loragen.lora.tokenize import codec
from loragen.lora.tokenize.checkpoints import check_consistent, find_checkpoints
from loragen.lora.tokenize.layout import LAYOUT_NAME, Layout, build_layout

log = logging.getLogger(__name__)
TOKENS_NAME = rundir.TOKENS
PAGE_FLOATS = 1024  # one float per 4 KiB page faults it in


@dataclass
class TokenSet:
    tokens: torch.Tensor  # [num_checkpoints, num_tokens, h, w] float32
    layout: Layout
    mask: torch.Tensor  # [num_tokens, h, w] bool, True on real cells
    token_std: torch.Tensor  # [num_tokens]: std across checkpoints, averaged over the token's real cells
    steps: list[int]
    sources: list[str]
    chunk_mean: torch.Tensor | None = None  # dnd: [num_checkpoints, num_tokens] decoded chunk statistics
    chunk_std: torch.Tensor | None = None


def tokenize_checkpoints(source: str | os.PathLike, *, modules: Sequence[str], scheme: str = "dnd",
                         chunk: int | None = None, token_shape: Sequence[int] | None = None,
                         max_checkpoints: int | None = None, progress=None) -> TokenSet:
    """Tokenize the checkpoints of `source` (see `find_checkpoints`), one at a time, into one tensor."""
    ckpts = find_checkpoints(source, max_checkpoints)
    header = check_consistent(ckpts)
    layout = build_layout(header.shapes, header.dtypes, header.config, modules=modules, scheme=scheme,
                          chunk=chunk, token_shape=token_shape)
    log.info("tokenizing %d checkpoints (steps %d..%d) into %d tokens of %s (%s)", len(ckpts), ckpts[0].step,
             ckpts[-1].step, layout.num_tokens, layout.token_shape, scheme)
    items = progress(ckpts, len(ckpts), "tokenize") if progress else ckpts
    # finiteness is checked on the chunk statistics (one pass less than isfinite on every tensor)
    tokens = encode_all(((ck.path, read_adapter(ck.path, check_finite=False).tensors) for ck in items), layout,
                        len(ckpts))
    return _token_set(tokens, layout, [ck.step for ck in ckpts], [str(ck.path) for ck in ckpts])


def tokenize_adapters(adapters: Sequence[Adapter], *, modules: Sequence[str], scheme: str = "dnd",
                      chunk: int | None = None, token_shape: Sequence[int] | None = None) -> TokenSet:
    """In-memory variant of tokenize_checkpoints for adapters that share one layout (tests, the generator)."""
    first = adapters[0]
    layout = build_layout({k: list(v.shape) for k, v in first.tensors.items()},
                          {k: str(v.dtype).removeprefix("torch.") for k, v in first.tensors.items()},
                          first.config, modules=modules, scheme=scheme, chunk=chunk, token_shape=token_shape)
    tokens = encode_all(((a.path, a.tensors) for a in adapters), layout, len(adapters))
    return _token_set(tokens, layout, list(range(len(adapters))), [str(a.path) for a in adapters])


def encode_all(checkpoints: Iterable[tuple[Any, dict[str, torch.Tensor]]], layout: Layout,
               n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Encode (source, tensors) pairs, one at a time, into one [n, *layout.shape] tensor."""
    with codec.single_thread():
        return _encode_all(checkpoints, layout, n)


def _encode_all(checkpoints, layout: Layout, n: int):
    tokens = torch.empty((n, *layout.shape), dtype=torch.float32)
    means = stds = None
    with _prefaulted(tokens) as ready:
        if layout.scheme == "dnd":
            means, stds = torch.empty(n, layout.num_tokens), torch.empty(n, layout.num_tokens)
            padded, blocks = codec.padded_tokens(layout), codec.token_blocks(layout)
            for i, (src, tensors) in enumerate(checkpoints):
                ready(i)
                means[i], stds[i] = codec.encode_dnd(tensors, layout, tokens[i], padded, blocks)
                if not (torch.isfinite(means[i]).all() and torch.isfinite(stds[i]).all()):
                    raise _non_finite(src, tensors)
        else:
            for i, (src, tensors) in enumerate(checkpoints):
                ready(i)
                tokens[i].zero_()  # padding cells
                codec.encode_flat_raw(tensors, layout, tokens[i])
                if not torch.isfinite(tokens[i].sum(dtype=torch.float64)):
                    raise _non_finite(src, tensors)
            codec.normalise_flat(tokens, layout)
    return tokens, means, stds


@contextmanager
def _prefaulted(tokens: torch.Tensor) -> Iterator[Callable[[int], None]]:
    """Touch the pages of `tokens` [n, ...] one checkpoint ahead of the encoder, on another thread.

    The first write to freshly allocated memory is the kernel zeroing its pages: for 50 Qwen2.5-0.5B checkpoints
    that is 1.1 GB and about 0.4 s, as long as half the encoding. Torch releases the GIL in its ops, so a second
    core (where there is one) does it meanwhile. `ready(i)` waits until checkpoint i is touched: the thread never
    writes a checkpoint the encoder has started. (Encoding checkpoints on two threads instead was no faster:
    the encoder's many small ops contend for the GIL.)"""
    n = tokens.shape[0]
    if (os.cpu_count() or 1) < 2 or n < 2:
        yield lambda i: None
        return
    done = [threading.Event() for _ in range(n)]
    stop = threading.Event()

    def touch():
        try:
            for i in range(n):
                if stop.is_set():
                    return
                tokens[i].view(-1)[::PAGE_FLOATS].zero_()
                done[i].set()
        finally:  # whatever happened here, the encoder never waits for it (it faults its pages in itself)
            for event in done:
                event.set()

    thread = threading.Thread(target=touch, name="tokenize-prefault", daemon=True)
    thread.start()
    try:
        yield lambda i: done[i].wait()
    finally:
        stop.set()
        thread.join()


def _non_finite(src, tensors: dict[str, torch.Tensor]) -> CheckpointError:
    name = next(k for k, t in tensors.items() if not torch.isfinite(t).all())
    src = Path(src) if src is not None else None
    where = next((src / f for f in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if (src / f).is_file()), src) if src else "adapter"
    return CheckpointError(f"{where}: tensor {name} has non-finite values")


def _token_set(encoded, layout: Layout, steps: list[int], sources: list[str]) -> TokenSet:
    tokens, means, stds = encoded
    mask = layout.mask()
    with codec.single_thread():
        std = token_std(tokens, mask)
    return TokenSet(tokens, layout, mask, std, steps, sources, means, stds)


def token_std(tokens: torch.Tensor, mask: torch.Tensor, block_tokens: int = codec.BLOCK_TOKENS // 4) -> torch.Tensor:
    """Per-token std across checkpoints, averaged over the token's real cells.

    Streams over checkpoints with sums shifted by the first one (no cancellation for trajectories that
    move little) instead of reducing over dim 0, which is several times slower on the strided layout. Runs
    block of tokens by block, so the running sums stay in the CPU cache while every checkpoint streams past
    (elementwise, the same operations as over whole checkpoints)."""
    n, x0 = tokens.shape[0], tokens[0]
    s1, s2 = torch.zeros_like(x0), torch.zeros_like(x0)
    d = torch.empty_like(x0[:block_tokens])
    for t0 in range(0, x0.shape[0], block_tokens):
        t1 = min(t0 + block_tokens, x0.shape[0])
        a, b, db, x0b = s1[t0:t1], s2[t0:t1], d[: t1 - t0], x0[t0:t1]
        for i in range(1, n):
            torch.sub(tokens[i, t0:t1], x0b, out=db)
            a.add_(db)
            b.addcmul_(db, db)
    s1.div_(n)
    var = s2.div_(n).sub_(s1.square_()).clamp_min_(0)
    std = var.sqrt_().mul_(mask)
    return std.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def detokenize(tokens: torch.Tensor, layout: Layout) -> Adapter:
    """Tokens [num_tokens, h, w] -> an Adapter (write it with `lora.adapter_io.write_adapter`)."""
    return Adapter(dict(layout.adapter_config), codec.decode(tokens, layout))


def save_token_set(ts: TokenSet, out_dir: str | os.PathLike) -> Path:
    """Write tokens.safetensors, layout.json and checkpoints.json into `out_dir` (each atomically)."""
    out_dir = Path(out_dir)
    tensors = {"tokens": ts.tokens, "mask": ts.mask, "token_std": ts.token_std,
               "steps": torch.tensor(ts.steps, dtype=torch.int64)}
    if ts.chunk_mean is not None:
        tensors.update(chunk_mean=ts.chunk_mean, chunk_std=ts.chunk_std)
    with io.atomic_path(out_dir / TOKENS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "scheme": ts.layout.scheme})
    ts.layout.save(out_dir / LAYOUT_NAME)
    io.write_json(out_dir / rundir.CHECKPOINT_LIST, [{"step": s, "path": p} for s, p in zip(ts.steps, ts.sources, strict=True)])
    return out_dir


def load_token_set(path: str | os.PathLike) -> TokenSet:
    """Read a directory written by `save_token_set` (the tokenize stage's run dir)."""
    path = Path(path)
    layout = Layout.load(path / LAYOUT_NAME)
    f = path / TOKENS_NAME
    try:
        with safe_open(str(f), framework="pt") as st:
            t = {k: st.get_tensor(k) for k in st.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read token file (truncated or corrupt?): {e}") from None
    if "tokens" not in t or tuple(t["tokens"].shape[1:]) != layout.shape:
        raise CheckpointError(f"{f}: tokens {list(t['tokens'].shape) if 'tokens' in t else 'missing'} do not fit "
                              f"the layout {list(layout.shape)} of {path / LAYOUT_NAME}")
    sources = [c["path"] for c in io.read_json(path / rundir.CHECKPOINT_LIST)] if (path / rundir.CHECKPOINT_LIST).is_file() else []
    return TokenSet(t["tokens"], layout, t["mask"], t["token_std"], t["steps"].tolist(), sources,
                    t.get("chunk_mean"), t.get("chunk_std"))
