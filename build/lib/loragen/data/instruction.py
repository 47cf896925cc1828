"""Instruction data from a local file: JSON (a list of objects) or JSONL, as TextRecords.

Two row forms: Alpaca (`instruction`, optional `input`, `output`) and `prompt`/`target`. Text is
strict UTF-8 and kept exactly as written. Splits `train` and `validation` come from one file by
`splits.ratio_split` (dataset.val_ratio, dataset.split_seed): a seeded content hash, exact in count
and independent of row order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from loragen.data.formats import RowError
from loragen.data.records import TextRecord
from loragen.data.splits import SplitSpec, ratio_split
from loragen.errors import ConfigError, DataError

FORMAT = "instruction"
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Row:
    where: str  # for messages: "<file>, line 3" (JSONL) or "<file>, element 2" (JSON list)
    source: str  # TextRecord.source: "<file>:3" or "<file>[2]"
    number: int  # line (JSONL, from 1) or element index (JSON list, from 0)
    value: Any  # the parsed row, or a RowError for a line that is not JSON


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """Alpaca's user message: the instruction, then a blank line and the input when there is one."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def text_record(row: Any, rid: str, source: str) -> TextRecord:
    """One row (either form) -> TextRecord; RowError names the missing or wrong field."""
    if not isinstance(row, dict):
        raise RowError("<row>", f"expected a JSON object, got {type(row).__name__}")
    if "instruction" in row:
        input_text = row.get("input")
        if input_text is None:
            input_text = ""
        elif not isinstance(input_text, str):
            raise RowError("input", f"expected str, got {type(input_text).__name__} {input_text!r}")
        prompt, target = alpaca_prompt(_text(row, "instruction"), input_text), _text(row, "output")
    elif "prompt" in row:
        prompt, target = _text(row, "prompt"), _text(row, "target")
    else:
        raise RowError("instruction", f"missing: expected 'instruction', 'input' (optional), 'output' (Alpaca) or "
                                      f"'prompt', 'target'; the row has {sorted(row)}")
    rid = row.get("id", rid)
    return TextRecord(id=str(rid), prompt=prompt, target=target, source=source)


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowError(field, "missing")
    if not isinstance(value, str):
        raise RowError(field, f"expected str, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise RowError(field, "empty")
    return value


def read_rows(path: Path) -> tuple[list[Row], str]:
    """The rows of a JSON list or JSONL file and the file's SHA-256; file-level problems are DataErrors."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # strict UTF-8; a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file; expected a JSON list of objects or JSONL (one object per line)")
    rows = _json_list(path, text) if text.lstrip().startswith("[") else _jsonl(path, text)
    if not rows:
        raise DataError(f"{path}: no rows (an empty list)")
    return rows, hashlib.sha256(raw).hexdigest()


def _json_list(path: Path, text: str) -> list[Row]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    return [Row(f"{path}, element {i}", f"{path}[{i}]", i, item) for i, item in enumerate(items)]


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value: Any = json.loads(line)
        except json.JSONDecodeError as e:
            value = RowError("<line>", f"malformed JSON ({e.msg} at column {e.colno})")
            if i == 1 and path.suffix == ".json":
                value = RowError("<line>", f"malformed JSON ({e.msg} at column {e.colno}); a .json file must hold "
                                           "a list of objects, a .jsonl file one object per line")
        rows.append(Row(f"{path}, line {i}", f"{path}:{i}", i, value))
    return rows


def instruction_file(spec: DictConfig) -> Path:
    if not spec.get("file"):
        raise ConfigError(f"dataset {spec.name}: no data file; set dataset.file=<a .json or .jsonl file> "
                          "(rows with instruction/input/output or prompt/target)")
    path = Path(str(spec.file)).expanduser()
    if not path.is_file():
        raise ConfigError(f"dataset {spec.name}: dataset.file={spec.file} does not exist (or is not a file)")
    return path


def load_instruction_records(spec: DictConfig, split: str, *, skip_invalid: bool) -> tuple[list[TextRecord], str, str, int]:
    """Records of `split` (train | validation, optionally sliced) of an instruction file: records, source, sha256, skipped."""
    sp = SplitSpec.parse(split)
    if sp.base not in SPLITS or sp.part:
        raise DataError(f"dataset {spec.name}: split {split!r}; an instruction file has the splits {list(SPLITS)} "
                        "(dataset.val_ratio of its rows are validation), optionally sliced, e.g. train[:100]")
    ratio = float(spec.val_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"dataset {spec.name}: dataset.val_ratio={spec.val_ratio}; expected a fraction in [0, 1)")
    path = instruction_file(spec)
    rows, sha = read_rows(path)
    is_val = ratio_split([r.value if not isinstance(r.value, RowError) else r.source for r in rows], ratio,
                         int(spec.split_seed))
    chosen = [r for r, v in zip(rows, is_val) if v == (sp.base == "validation")]
    chosen = sp.apply(chosen, 0.0)  # the slice only: instruction splits have no @train/@eval part
    records, skipped = [], 0
    for row in chosen:
        try:
            if isinstance(row.value, RowError):
                raise row.value
            records.append(text_record(row.value, f"{spec.name}/{row.number}", row.source))
        except RowError as e:
            if not skip_invalid:
                raise DataError(f"{row.where}: {e} (dataset {spec.name}, format {FORMAT})") from None
            skipped += 1
    return records, str(path), sha, skipped
