"""Sub-tasks: a dataset's train split cut into groups, each a task of its own (its own LoRA, its own prompts).

A sub-task is named `<dataset>@<group>` (e.g. `arc_easy@Mercury`, `boolq@c2`): a safe directory name
(pipeline steps `lora/arc_easy@Mercury`) and a plain Hydra value; as an override *key* Hydra reads `@`
as a package, so maps keyed by task name are given as one dict value (`++generator.tokens={arc_easy@c0: ...}`).
Group names keep only [A-Za-z0-9_-] (other characters become `-`).

`dataset.subtasks` (conf/subtasks/default.yaml) says how:
- by=field: the group is the match of `pattern` in a record field (`id` or `prompt`); ARC's ids start with
  their source exam (Mercury_7220990, NYSEDREGENTS_2008_4_12, CSZ10336), so `^[A-Za-z&]+` groups by exam;
- by=kmeans: k-means (k clusters, seed) on the unit-norm mean-pooled encoder embeddings of the records'
  prompts (the generator's unlabeled questions); clusters are named c0, c1, ... by decreasing size.
Either way groups under `min_size` records are merged into `other`. Only the train split is cut; evaluation
stays on the whole dataset.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from loragen import io
from loragen.data.records import MCRecord
from loragen.data.registry import LoadedSplit, data_options
from loragen.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SEP = "@"
OTHER = "other"
METHODS = (None, "field", "kmeans")
FIELDS = ("id", "prompt")
KMEANS_RESTARTS = 4
KMEANS_ITERS = 100
EMBED_BATCH = 64


def task_name(dataset: str, group: str | None) -> str:
    return f"{dataset}{SEP}{group}" if group else dataset


def split_task(name: str) -> tuple[str, str | None]:
    """`arc_easy@Mercury` -> ("arc_easy", "Mercury"); `arc_easy` -> ("arc_easy", None)."""
    dataset, sep, group = str(name).partition(SEP)
    if sep and not group:
        raise ConfigError(f"task name {name!r}: expected <dataset>{SEP}<group>, the group is empty")
    return dataset, group or None


def enabled(spec: DictConfig) -> bool:
    """Whether the dataset is cut into sub-tasks (datasets without a `subtasks` block, e.g. instruction data, never)."""
    refuse_on_converted(spec)
    return "subtasks" in spec and spec.subtasks.by is not None


def refuse_on_converted(spec: DictConfig) -> None:
    """A converted instruction dataset (`<name>_instruct`) inherits its source's block as `mc.subtasks`, which
    its rows never go through: setting it is an error rather than a silent no-op."""
    mc = spec.get("mc")
    if mc is None or "subtasks" not in mc:
        return
    if mc.subtasks.by is not None or mc.subtasks.select is not None:
        raise ConfigError(f"dataset {spec.name}: mc.subtasks.by={mc.subtasks.by} select={mc.subtasks.select}, but "
                          f"sub-tasks are not applied to converted instruction rows; split the multiple-choice "
                          f"dataset instead (dataset={mc.name} dataset.subtasks.by=field|kmeans)")


def selected(spec: DictConfig) -> str | None:
    """The group a single-dataset run trains on (dataset.subtasks.select), checked against `by`."""
    refuse_on_converted(spec)
    if "subtasks" not in spec:
        return None
    group = spec.subtasks.select
    if group is not None and not enabled(spec):
        raise ConfigError(f"dataset {spec.name}: subtasks.select={group} but subtasks.by is null; "
                          f"set dataset.subtasks.by=field|kmeans")
    return None if group is None else str(group)


def check(spec: DictConfig) -> None:
    st = spec.subtasks
    where = f"dataset {spec.name}: subtasks"
    if st.by not in METHODS:
        raise ConfigError(f"{where}.by={st.by!r}; expected null, field or kmeans")
    if int(st.min_size) < 1:
        raise ConfigError(f"{where}.min_size={st.min_size}; expected a positive int")
    if st.by == "field":
        if st.field not in FIELDS:
            raise ConfigError(f"{where}.field={st.field!r}; expected one of {list(FIELDS)} (record fields)")
        try:
            re.compile(str(st.pattern))
        except re.error as e:
            raise ConfigError(f"{where}.pattern={st.pattern!r} is not a regular expression ({e})") from None
    if st.by == "kmeans" and int(st.k) < 2:
        raise ConfigError(f"{where}.k={st.k}; expected at least 2 clusters")


def groups(spec: DictConfig, records: list[MCRecord], paths: DictConfig) -> dict[str, list[int]]:
    """group -> indices into `records`, named groups by decreasing size, then `other`."""
    check(spec)
    st = spec.subtasks
    if st.by is None:
        raise ConfigError(f"dataset {spec.name}: subtasks.by is null; nothing to split")
    if st.by == "field":
        labels = [field_group(r, str(st.field), str(st.pattern), spec.name) for r in records]
    else:
        x = embeddings([r.prompt for r in records], st.encoder, paths)
        labels = cluster_names(kmeans(x, int(st.k), int(st.seed)))
    return merge_small(labels, int(st.min_size), spec.name)


def field_group(record: MCRecord, field: str, pattern: str, dataset: str) -> str:
    """The pattern's first group in the record's field (its whole match when it has no group)."""
    value = str(getattr(record, field))
    m = re.search(pattern, value)
    found = (m.group(1) if m.re.groups else m.group(0)) if m else None
    if not found:
        raise DataError(f"dataset {dataset}, record {record.id}: its {field} {value[:80]!r} does not match "
                        f"subtasks.pattern={pattern!r} (every record needs a group)")
    return found


def safe_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", group).strip("-") or "-"


def merge_small(labels: list[str], min_size: int, dataset: str) -> dict[str, list[int]]:
    raw: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        raw.setdefault(lab, []).append(i)
    named: dict[str, list[int]] = {}
    origin: dict[str, str] = {}
    for lab, idx in raw.items():
        name = OTHER if len(idx) < min_size else safe_name(lab)
        if name != OTHER and name in origin and origin[name] != lab:
            raise DataError(f"dataset {dataset}: sub-task values {origin[name]!r} and {lab!r} both become the "
                            f"group name {name!r} (names keep [A-Za-z0-9_-]); change subtasks.pattern")
        origin.setdefault(name, lab)
        named.setdefault(name, []).extend(idx)
    order = sorted((n for n in named if n != OTHER), key=lambda n: (-len(named[n]), n))
    out = {n: sorted(named[n]) for n in order}
    if OTHER in named:
        out[OTHER] = sorted(named[OTHER])
        if len(out[OTHER]) < min_size:
            log.warning("dataset %s: sub-task %s has %d records, fewer than subtasks.min_size=%d", dataset, OTHER,
                        len(out[OTHER]), min_size)
    if len(out) == 1:
        log.warning("dataset %s: its sub-tasks collapse into one group (%s); subtasks.min_size=%d", dataset,
                    next(iter(out)), min_size)
    return out


def select(spec: DictConfig, loaded: LoadedSplit, group: str, paths: DictConfig) -> LoadedSplit:
    """The part of `loaded` (a dataset's train split) in sub-task `group`."""
    parts = groups(spec, loaded.records, paths)
    if group not in parts:
        sizes = ", ".join(f"{g} ({len(i)})" for g, i in parts.items())
        raise ConfigError(f"dataset {spec.name} has no sub-task {group!r} (subtasks.by={spec.subtasks.by}); "
                          f"its sub-tasks: {sizes}")
    records = [loaded.records[i] for i in parts[group]]
    return replace(loaded, split=f"{loaded.split} ({task_name(spec.name, group)})", records=records)


def restrict(spec: DictConfig, loaded: LoadedSplit, paths: DictConfig, limit: int | None = None) -> LoadedSplit:
    """A train split cut to the selected sub-task (dataset.subtasks.select, if any), then to its first `limit`."""
    group = selected(spec)
    if group is not None:
        loaded = select(spec, loaded, group, paths)
    if limit is not None:
        loaded = replace(loaded, records=loaded.records[: int(limit)])
    return loaded


def task_names(spec: DictConfig, records: list[MCRecord], paths: DictConfig) -> list[str]:
    """The tasks a dataset contributes: its sub-tasks when subtasks.by is set, else itself."""
    if not enabled(spec):
        return [spec.name]
    return [task_name(spec.name, g) for g in groups(spec, records, paths)]


def sizes(cfg: DictConfig) -> dict[str, dict]:
    """dataset -> {by, split, tasks: {task name: train records}} for every dataset of cfg.dataset with sub-tasks."""
    from loragen.data.registry import dataset_specs, load_split

    out = {}
    for spec in dataset_specs(cfg.dataset):
        if not enabled(spec):
            continue
        loaded = load_split(spec, str(spec.train_split), **data_options(cfg))
        parts = groups(spec, loaded.records, cfg.paths)
        out[spec.name] = {"by": spec.subtasks.by, "split": str(spec.train_split), "records": len(loaded.records),
                          "tasks": {task_name(spec.name, g): len(idx) for g, idx in parts.items()}}
    return out


def sizes_markdown(found: dict[str, dict]) -> list[str]:
    if not found:
        return []
    lines = ["", "# Sub-tasks", "", "| dataset | by | train split (documents) | sub-task | documents |", "|---|---|---|---|---|"]
    for name, s in found.items():
        for task, n in s["tasks"].items():
            lines.append(f"| {name} | {s['by']} | {s['split']} ({s['records']}) | {task} | {n} |")
    total = sum(len(s["tasks"]) for s in found.values())
    return lines + ["", f"{total} sub-tasks."]


# ---------------------------------------------------------------- k-means on prompt embeddings

def embeddings(texts: list[str], encoder_cfg: DictConfig, paths: DictConfig) -> torch.Tensor:
    """[n, C] unit-norm mean-pooled embeddings (loragen.models.pooling.embed), cached on disk by text content."""
    from safetensors.torch import load_file, save_file

    from loragen.models.registry import LoadedModel, load_model, resolve_model_path
    from loragen.models.text_encoder import encoder_key

    key = encoder_key(LoadedModel(encoder_cfg.name, encoder_cfg.kind, resolve_model_path(encoder_cfg, paths), None, None))
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    path = Path(paths.cache_dir) / "subtask_embeddings" / key / f"{h.hexdigest()[:32]}.safetensors"
    if path.is_file():
        x = load_file(str(path))["embeddings"]
        if x.shape[0] == len(texts):
            return x
    lm = load_model(encoder_cfg, paths, precision="fp32", device="cpu")
    if lm.kind != "encoder":
        raise ConfigError(f"subtasks.encoder {lm.name!r} has kind {lm.kind!r}; k-means needs an encoder (minilm)")
    x = embed_texts(lm.model, lm.tokenizer, texts)
    with io.atomic_path(path) as tmp:
        save_file({"embeddings": x.contiguous()}, str(tmp), metadata={"encoder": key, "count": str(len(texts))})
    return x


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    from loragen.models.pooling import embed

    log.info("embedding %d prompts for k-means sub-tasks", len(texts))
    return torch.cat([embed(model, tokenizer, texts[i: i + EMBED_BATCH]).cpu()
                      for i in range(0, len(texts), EMBED_BATCH)])


def kmeans(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """[n] cluster labels: k-means++ starts (seeded), Lloyd iterations, best of KMEANS_RESTARTS by inertia.

    float64 on one thread: the same labels whatever the machine's core count (and faster than two threads
    of small matrix products on a busy machine)."""
    if x.shape[0] < k:
        raise ConfigError(f"subtasks.k={k} clusters but only {x.shape[0]} records")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _lloyd(x.double(), k, seed)
    finally:
        torch.set_num_threads(threads)


def _lloyd(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    xx = (x * x).sum(1, keepdim=True)
    best: tuple[float, torch.Tensor] | None = None
    for _ in range(KMEANS_RESTARTS):
        centers = _plus_plus(x, k, gen, xx)
        labels = _sq_dist(x, centers, xx).argmin(1)
        for _ in range(KMEANS_ITERS):
            onehot = torch.nn.functional.one_hot(labels, k).double()
            counts = onehot.sum(0)
            sums = onehot.T @ x
            centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)  # empty: keep
            new = _sq_dist(x, centers, xx).argmin(1)
            if torch.equal(new, labels):
                break
            labels = new
        inertia = float(_sq_dist(x, centers, xx).gather(1, labels[:, None]).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels)
    return best[1]


def _sq_dist(x: torch.Tensor, centers: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """[n, k] squared Euclidean distances (by a matrix product; xx: the [n, 1] squared norms of x)."""
    return (xx - 2 * x @ centers.T + (centers * centers).sum(1)).clamp_min(0)


def _plus_plus(x: torch.Tensor, k: int, gen: torch.Generator, xx: torch.Tensor) -> torch.Tensor:
    centers = [x[int(torch.randint(x.shape[0], (1,), generator=gen))]]
    for _ in range(1, k):
        d2 = _sq_dist(x, torch.stack(centers), xx).min(1).values
        if float(d2.sum()) == 0:  # fewer distinct points than clusters
            centers.append(x[int(torch.randint(x.shape[0], (1,), generator=gen))])
        else:
            centers.append(x[int(torch.multinomial(d2, 1, generator=gen))])
    return torch.stack(centers)


def cluster_names(labels: torch.Tensor) -> list[str]:
    """Cluster ids renamed c0, c1, ... by decreasing size (ties: the cluster of the earlier record first)."""
    ids = labels.tolist()
    first = {}
    for i, c in enumerate(ids):
        first.setdefault(c, i)
    sizes = {c: ids.count(c) for c in first}
    order = sorted(first, key=lambda c: (-sizes[c], first[c]))
    rename = {c: f"c{j}" for j, c in enumerate(order)}
    return [rename[c] for c in ids]
