"""Atomic file output: a crash never leaves a half-written file that a later step would trust.

A write that fails for a reason of the storage (disk full, no permission, read-only file system) raises
loragen.errors.DiskFullError / WriteError naming the path: nothing of it was written, and the file it would have
replaced (if any) is intact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from loragen.errors import DiskFullError, WriteError

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space left, quota exceeded
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})  # no permission, read-only file system


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Works for files and directories (e.g. a PEFT adapter dir written by save_pretrained).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise (write_error(e, path) or e) from e
    target = tmp / "out"
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            target.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    except OSError as e:
        err = write_error(e, path, inside=tmp)
        if err is None:
            raise
        raise err from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_error(e: OSError, path: str | os.PathLike, inside: Path | None = None) -> WriteError | None:
    """The user-facing error for `e`, raised while writing `path`; None when it is not a storage problem.

    A permission error counts only when it concerns `path`, its directory or `inside` (the temporary copy), not
    a file the block was reading."""
    path = Path(path)
    if e.errno in FULL_ERRNOS:
        return DiskFullError(f"disk full: {path} was not written ({e.strerror}{free_space(path)}); "
                             f"an earlier {path.name}, if any, is intact", str(path), e.errno)
    if e.errno in DENIED_ERRNOS:
        failed = Path(e.filename) if e.filename else path
        related = [path, path.parent] + ([inside] if inside is not None else [])
        if failed == path or any(r == failed or r in failed.parents or failed in r.parents for r in related):
            return WriteError(f"cannot write {failed}: {e.strerror}", str(failed), e.errno)
    return None


def free_space(path: Path) -> str:
    """', {N} MB free on its file system', or '' when that cannot be told."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return f", {shutil.disk_usage(p).free // 2**20} MB free on its file system"
            except OSError:
                return ""
    return ""


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    """Sets (PEFT's target_modules) as sorted lists: str() would write "{'q', 'v'}", which PEFT reads as a regex."""
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
