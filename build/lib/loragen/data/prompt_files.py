"""Files of prompts to answer: .txt (one prompt a line) or .jsonl (objects with a "prompt" field), UTF-8."""

from __future__ import annotations

import json
from pathlib import Path

from loragen.errors import ConfigError, DataError

SUFFIXES = (".txt", ".jsonl")


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of `path`, in order; blank lines are skipped. Bad content -> DataError naming file and line."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"prompt file {path}: expected a .txt (one prompt a line) or .jsonl "
                          f"(one {{\"prompt\": ...}} object a line) file")
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        prompts.append(line.strip() if path.suffix == ".txt" else _jsonl_prompt(line, f"{path}, line {n}"))
    if not prompts:
        raise DataError(f"prompt file {path} has no prompts (expected "
                        + ("one prompt a line)" if path.suffix == ".txt" else "one {\"prompt\": ...} object a line)"))
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a \"prompt\" field, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        got = "missing" if prompt is None else f"{type(prompt).__name__} {prompt!r}"
        raise DataError(f"{where}: field \"prompt\" must be a non-empty string; got {got} (the row has {sorted(row)})")
    return prompt
