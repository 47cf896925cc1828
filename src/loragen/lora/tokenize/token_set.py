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
# tokens and the encoder's scratch, about 2.7 MB at K=4) stays in the CPU's last-level cache. Measured in the whole
# tokenize_checkpoints at K=4 (50 Qwen2.5-0.5B checkpoints, medians of 8 alternated runs): 128 tokens per block
# 0.535-0.547 s, 64 0.550-0.566 s, 256 0.561 s, 32 0.589 s (fewer blocks pay fewer ops; larger ones fall out of cache).
GROUP_BLOCK_TOKENS = 2 * codec.BLOCK_TOKENS

# token_std (StdSums): tokens per block, on the helper thread while the encoder works and on two threads after it.
# Measured when it all ran on two threads after the encoder: blocks of 128 tokens took 0.12-0.14 s for 50
# Qwen2.5-0.5B checkpoints, of 64 0.15-0.18 s (more ops contend for the GIL); one thread 0.17-0.19 s
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


Encoded = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]


def encode_all(checkpoints: Iterable[tuple[Any, dict[str, torch.Tensor]]], layout: Layout, n: int) -> Encoded:
    """Encode (source, tensors) pairs, one at a time, into one [n, *layout.shape] tensor."""
    return encode_groups((([src], _stack_one(tensors)) for src, tensors in checkpoints), layout, n)


def encode_groups(groups: Iterable[Group], layout: Layout, n: int) -> Encoded:
    """Encode groups of checkpoints (`read_groups`) into (tokens [n, *layout.shape], chunk mean, chunk std [n, T]
    (dnd) or None (flat), token_std [T]); CheckpointError naming the checkpoint and tensor with non-finite values."""
    with codec.single_thread():
        return _encode_groups(groups, layout, n)


def _encode_groups(groups: Iterable[Group], layout: Layout, n: int) -> Encoded:
    tokens = torch.empty((n, *layout.shape), dtype=torch.float32)
    dnd = layout.scheme == "dnd"
    means, stds = (torch.empty(n, layout.num_tokens), torch.empty(n, layout.num_tokens)) if dnd else (None, None)
    padded, blocks = codec.padded_tokens(layout), {}
    threads = min(2, os.cpu_count() or 1)
    # dnd tokens are final once their group is encoded, so the helper thread sums their token_std meanwhile; flat
    # tokens are normalised over all checkpoints at the end, so their token_std waits for that
    sums = StdSums(tokens, layout.mask(), STD_BLOCK_TOKENS)
    with _helper(tokens, sums if dnd else None) as (ready, encoded):
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
            encoded(i)
    if not dnd:
        codec.normalise_flat(tokens, layout)
    return tokens, means, stds, sums.finish(threads)


def _encode_dnd_group(sources: list[Any], tensors: dict[str, torch.Tensor], layout: Layout, dst: torch.Tensor,
                      means: torch.Tensor, stds: torch.Tensor, padded: list, blocks: list) -> None:
    """Encode one group into dst [K, T, ...] and its chunk statistics into means, stds [K, T]."""
    means[:], stds[:] = codec.encode_dnd(tensors, layout, dst, padded, blocks)
    finite = torch.isfinite(means).all(1) & torch.isfinite(stds).all(1)
    if not finite.all():
        j = int((~finite).nonzero()[0, 0])
        one = {name: t[j] for name, t in tensors.items()}
        if all(torch.isfinite(t).all() for t in one.values()):  # finite values whose chunk statistics overflow
            t = int((~(torch.isfinite(means[j]) & torch.isfinite(stds[j]))).nonzero()[0, 0])
            name = next(s.name for s in layout.tensors if s.first_token <= t < s.first_token + s.num_tokens)
            raise CheckpointError(f"{_weights_file(sources[j])}: tensor {name} has values too large to tokenize "
                                  f"(up to {float(one[name].abs().max()):.3g}: a chunk's mean or std overflows "
                                  "float32 in the dnd codes)")
        raise _non_finite(sources[j], one)


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
def _helper(tokens: torch.Tensor,
            sums: StdSums | None) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A second thread beside the encoder. It touches the pages of `tokens` [n, ...] ahead of the encoder, then adds
    the encoded checkpoints to `sums` (token_std), a group at a time, until the encoder is done.

    The first write to freshly allocated memory is the kernel zeroing its pages: for 50 Qwen2.5-0.5B checkpoints
    that is 1.1 GB and about 0.22 s, as long as half the encoding. Summing token_std is another 0.2 s of one core.
    Torch releases the GIL in its ops, so a second core (where there is one) does both meanwhile; what is left when the
    encoder ends, `StdSums.finish` adds on both cores. Yields (ready, encoded): `ready(i)` waits until checkpoint i
    is touched (the thread never writes a checkpoint the encoder has started); `encoded(i)` says that checkpoints
    [0, i) are final. (Encoding checkpoints on two threads instead was no faster: the encoder's many small ops
    contend for the GIL.) If the thread fails, the encoder faults its pages in itself, and `finish` sums what the
    thread did not: every cell sees the same operations in the same order either way."""
    n = tokens.shape[0]
    if (os.cpu_count() or 1) < 2 or n < 2:
        yield (lambda i: None), (lambda i: None)
        return
    touched = [threading.Event() for _ in range(n)]
    progress = threading.Condition()
    state = {"encoded": 0, "stop": False}

    def work():
        try:
            for i in range(n):
                if state["stop"]:
                    return
                tokens[i].view(-1)[::PAGE_FLOATS].zero_()
                touched[i].set()
        finally:  # whatever happened here, the encoder never waits for it (it faults its pages in itself)
            for event in touched:
                event.set()
        try:
            while sums is not None:
                with progress:
                    progress.wait_for(lambda: state["stop"] or state["encoded"] > sums.done)
                    if state["stop"]:
                        return
                    until = min(state["encoded"], sums.done + GROUP_CHECKPOINTS)  # short steps: stop is seen soon
                sums.add_until(until)
        except Exception as e:  # noqa: BLE001 - finish() starts the sums over on the caller's thread
            log.warning("token_std on the helper thread failed (%s); summing after the encoder instead", e)

    def encoded(i: int) -> None:
        with progress:
            state["encoded"] = i
            progress.notify()

    thread = threading.Thread(target=work, name="tokenize-helper", daemon=True)
    thread.start()
    try:
        yield (lambda i: touched[i].wait()), encoded
    finally:
        with progress:
            state["stop"] = True
            progress.notify()
        thread.join()


def _non_finite(src, tensors: dict[str, torch.Tensor]) -> CheckpointError:
    name = next(k for k, t in tensors.items() if not torch.isfinite(t).all())
    return CheckpointError(f"{_weights_file(src)}: tensor {name} has non-finite values")


def _weights_file(src) -> Path | str:
    """The weights file of checkpoint dir `src` for messages (the dir if it has none; "adapter" for in-memory)."""
    src = Path(src) if src is not None else None
    return next((src / f for f in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if (src / f).is_file()), src) if src else "adapter"


def _token_set(encoded: Encoded, layout: Layout, steps: list[int], sources: list[str]) -> TokenSet:
    tokens, means, stds, std = encoded
    return TokenSet(tokens, layout, layout.mask(), std, steps, sources, means, stds)


def token_std(tokens: torch.Tensor, mask: torch.Tensor, block_tokens: int = codec.BLOCK_TOKENS // 4,
              threads: int = 1) -> torch.Tensor:
    """Per-token std across checkpoints, averaged over the token's real cells (`StdSums` over all of `tokens`)."""
    return StdSums(tokens, mask, block_tokens).finish(threads)


class StdSums:
    """token_std of `tokens` [n, T, ...] (mask [T, ...]: its real cells), from running sums over the checkpoints.

    The sums are shifted by the first checkpoint, sum_i (x_i - x_0) and sum_i (x_i - x_0)^2 (no cancellation for
    trajectories that move little), and added checkpoint by checkpoint instead of reducing over dim 0, which is
    several times slower on the strided layout. They run block of tokens by block, so a block's sums stay in the CPU
    cache while the checkpoints stream past, and a block's std is finished as soon as its last checkpoint is in.
    Every cell sees the same elementwise operations in the same order however the checkpoints and tokens are split
    (in time, or between threads), so the result never depends on the split."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor, block_tokens: int) -> None:
        self.tokens, self.mask, self.block_tokens = tokens, mask, block_tokens
        self._s1_s2: tuple[torch.Tensor, torch.Tensor] | None = None  # allocated (and faulted in) by the first adder
        self.done = 1  # checkpoints [0, done) are in the sums of every token (checkpoint 0 adds zero)
        self._partial = False  # an add_until failed midway: the sums hold part of a range

    def add_until(self, end: int) -> None:
        """Add checkpoints [done, end) (end < n) on every token, as the checkpoints become final."""
        if self._partial:
            self._restart()
        self._partial = True
        self._add(self.done, end, 0, self.tokens.shape[1])
        self.done, self._partial = max(self.done, end), False

    def finish(self, threads: int = 1) -> torch.Tensor:
        """Add the remaining checkpoints, the tokens split between `threads` Python threads (torch releases the GIL in
        its ops); return token_std [T]."""
        if self._partial:
            self._restart()
        n, num, errors = self.tokens.shape[0], self.tokens.shape[1], []
        std = torch.empty(num)
        self._sums()  # allocated here, before the threads share them
        per = -(-num // max(1, threads) // self.block_tokens) * self.block_tokens  # whole blocks per thread
        parts = [(t, min(t + per, num)) for t in range(0, num, per)] or [(0, 0)]

        def add(begin: int, stop: int) -> None:
            try:
                self._add(self.done, n, begin, stop, std)
            except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
                errors.append(e)

        workers = [threading.Thread(target=add, args=part, name="token-std", daemon=True) for part in parts[1:]]
        for w in workers:
            w.start()
        add(*parts[0])
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
        return std

    def _restart(self) -> None:
        self._s1_s2 = None
        self.done, self._partial = 1, False

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._s1_s2 is None:
            self._s1_s2 = torch.zeros_like(self.tokens[0]), torch.zeros_like(self.tokens[0])
        return self._s1_s2

    def _add(self, first: int, end: int, begin: int, stop: int, std: torch.Tensor | None = None) -> None:
        """Add checkpoints [first, end) on tokens [begin, stop); with `std`, end is n: write their token_std there."""
        n, tokens, x0, b = self.tokens.shape[0], self.tokens, self.tokens[0], self.block_tokens
        all_s1, all_s2 = self._sums()
        d = torch.empty_like(x0[: min(b, stop - begin)])
        for t0 in range(begin, stop, b):
            t1 = min(t0 + b, stop)
            s1, s2, db, x0b = all_s1[t0:t1], all_s2[t0:t1], d[: t1 - t0], x0[t0:t1]
            for i in range(first, end):
                torch.sub(tokens[i, t0:t1], x0b, out=db)
                s1.add_(db)
                s2.addcmul_(db, db)
            if std is not None:
                s1.div_(n)
                var = s2.div_(n).sub_(s1.square_()).clamp_min_(0)
                cells = var.sqrt_().mul_(self.mask[t0:t1])
                std[t0:t1] = cells.flatten(1).sum(1) / self.mask[t0:t1].flatten(1).sum(1).clamp_min(1)


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
