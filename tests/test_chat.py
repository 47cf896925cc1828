"""stage=chat: batch answers to a prompt file, prompt-file errors, and one interactive session on a pseudo-terminal."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from loragen.data.prompt_files import read_prompt_file
from loragen.errors import CheckpointError, ConfigError, DataError
from loragen.evaluation.generation import Generation
from loragen.stages import chat
from tests.conftest import ROOT, run_stage_in_process
from tests.test_evaluate import random_adapter

KEYS = {"prompt", "output", "tokens", "terminated", "seconds"}


def chat_args(run, *extra):
    return ["stage=chat", "model=tiny_qwen2", "chat.generation.max_new_tokens=5", "chat.batch_size=2", "tracker=none",
            f"hydra.run.dir={run}", *extra]


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batch_from_txt_is_complete_ordered_and_deterministic(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\n\n  你好，世界  \nwhat is 2+2?\n", encoding="utf-8")
    res = run_stage_in_process(chat_args(tmp_path / "a", f"chat.prompts={prompts}"), run_dir=tmp_path / "a")
    assert res == {"mode": "batch", "prompts": 3, "out": str(tmp_path / "a" / "chat.jsonl")}
    first = rows(tmp_path / "a" / "chat.jsonl")
    assert [r["prompt"] for r in first] == ["hello there", "你好，世界", "what is 2+2?"]  # blank line skipped
    for r in first:
        assert set(r) == KEYS and isinstance(r["output"], str) and r["seconds"] > 0
        assert 0 <= r["tokens"] <= 5 and (r["terminated"] or r["tokens"] == 5)
    run_stage_in_process(chat_args(tmp_path / "b", f"chat.prompts={prompts}"), run_dir=tmp_path / "b")
    assert [r["output"] for r in rows(tmp_path / "b" / "chat.jsonl")] == [r["output"] for r in first]


def test_batch_from_jsonl_with_adapter_into_chat_out(paths, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Name a colour."}\n{"prompt": "Name a fruit.", "id": 7}\n', encoding="utf-8")
    ad = random_adapter(paths, "tiny_qwen2", tmp_path / "ad")
    out = tmp_path / "answers" / "out.jsonl"
    res = run_stage_in_process(chat_args(tmp_path / "r", f"chat.prompts={prompts}", f"chat.adapter={ad}",
                                         f"chat.out={out}"), run_dir=tmp_path / "r")
    assert res["out"] == str(out) and [r["prompt"] for r in rows(out)] == ["Name a colour.", "Name a fruit."]
    bad = random_adapter(paths, "tiny_gemma2", tmp_path / "gemma_ad")
    with pytest.raises(CheckpointError, match="gemma_ad"):
        run_stage_in_process(chat_args(tmp_path / "s", f"chat.prompts={prompts}", f"chat.adapter={bad}"),
                             run_dir=tmp_path / "s")


def test_prompt_file_errors_name_file_and_line(tmp_path):
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes("ok\n".encode() + b"caf\xe9 latin-1\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 2: not UTF-8"):
        read_prompt_file(bad_utf8)
    no_prompt = tmp_path / "p.jsonl"
    no_prompt.write_text('{"prompt": "fine"}\n\n{"text": "no prompt field"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl, line 3: field \"prompt\" must be a non-empty string; got missing"):
        read_prompt_file(no_prompt)
    broken = tmp_path / "q.jsonl"
    broken.write_text('{"prompt": "fine"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.jsonl, line 2: malformed JSON"):
        read_prompt_file(broken)
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"e\.txt has no prompts"):
        read_prompt_file(empty)
    with pytest.raises(ConfigError, match=r"\.txt .* or \.jsonl"):
        read_prompt_file(tmp_path / "p.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(DataError, match=r"bad\.txt, line 2"):  # the stage fails on it before loading a model
        run_stage_in_process(chat_args(tmp_path / "r", f"chat.prompts={bad_utf8}"), run_dir=tmp_path / "r")


def feed(*items):
    """A stand-in for input(): returns the items in turn, raising those that are exceptions."""
    it = iter(items)

    def fake(prompt=""):
        x = next(it)
        if isinstance(x, BaseException):
            raise x
        return x

    return fake


def test_interactive_loop_ignores_empty_lines_and_quits(monkeypatch, capsys):
    asked = []

    def answer(texts, progress):
        asked.append(texts)
        return [Generation(f"  answer to {texts[0]} ", 3, True, 0.1)]

    monkeypatch.setattr("builtins.input", feed("", "   ", "first question", "/exit", "never read"))
    assert chat.interactive(answer, 5) == 1
    assert asked == [["first question"]] and "answer to first question\n" in capsys.readouterr().out
    monkeypatch.setattr("builtins.input", feed("second", EOFError()))
    assert chat.interactive(answer, 5) == 1  # EOF (Ctrl-D) ends the session
    monkeypatch.setattr("builtins.input", feed("third", KeyboardInterrupt()))
    assert chat.interactive(answer, 5) == 1 and asked[-1] == ["third"]


def _read_until(fd, marker: bytes, timeout: float, buf: bytearray) -> bytes:
    """Read from the pty until `marker` appears after what was consumed; return the text up to and including it."""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {bytes(buf)[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed before {marker!r}; got {bytes(buf)[-2000:]!r}")
            buf += chunk
    end = buf.index(marker) + len(marker)
    text = bytes(buf[:end])
    del buf[:end]
    return text


def test_interactive_session_on_a_pseudo_terminal(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\n", encoding="utf-8")
    run_stage_in_process(chat_args(tmp_path / "batch", f"chat.prompts={prompts}"), run_dir=tmp_path / "batch")
    expected = rows(tmp_path / "batch" / "chat.jsonl")[0]["output"].strip()  # greedy: the same answer

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "loragen", *chat_args(tmp_path / "tty")], stdin=slave, stdout=slave,
                            stderr=slave, cwd=ROOT, env={**os.environ, "TERM": "dumb"}, close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        _read_until(master, b"quits.\r\n> ", 180, buf)
        os.write(master, b"hello there\n")
        reply = _read_until(master, b"\r\n> ", 120, buf)
        assert reply.startswith(b"hello there\r\n")  # the terminal's echo, then the answer
        assert expected.encode() in reply
        assert b"[cut at 5 new tokens" in reply or len(reply) > len(b"hello there\r\n\r\n> ")
        os.write(master, b"\n")  # an empty line is ignored: just a new prompt
        _read_until(master, b"> ", 30, buf)
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
