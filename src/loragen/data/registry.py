"""Load a dataset split as MCRecords, from a local `<data_dir>/<dataset>/<split>.jsonl` or the Hub."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from loragen.data.convert import to_text_record
from loragen.data.formats import FORMATS, HAS_ACC_NORM, RowError
from loragen.data.instruction import FORMAT as INSTRUCTION
from loragen.data.instruction import load_instruction_records
from loragen.data.records import MCRecord, TextRecord
from loragen.data.splits import SplitSpec, subsample
from loragen.errors import DataError

log = logging.getLogger(__name__)

MC_INSTRUCTION = "mc_instruction"  # a multiple-choice dataset (spec.mc) converted to instruction rows


@dataclass
class LoadedSplit:
    dataset: str
    split: str  # the split expression as given, so results say which part was used
    records: list[MCRecord] | list[TextRecord]
    source: str  # file path or hub id
    sha256: str | None  # of the source file (local) or None (Hub)
    has_acc_norm: bool
    skipped: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        """Prompt -> text records (instruction data) rather than multiple choice."""
        return bool(self.records) and isinstance(self.records[0], TextRecord)


def data_options(cfg: DictConfig) -> dict[str, Any]:
    """load_split's keywords from a run config: the local data dir, the seed and the `data` settings."""
    return dict(data_dir=cfg.paths.data_dir, seed=cfg.seed, skip_invalid=cfg.data.skip_invalid,
                hash_train_fraction=cfg.data.hash_train_fraction)


def dataset_specs(dataset_cfg: DictConfig) -> list[DictConfig]:
    """The single-dataset configs of a dataset config: itself, or its members (e.g. commonsense)."""
    if "members" in dataset_cfg and dataset_cfg.members:
        return list(dataset_cfg.members.values())
    return [dataset_cfg]


def load_split(
    spec: DictConfig,
    split: str,
    *,
    data_dir: str | None,
    limit: int | None = None,
    sample_ratio: float | None = None,
    seed: int = 0,
    skip_invalid: bool = False,
    hash_train_fraction: float = 0.5,
) -> LoadedSplit:
    """Rows of `split` of dataset `spec`, converted to records, after hash part, slice, sample_ratio and limit.

    Multiple-choice formats give MCRecords; `instruction` (a local JSON/JSONL file) and `mc_instruction`
    (the multiple-choice dataset `spec.mc`, converted by data.convert) give TextRecords.
    """
    if spec.format == INSTRUCTION:
        records, source, sha, skipped = load_instruction_records(spec, split, skip_invalid=skip_invalid)
    elif spec.format == MC_INSTRUCTION:
        mc = load_split(spec.mc, split, data_dir=data_dir, seed=seed, skip_invalid=skip_invalid,
                        hash_train_fraction=hash_train_fraction)
        records = [to_text_record(r, spec.mc.format, source=mc.source) for r in mc.records]
        source, sha, skipped = mc.source, mc.sha256, mc.skipped
    elif spec.format in FORMATS:
        records, source, sha, skipped = _mc_records(spec, split, data_dir, skip_invalid, hash_train_fraction)
    else:
        known = sorted([*FORMATS, INSTRUCTION, MC_INSTRUCTION])
        raise DataError(f"dataset {spec.name}: unknown format {spec.format!r}; known: {known}")
    if skipped and spec.format != MC_INSTRUCTION:  # the multiple-choice load logged its own
        log.warning("%s %s: skipped %d invalid rows of %d (data.skip_invalid=true)", spec.name, split, skipped,
                    len(records) + skipped)
    records = subsample(records, sample_ratio, seed)
    if limit is not None:
        records = records[: int(limit)]
    if not records:
        raise DataError(f"dataset {spec.name} split {split!r} ({source}) has no documents after slicing and limits")
    meta = {"language": str(spec.language)} if spec.format in (INSTRUCTION, MC_INSTRUCTION) else {}
    return LoadedSplit(spec.name, split, records, source, sha, spec.format in HAS_ACC_NORM, skipped, meta)


def _mc_records(spec: DictConfig, split: str, data_dir: str | None, skip_invalid: bool,
                hash_train_fraction: float) -> tuple[list[MCRecord], str, str | None, int]:
    sp = SplitSpec.parse(split)
    if data_dir:
        rows, source, sha = _local_rows(Path(data_dir), spec.name, sp.base)
    else:
        rows, source, sha = _hub_rows(spec, sp.base)
    rows = sp.apply(rows, hash_train_fraction)
    convert = FORMATS[spec.format]
    records: list[MCRecord] = []
    skipped = 0
    for where, row in rows:
        try:
            if isinstance(row, _Malformed):
                raise RowError("<line>", f"malformed JSON ({row.err.msg} at column {row.err.colno})")
            if not isinstance(row, dict):
                raise RowError("<line>", f"expected a JSON object, got {type(row).__name__}")
            records.append(convert(row, f"{spec.name}/{sp.base}/{where[1]}"))
        except RowError as e:
            if not skip_invalid:
                raise DataError(f"{where[0]}, line {where[1] + 1}: {e} (dataset {spec.name}, format {spec.format})") from None
            skipped += 1
    return records, source, sha, skipped


def _local_rows(data_dir: Path, name: str, base: str) -> tuple[list, str, str]:
    ddir = data_dir / name
    if not ddir.is_dir():
        have = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
        raise DataError(
            f"dataset {name!r} not found in the local data dir {data_dir} (LORAGEN_DATA_DIR / paths.data_dir); "
            f"it holds: {have or 'nothing'}. Unset paths.data_dir to read from the Hub."
        )
    path = ddir / f"{base}.jsonl"
    if not path.is_file():
        have = sorted(p.stem for p in ddir.glob("*.jsonl"))
        raise DataError(f"split {base!r} of dataset {name!r} not found: no {path}; available splits: {have}")
    raw = path.read_bytes()
    rows = []
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(((str(path), i), json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append(((str(path), i), _Malformed(e)))
    return rows, str(path), hashlib.sha256(raw).hexdigest()


class _Malformed:
    def __init__(self, err: Exception):
        self.err = err


def _hub_rows(spec: DictConfig, base: str) -> tuple[list, str, None]:
    import datasets

    hub = spec.hub
    source = f"hub:{hub.path}" + (f"/{hub.name}" if hub.name else "") + (f"@{hub.revision}" if hub.revision else "")
    try:
        ds = datasets.load_dataset(hub.path, hub.name, split=base, revision=hub.revision)
    except ValueError as e:
        try:
            have = datasets.get_dataset_split_names(hub.path, hub.name, revision=hub.revision)
        except Exception:  # noqa: BLE001 - the listing is a courtesy
            have = "unknown"
        raise DataError(f"split {base!r} of {source} cannot be loaded ({e}); available splits: {have}") from None
    except OSError as e:  # offline, unreachable, not in the cache (ConnectionError, DatasetNotFoundError)
        raise DataError(unreachable_message(spec.name, base, source, e)) from e
    return [((source, i), dict(row)) for i, row in enumerate(_iter(ds))], source, None


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def unreachable_message(name: str, base: str, source: str, e: BaseException) -> str:
    """Dataset `name` read from the Hub (no local data dir) could not be loaded: what, where it looked, what to do."""
    import datasets

    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    offline = hub_offline()
    env = os.environ.get("LORAGEN_DATA_DIR")
    data_dir = "LORAGEN_DATA_DIR is empty" if env is not None and not env.strip() else "LORAGEN_DATA_DIR is not set"
    return (f"dataset {name} (split {base}): no local data ({data_dir}, paths.data_dir=null) and {source} is not "
            f"in the Hugging Face datasets cache {datasets.config.HF_DATASETS_CACHE}"
            f"{' and the Hub is off (HF_HUB_OFFLINE=1)' if offline else ' and the Hub cannot be reached'} ({why}). "
            f"Set LORAGEN_DATA_DIR to a directory holding {name}/{base}.jsonl"
            f"{', or unset HF_HUB_OFFLINE to download it' if offline else ', or check the network'}")


def _iter(ds) -> Iterator[dict]:
    yield from ds


def heldout_split(spec: DictConfig) -> str:
    """The split to evaluate a LoRA trained on `spec.train_split`: the other hash part when train is one."""
    sp = SplitSpec.parse(spec.train_split)
    if sp.part == "train":
        return f"{sp.base}@eval"
    return str(spec.eval_split)


def splits_of(spec: DictConfig) -> list[str]:
    """The splits a dataset config uses, in order, without repeats."""
    return list(dict.fromkeys([str(spec.train_split), str(spec.eval_split), heldout_split(spec)]))
