"""Split expressions: `test`, `validation@train`, `train[100:400]`, `validation[:70%]`, `validation@eval[:50%]`.

`@train` / `@eval` select a deterministic hash part of a split (for datasets without a
train split); the slice is applied after that, then sample_ratio, then limit.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass

from loragen.errors import DataError

_SPLIT_RE = re.compile(r"^(?P<base>[A-Za-z0-9_\-]+)(?:@(?P<part>train|eval))?(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


@dataclass(frozen=True)
class SplitSpec:
    base: str
    part: str | None = None
    start: str | None = None
    stop: str | None = None

    @classmethod
    def parse(cls, text: str) -> "SplitSpec":
        m = _SPLIT_RE.match(str(text).strip())
        if not m:
            raise DataError(
                f"cannot parse split {text!r}: expected NAME, NAME@train, NAME@eval, optionally followed by a "
                "slice such as [100:400] or [:70%]"
            )
        return cls(m["base"], m["part"], m["start"], m["stop"])

    def apply(self, rows: list, hash_train_fraction: float) -> list:
        if self.part:
            rows = [r for r in rows if in_hash_train(r[1], hash_train_fraction) == (self.part == "train")]
        n = len(rows)
        return rows[_bound(self.start, n, 0) : _bound(self.stop, n, n)]


def _bound(text: str | None, n: int, default: int) -> int:
    if text is None:
        return default
    if text.endswith("%"):
        return round(n * int(text[:-1]) / 100)
    return int(text)


def row_hash(row, salt: str = "") -> float:
    """A number in [0, 1) from the row's content (and `salt`), independent of row order and source."""
    digest = hashlib.sha256((salt + json.dumps(row, sort_keys=True, ensure_ascii=False)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_hash_train(row: dict, fraction: float) -> bool:
    """True when the row falls in the train part: a hash of its content, independent of order and source."""
    return row_hash(row) < fraction


def ratio_split(rows: list, ratio: float, seed: int) -> list[bool]:
    """Which rows are validation: the round(ratio * n) rows with the smallest content hash salted by `seed`.

    Exact in count (at least one row each side when 0 < ratio < 1 and n >= 2), deterministic, and
    independent of row order: reordering a file moves no row across the split.
    """
    n = len(rows)
    k = round(ratio * n)
    if 0 < ratio < 1 and n >= 2:
        k = min(max(k, 1), n - 1)
    order = sorted(range(n), key=lambda i: (row_hash(rows[i], f"split_seed={seed}:"), i))
    val = set(order[:k])
    return [i in val for i in range(n)]


def subsample(items: list, ratio: float | None, seed: int) -> list:
    """A seeded random subset of ceil(ratio * n) items, in their original order."""
    if ratio is None or ratio >= 1.0:
        return items
    if not 0.0 < ratio:
        raise DataError(f"sample_ratio must be in (0, 1], got {ratio}")
    k = math.ceil(len(items) * ratio)
    keep = sorted(random.Random(seed).sample(range(len(items)), k))
    return [items[i] for i in keep]
