"""Tokenize a trajectory of checkpoints into one tensor; save and load token sets; detokenize."""

from __future__ import annotations

import itertools
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
from loragen.lora.adapter_io import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, Adapter, StackedReader, read_adapter
from loragen.lora.tokenize import codec
from loragen.lora.tokenize.checkpoints import Checkpoint, check_consistent, find_checkpoints
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


# Checkpoints per group: read together into one buffer (StackedReader, K x the file size: 70 MB for Qwen2.5-0.5B
# r=8) and encoded with one op per step for all of them (codec.encode_dnd). Measured on 50 Qwen2.5-0.5B checkpoints
# (encoder alone, output in cache, ms per checkpoint): K=1 11.5, 2 8-9, 4 7.1-7.4, 8 7.4-8, 16 7.6; in the whole
# tokenize_checkpoints (fresh output, page-touching thread on the other core) K=4 was the fastest of 1, 2, 4, 8, 16.
GROUP_CHECKPOINTS = 4
# Tokens per encoder block of a group of K checkpoints: GROUP_BLOCK_TOKENS // K, so a block's working set (its
# tokens and the encoder's scratch, about 1.2 MB at K=4) stays in the 2 MB L2 cache as one checkpoint's BLOCK_TOKENS
# did; at K=4, 64 tokens per block beat 32 and 128.
GROUP_BLOCK_TOKENS = codec.BLOCK_TOKENS

# token_std: tokens per block. It runs on two threads after the encoder (when the page-touching thread is done): there
# blocks of 128 tokens took 0.12-0.14 s for 50 Qwen2.5-0.5B checkpoints, of 64 0.15-0.18 s (more ops contend for the
# GIL); one thread 0.17-0.19 s
STD_BLOCK_TOKENS = codec.BLOCK_TOKENS // 2

Group = tuple[list[Any], dict[str, torch.Tensor]]  # (sources of K checkpoints, name -> their tensors (K, *shape))


def tokenize_checkpoints(source: str | os.PathLike, *, modules: Sequence[str], scheme: str = "dnd",
                         chunk: int | None = None, token_shape: Sequence[int] | None = None,
                         max_checkpoints: int | None = None, progress=None) -> TokenSet:
    """Tokenize the checkpoints of `source` (see `find_checkpoints`), GROUP_CHECKPOINTS at a time, into one
    tensor."""
    ckpts = find_checkpoints(source, max_checkpoints)
    header = check_consistent(ckpts)
    layout = build_layout(header.shapes, header.dtypes, header.config, modules=modules, scheme=scheme,
                          chunk=chunk, token_shape=token_shape)
    log.info("tokenizing %d checkpoints (steps %d..%d) into %d tokens of %s (%s)", len(ckpts), ckpts[0].step,
             ckpts[-1].step, layout.num_tokens, layout.token_shape, scheme)
    items = progress(ckpts, len(ckpts), "tokenize") if progress else ckpts
    # finiteness is checked on the chunk statistics (one pass less than isfinite on every tensor)
    tokens = encode_groups(read_groups(items, GROUP_CHECKPOINTS), layout, len(ckpts))
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


def read_groups(ckpts: Iterable[Checkpoint], k: int) -> Iterator[Group]:
    """The checkpoints in order, k at a time as one group read by StackedReader when their safetensors files can
    be stacked (the common case: one trajectory's files share their header), else one checkpoint per group read
    by read_adapter. A group's tensors are valid until the next group is read (they share one buffer)."""
    reader, it = StackedReader(), iter(ckpts)
    while group := [ck.path for ck in itertools.islice(it, k)]:
        stacked = reader.read([p / WEIGHTS_NAME for p in group])
        if stacked is not None:
            yield group, stacked
        else:
            for p in group:
                yield [p], _stack_one(read_adapter(p, check_finite=False).tensors)


def encode_all(checkpoints: Iterable[tuple[Any, dict[str, torch.Tensor]]], layout: Layout,
               n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Encode (source, tensors) pairs, one at a time, into one [n, *layout.shape] tensor."""
    return encode_groups((([src], _stack_one(tensors)) for src, tensors in checkpoints), layout, n)


def encode_groups(groups: Iterable[Group], layout: Layout,
                  n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Encode groups of checkpoints (`read_groups`) into (tokens [n, *layout.shape], chunk mean, chunk std [n, T]
    (dnd) or None (flat)); CheckpointError naming the checkpoint and tensor with non-finite values."""
    with codec.single_thread():
        return _encode_groups(groups, layout, n)


def _encode_groups(groups: Iterable[Group], layout: Layout,
                   n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    tokens = torch.empty((n, *layout.shape), dtype=torch.float32)
    dnd = layout.scheme == "dnd"
    means, stds = (torch.empty(n, layout.num_tokens), torch.empty(n, layout.num_tokens)) if dnd else (None, None)
    padded, blocks = codec.padded_tokens(layout), {}
    with _prefaulted(tokens) as ready:
        i = 0
        for sources, tensors in groups:
            k = len(sources)
            ready(i + k - 1)
            if dnd:
                if k not in blocks:
                    blocks[k] = codec.token_blocks(layout, max(1, GROUP_BLOCK_TOKENS // k))
                _encode_dnd_group(sources, tensors, layout, tokens[i : i + k], means[i : i + k], stds[i : i + k],
                                  padded, blocks[k])
            else:
                _encode_flat_group(sources, tensors, layout, tokens[i : i + k])
            i += k
    if not dnd:
        codec.normalise_flat(tokens, layout)
    return tokens, means, stds


def _encode_dnd_group(sources: list[Any], tensors: dict[str, torch.Tensor], layout: Layout, dst: torch.Tensor,
                      means: torch.Tensor, stds: torch.Tensor, padded: list, blocks: list) -> None:
    """Encode one group into dst [K, T, ...] and its chunk statistics into means, stds [K, T]."""
    means[:], stds[:] = codec.encode_dnd(tensors, layout, dst, padded, blocks)
    finite = torch.isfinite(means).all(1) & torch.isfinite(stds).all(1)
    if not finite.all():
        j = int((~finite).nonzero()[0, 0])
        raise _non_finite(sources[j], {name: t[j] for name, t in tensors.items()})


def _encode_flat_group(sources: list[Any], tensors: dict[str, torch.Tensor], layout: Layout,
                       dst: torch.Tensor) -> None:
    """Copy one group's raw values into dst [K, T, ...], checkpoint by checkpoint (flat is one copy per tensor)."""
    for j, src in enumerate(sources):
        one = {name: t[j] for name, t in tensors.items()}
        dst[j].zero_()  # padding cells
        codec.encode_flat_raw(one, layout, dst[j])
        if not torch.isfinite(dst[j].sum(dtype=torch.float64)):
            raise _non_finite(src, one)


def _stack_one(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One checkpoint's tensors as a group of one: (1, *shape) views."""
    return {name: t.unsqueeze(0) for name, t in tensors.items()}


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
        std = token_std(tokens, mask, STD_BLOCK_TOKENS, threads=min(2, os.cpu_count() or 1))
    return TokenSet(tokens, layout, mask, std, steps, sources, means, stds)


def token_std(tokens: torch.Tensor, mask: torch.Tensor, block_tokens: int = codec.BLOCK_TOKENS // 4,
              threads: int = 1) -> torch.Tensor:
    """Per-token std across checkpoints, averaged over the token's real cells.

    Streams over checkpoints with sums shifted by the first one (no cancellation for trajectories that
    move little) instead of reducing over dim 0, which is several times slower on the strided layout. Runs
    block of tokens by block, so the running sums stay in the CPU cache while every checkpoint streams past
    (elementwise, the same operations as over whole checkpoints). `threads` > 1 splits the tokens between that many
    Python threads (torch releases the GIL in its ops); every cell sees the same operations either way."""
    n, x0 = tokens.shape[0], tokens[0]
    s1, s2 = torch.zeros_like(x0), torch.zeros_like(x0)
    num, errors = x0.shape[0], []
    per = -(-num // max(1, threads) // block_tokens) * block_tokens  # whole blocks per thread
    parts = [(t, min(t + per, num)) for t in range(0, num, per)] or [(0, 0)]

    def sums(begin: int, end: int) -> None:
        try:
            _shifted_sums(tokens, s1, s2, begin, end, block_tokens)
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
            errors.append(e)

    workers = [threading.Thread(target=sums, args=part, name="token-std", daemon=True) for part in parts[1:]]
    for w in workers:
        w.start()
    sums(*parts[0])
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    s1.div_(n)
    var = s2.div_(n).sub_(s1.square_()).clamp_min_(0)
    std = var.sqrt_().mul_(mask)
    return std.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def _shifted_sums(tokens: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, begin: int, end: int,
                  block_tokens: int) -> None:
    """Add sum_i (x_i - x_0) to s1 and sum_i (x_i - x_0)^2 to s2 on tokens [begin, end), checkpoint by checkpoint."""
    x0 = tokens[0]
    d = torch.empty_like(x0[: min(block_tokens, end - begin)])
    for t0 in range(begin, end, block_tokens):
        t1 = min(t0 + block_tokens, end)
        a, b, db, x0b = s1[t0:t1], s2[t0:t1], d[: t1 - t0], x0[t0:t1]
        for i in range(1, tokens.shape[0]):
            torch.sub(tokens[i, t0:t1], x0b, out=db)
            a.add_(db)
            b.addcmul_(db, db)


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
