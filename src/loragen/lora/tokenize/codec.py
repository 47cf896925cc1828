"""Encode one checkpoint's tensors into tokens and decode tokens back into tensors.

dnd token (r+2) x (c+2): data cells [1:r+1, 1:c+1] hold the chunk z-scored by its own mean and
std; the top row and the left column hold the mean code `8 * mean`, the bottom row and the right
column the std code `log(0.9 * std + 0.1) + 1.6` (the reference's encoding). Decoding averages
each code's cells in float64. The encoder normalises with the statistics *as they decode* from
the fp32 codes, so the round trip only loses fp32 rounding of the data cells (~1e-7 of the
chunk's scale), however coarse the std code is for tiny stds. Stds are floored at STD_FLOOR, which
keeps constant chunks (a zero-initialised lora_B) finite; their data cells are 0.

flat: raw values are copied into the token stream here; the tokenizer then normalises each
tensor's range by its mean and std over all checkpoints (`normalise_flat`), kept in the layout.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from loragen.errors import CheckpointError
from loragen.lora.tokenize.layout import Layout, TensorSlot

STD_FLOOR = 1e-8
MEAN_SCALE = 8.0


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: (de)tokenizing is hundreds of small memory-bound copies per
    checkpoint, where thread hand-offs cost more than they bring (measured 6x slower with 2 threads on
    a loaded 2-core machine, and 70x for lora_B's transposed copies)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def encode_stats(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) -> their fp32 border codes."""
    std = std.double().clamp_min(STD_FLOOR)
    return (mean.double() * MEAN_SCALE).float(), (torch.log(0.9 * std + 0.1) + 1.6).float()


def decode_stats(mean_code: torch.Tensor, std_code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Border codes (any float dtype) -> float64 (mean, std)."""
    mean = mean_code.double() / MEAN_SCALE
    std = ((torch.exp(std_code.double() - 1.6) - 0.1) / 0.9).clamp_min(STD_FLOOR)
    return mean, std


def border_stats(tokens: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """dnd tokens [..., T, r+2, c+2] -> float64 (mean, std) [..., T], each the average of its border cells."""
    r, c = layout.rank, layout.chunk
    n = c + 2 + r
    mean_code = (tokens[..., 0, :].double().sum(-1) + tokens[..., 1 : r + 1, 0].double().sum(-1)) / n
    std_code = (tokens[..., r + 1, :].double().sum(-1) + tokens[..., 1 : r + 1, c + 1].double().sum(-1)) / n
    return decode_stats(mean_code, std_code)


def padded_tokens(layout: Layout) -> list[tuple[int, int]]:
    """dnd: (token index, real data columns) of every token whose chunk is padded."""
    out = []
    for s in layout.tensors:
        tail = s.length - (s.num_tokens - 1) * layout.chunk
        if tail < layout.chunk:
            out.append((s.first_token + s.num_tokens - 1, tail))
    return out


# Tokens per block of the encoder and of token_std: a block's passes (copy in, statistics, normalise) run in the
# CPU cache, so memory traffic is about one read of the adapter and one write of its tokens (measured in README,
# Speed). Larger blocks fall out of L2; smaller ones pay torch's per-op overhead more often.
BLOCK_TOKENS = 256


def token_blocks(layout: Layout, block_tokens: int = BLOCK_TOKENS) -> list[tuple[int, int, list]]:
    """(first token, end token, tensor slots) of consecutive tensors filling about `block_tokens` tokens each."""
    blocks, slots, t0 = [], [], 0
    for s in layout.tensors:
        slots.append(s)
        end = s.first_token + s.num_tokens
        if end - t0 >= block_tokens:
            blocks.append((t0, end, slots))
            slots, t0 = [], end
    if slots:
        blocks.append((t0, slots[-1].first_token + slots[-1].num_tokens, slots))
    return blocks


def encode_dnd(tensors: dict[str, torch.Tensor], layout: Layout, dst: torch.Tensor,
               padded: list[tuple[int, int]] | None = None,
               blocks: list[tuple[int, int, list]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the tokens of one checkpoint into `dst` [T, r+2, c+2] (fp32), or of K checkpoints at once into `dst`
    [K, T, r+2, c+2] from tensors of shape (K, *saved shape); return the chunks' decoded (mean, std), [T] or [K, T].

    K at once pays torch's per-op overhead (hundreds of ops per checkpoint) once per K checkpoints. Works block by
    block (`token_blocks`); every value is computed by the same operations as on one whole checkpoint at once, so
    the tokens depend neither on the block size nor on K (tests/test_tokenize_bits.py)."""
    if dst.dim() == 3:
        one = {s.name: tensors[s.name].unsqueeze(0) for s in layout.tensors}
        mean, std = encode_dnd(one, layout, dst.unsqueeze(0), padded, blocks)
        return mean[0], std[0]
    k, r, c = dst.shape[0], layout.rank, layout.chunk
    pad_width = dict(padded_tokens(layout) if padded is None else padded)
    blocks = token_blocks(layout) if blocks is None else blocks
    mean_q = torch.empty(k, layout.num_tokens)
    std_q = torch.empty(k, layout.num_tokens)
    tmp = torch.empty(k * max(b[1] - b[0] for b in blocks) * r * c)
    for t0, t1, slots in blocks:
        block = dst[:, t0:t1]
        data = block[:, :, 1 : r + 1, 1 : c + 1]
        for s in slots:
            _copy_in(data, tensors[s.name], s, s.first_token - t0, c)
        mean = data.mean((2, 3))  # two passes: 5x faster than var_mean's Welford here, and as stable
        pads = [(t - t0, pad_width[t]) for t in (s.first_token + s.num_tokens - 1 for s in slots) if t in pad_width]
        # statistics of a padded chunk's real cells only, one checkpoint at a time as on one checkpoint
        pad_stats = [(i, t, torch.var_mean(data[i, t, :, :w], correction=0)) for t, w in pads for i in range(k)]
        for i, t, (_, m) in pad_stats:
            mean[i, t] = m
        # In place, data - mean is already data - (the decoded mean): in fp32, mean * 8 / 8 is mean (_block_codes).
        # The one exception, |mean| > 4e37 (mean * 8 overflows), decodes to inf and the checkpoint is refused.
        data.sub_(mean[:, :, None, None])
        var = torch.square(data, out=tmp[: data.numel()].view(data.shape)).mean((2, 3))
        for i, t, (v, _) in pad_stats:
            var[i, t] = v
        mq, sq = mean_q[:, t0:t1], std_q[:, t0:t1]
        mean_code, std_code = _block_codes(mean, var, mq, sq)
        data.div_(sq[:, :, None, None])
        for t, w in pads:
            data[:, t, :, w:] = 0
        block[:, :, 0, :] = mean_code[:, :, None]
        block[:, :, 1 : r + 1, 0] = mean_code[:, :, None]
        block[:, :, r + 1, :] = std_code[:, :, None]
        block[:, :, 1 : r + 1, c + 1] = std_code[:, :, None]
    return mean_q, std_q


def _block_codes(mean: torch.Tensor, var: torch.Tensor, mean_out: torch.Tensor,
                 std_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_stats(mean, var.sqrt())`, then their decoded fp32 (mean, std) written into mean_out, std_out, in
    fewer ops (the encoder runs this on every block): the same values bit for bit.

    The mean code is mean * 8 in fp32, exact as in fp64 (a power of two); decoding it, fp32 and fp64-then-rounded
    division both round the same exact quotient. The std code keeps fp64 for log and exp."""
    mean_code = torch.mul(mean, MEAN_SCALE)
    torch.div(mean_code, MEAN_SCALE, out=mean_out)
    std = var.sqrt().double().clamp_min_(STD_FLOOR)
    std_code = std.mul_(0.9).add_(0.1).log_().add_(1.6).float()
    std_out.copy_(std_code.double().sub_(1.6).exp_().sub_(0.1).div_(0.9).clamp_min_(STD_FLOOR))
    return mean_code, std_code


def _copy_in(data: torch.Tensor, x: torch.Tensor, s: TensorSlot, t: int, c: int) -> None:
    """Tensor slot `s` of K checkpoints, x (K, *s.shape), into its tokens' data cells data[:, t : t + s.num_tokens]
    (K, n, r, c); the padded cells of its last token are zeroed. The whole tokens' source is one as_strided view
    (K, n, r, c) of x: the chain of transpose, slice and reshape it replaces made the copies of one group 8-15%
    slower (336 of them for Qwen2.5-0.5B)."""
    k, full = x.shape[0], s.length // c
    if full:
        sk, s0, s1 = x.stride()
        # lora_B x (K, L, r): cell (j, a, b) is x[:, j*c + b, a]; lora_A x (K, r, L): it is x[:, a, j*c + b]
        strides = (sk, c * s0, s1, s0) if s.transposed else (sk, c * s1, s0, s1)
        data.narrow(1, t, full).copy_(x.as_strided((k, full, data.shape[2], c), strides))
    if full < s.num_tokens:
        x = x.transpose(1, 2) if s.transposed else x  # (K, r, L)
        tail = s.length - full * c
        data[:, t + full, :, :tail].copy_(x[:, :, full * c :])
        data[:, t + full, :, tail:].zero_()


def encode_flat_raw(tensors: dict[str, torch.Tensor], layout: Layout, dst: torch.Tensor) -> None:
    """Copy one checkpoint's raw values into `dst` [T, h, w] (contiguous); padding is left as it is."""
    flat = dst.view(-1)
    for s in layout.tensors:
        flat[s.offset : s.offset + s.numel].copy_(tensors[s.name].reshape(-1))


def normalise_flat(tokens: torch.Tensor, layout: Layout) -> None:
    """In place: z-score each tensor's range of `tokens` [N, T, h, w] by its statistics over all N
    checkpoints; record them (as the fp32 values used) in the layout."""
    flat = tokens.view(tokens.shape[0], -1)
    for s in layout.tensors:
        v = flat[:, s.offset : s.offset + s.numel]
        std, mean = torch.std_mean(v.double(), correction=0)
        s.mean = float(mean.float())
        s.std = float(std.clamp_min(STD_FLOOR).float())
        v.sub_(s.mean).div_(s.std)


def decode(tokens: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Tokens [T, h, w] of one checkpoint -> PEFT tensors with the layout's names, shapes and dtypes."""
    _check_shape(tokens, layout)
    tokens = tokens.detach().float().cpu()
    with single_thread(), torch.no_grad():
        return {k: v.contiguous() for k, v in decode_differentiable(tokens, layout).items()}


def decode_differentiable(tokens: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """`decode` in torch ops only, on the tokens' device, so gradients flow from the tensors back into the tokens
    (the generator's task objective). `decode` is this function under no_grad: one code path, equal results."""
    _check_shape(tokens, layout)
    out = {}
    if layout.scheme == "dnd":
        r, c = layout.rank, layout.chunk
        mean, std = (v.to(tokens.dtype)[:, None, None] for v in border_stats(tokens, layout))
        data = tokens[:, 1 : r + 1, 1 : c + 1]
        for s in layout.tensors:
            t = slice(s.first_token, s.first_token + s.num_tokens)
            if s.transposed:  # (n, r, c) -> (n, c, r) -> (L, r): lora_B in one pass
                x = torch.addcmul(mean[t], data[t].transpose(1, 2), std[t]).reshape(-1, r)[: s.length]
            else:  # (n, r, c) -> (r, n, c) -> (r, L)
                x = torch.addcmul(mean[t].transpose(0, 1), data[t].transpose(0, 1),
                                  std[t].transpose(0, 1)).reshape(r, -1)[:, : s.length]
            out[s.name] = x.to(_dtype(s.dtype))
    else:
        flat = tokens.reshape(-1)
        for s in layout.tensors:
            x = flat[s.offset : s.offset + s.numel] * s.std + s.mean
            out[s.name] = x.reshape(s.shape).to(_dtype(s.dtype))
    return out


def _check_shape(tokens: torch.Tensor, layout: Layout) -> None:
    if tuple(tokens.shape) != layout.shape:
        raise CheckpointError(f"tokens of shape {list(tokens.shape)} do not fit the layout {list(layout.shape)}")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
