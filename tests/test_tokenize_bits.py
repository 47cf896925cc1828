"""Tokens, per-token stds and chunk statistics stay bit for bit what the implementation of 2026-12-01 (commit
3f506bc, before the streaming encoder) produced on fixed adapters: a faster encoder must not move a single bit.

The digests were computed with that commit's `tokenize_checkpoints`; the adapters are seeded (random_qwen_adapter
draws from its own torch.Generator), so they are the same bytes on every machine.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from loragen.bench.tokenize import MODULES, random_qwen_adapter
from loragen.generator.tasks import Task, mean_checkpoint
from loragen.lora.adapter_io import write_adapter
from loragen.lora.tokenize import tokenize_checkpoints

CASES = {  # (scheme, chunk, dtype) -> sha256 of tokens, token_std, chunk_mean, chunk_std (each's raw bytes)
    ("dnd", None, "float32"): ('784d4f1db88759c8', 'f1288c73674c5818', '20ff8322cd66f9c4', 'bb3b2a5a2cd90b73'),
    ("dnd", 100, "float32"): ('6056a07c4ec87b08', 'ab52b827a5a8ea43', 'ac1f344f64741ab3', '3835b3c1051f472c'),
    ("dnd", 100, "bfloat16"): ('3ec2c51af8b48b21', '1d5e231c57fd7d8e', '9fbda055cd1f0531', '550e95cdf374b86a'),
    ("flat", None, "float32"): ('ee15769d76f52836', '0fe83360b167f897', '-', '-'),
}


def digest(t: torch.Tensor | None) -> str:
    if t is None:
        return "-"
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def trajectory(root: Path, dtype: str) -> Path:
    """Five checkpoints of a 2-layer Qwen2.5-0.5B-shaped r=8 adapter, each a small move of the first."""
    first = random_qwen_adapter(0, layers=2)
    for i in range(5):
        move = random_qwen_adapter(100 + i, layers=2)
        tensors = {k: (v + 0.1 * (i + 1) * move.tensors[k]).to(getattr(torch, dtype)) for k, v in first.tensors.items()}
        write_adapter(root / f"step-{(i + 1) * 10:06d}", type(first)(first.config, tensors))
    return root


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(map(str, c)))
def test_tokens_are_bit_equal_to_the_previous_implementation(tmp_path, case):
    scheme, chunk, dtype = case
    ts = tokenize_checkpoints(trajectory(tmp_path, dtype), modules=MODULES, scheme=scheme, chunk=chunk)
    got = tuple(digest(t) for t in (ts.tokens, ts.token_std, ts.chunk_mean, ts.chunk_std))
    assert got == CASES[case]


@pytest.mark.parametrize("group", [1, 2, 3, 5])
@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(map(str, c)))
def test_tokens_do_not_depend_on_the_group_size(tmp_path, monkeypatch, case, group):
    """Checkpoints are read and encoded GROUP_CHECKPOINTS at a time (one op for all of a group): any group size
    gives the same bits (5 checkpoints: groups of 1, 2+2+1, 3+2, 5)."""
    from loragen.lora.tokenize import token_set

    monkeypatch.setattr(token_set, "GROUP_CHECKPOINTS", group)
    scheme, chunk, dtype = case
    ts = tokenize_checkpoints(trajectory(tmp_path, dtype), modules=MODULES, scheme=scheme, chunk=chunk)
    assert tuple(digest(t) for t in (ts.tokens, ts.token_std, ts.chunk_mean, ts.chunk_std)) == CASES[case]


@pytest.mark.parametrize("shape", [(300, 10, 66), (4296, 10, 130), (50, 3, 4)])
def test_mean_checkpoint_by_blocks_equals_the_one_tensor_mean(shape):
    g = torch.Generator().manual_seed(0)
    sets = [torch.randn(n, *shape, generator=g) * (i + 1) for i, n in enumerate([6, 5, 3])]
    tasks = [Task(f"t{i}", type("TS", (), {"tokens": s})(), [], torch.empty(0), "test", None) for i, s in enumerate(sets)]
    expected = torch.cat(sets).mean(0)
    assert torch.equal(mean_checkpoint(tasks), expected)
    assert torch.equal(mean_checkpoint(tasks, block=16), expected)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings from /proc (Linux)")
def test_token_sets_load_memory_mapped_not_copied(tmp_path):
    """The generator stage reads every dataset's token set (1.1 GB each at Qwen2.5-0.5B scale): load_token_set maps
    tokens.safetensors instead of reading it into fresh memory."""
    from loragen.lora.tokenize import load_token_set, save_token_set

    ts = tokenize_checkpoints(trajectory(tmp_path / "ckpts", "float32"), modules=MODULES)
    save_token_set(ts, tmp_path / "ts")
    loaded = load_token_set(tmp_path / "ts")
    assert torch.equal(loaded.tokens, ts.tokens)
    start = loaded.tokens.untyped_storage().data_ptr()
    maps = Path("/proc/self/maps").read_text().splitlines()
    owners = [line for line in maps
              if int(line.split()[0].split("-")[0], 16) <= start < int(line.split()[0].split("-")[1], 16)]
    assert owners and owners[0].endswith(str((tmp_path / "ts" / "tokens.safetensors").resolve()))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_prefault_thread_never_blocks_the_encoder(tmp_path, monkeypatch):
    """The page-touching thread is an optimisation: if it fails, tokenizing still finishes with the same tokens."""
    from loragen.lora.tokenize import token_set

    expected = tokenize_checkpoints(trajectory(tmp_path / "a", "float32"), modules=MODULES).tokens
    monkeypatch.setattr(token_set, "PAGE_FLOATS", 0)  # slicing with step 0 raises ValueError inside the thread
    monkeypatch.setattr(token_set.os, "cpu_count", lambda: 2)
    src, got = trajectory(tmp_path / "b", "float32"), {}
    worker = threading.Thread(target=lambda: got.update(tokens=tokenize_checkpoints(src, modules=MODULES).tokens),
                              daemon=True)
    worker.start()
    worker.join(120)  # a blocked encoder fails here instead of hanging the suite
    assert not worker.is_alive(), "the encoder waited for a dead page-touching thread"
    assert torch.equal(got["tokens"], expected)


def test_a_helper_failing_midway_through_token_std_gives_the_same_bits(tmp_path, monkeypatch, caplog):
    """The helper thread adds encoded groups to the token_std sums while the encoder goes on. If it fails halfway
    through a step, the sums start over after the encoder: same tokens and stds, and a warning says so."""
    import time

    from loragen.lora.tokenize import token_set

    src = trajectory(tmp_path / "a", "float32")
    expected = tokenize_checkpoints(src, modules=MODULES)
    monkeypatch.setattr(token_set.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(token_set, "GROUP_CHECKPOINTS", 1)
    encode = token_set._encode_dnd_group
    monkeypatch.setattr(token_set, "_encode_dnd_group", lambda *a: (encode(*a), time.sleep(0.2)))  # helper catches up
    add, calls = token_set.StdSums._add, []

    def failing_add(self, first, end, begin, stop, std=None):
        if threading.current_thread().name == "tokenize-helper":
            calls.append(first)
            if len(calls) == 2:  # the second step: half its tokens, then fail
                add(self, first, end, begin, (begin + stop) // 2, std)
                raise RuntimeError("injected")
        add(self, first, end, begin, stop, std)

    monkeypatch.setattr(token_set.StdSums, "_add", failing_add)
    with caplog.at_level("WARNING", logger="loragen.lora.tokenize.token_set"):
        got = tokenize_checkpoints(src, modules=MODULES)
    assert len(calls) == 2  # the helper summed one step, failed in the next, and stopped
    assert "token_std on the helper thread failed (injected)" in caplog.text
    for field in ("tokens", "token_std", "chunk_mean", "chunk_std"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
