"""Where the generator's prompts come from: a dataset split's unlabeled questions, or a text file."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from loragen.data import LoadedSplit, dataset_specs, load_split, subtasks
from loragen.data.registry import data_options
from loragen.errors import ConfigError, DataError


def dataset_spec(cfg: DictConfig, name: str, known: dict | None = None) -> DictConfig:
    """The config of dataset `name` (or of the dataset of sub-task `<dataset>@<group>`) among the members of
    `cfg.dataset`, else among `known` (task name -> spec)."""
    base, _ = subtasks.split_task(name)
    specs = {s.name: s for s in dataset_specs(cfg.dataset)}
    if base not in specs and known and name in known:
        return OmegaConf.create(known[name])
    if base not in specs:
        raise ConfigError(f"dataset {base!r} is not in dataset={cfg.dataset.name} (it holds {sorted(specs)}); "
                          f"choose a dataset config that contains it, e.g. dataset={base} or dataset=commonsense")
    return specs[base]


def task_split(cfg: DictConfig, name: str, split: str, known: dict | None = None) -> LoadedSplit:
    """`split` of dataset `name`; of a sub-task `<dataset>@<group>`, the records of its group (groups are cut
    from the dataset's train split: `split` must be that one)."""
    spec = dataset_spec(cfg, name, known)
    loaded = load_split(spec, split, **data_options(cfg))
    _, group = subtasks.split_task(name)
    if group is not None:
        if split != str(spec.train_split):
            raise ConfigError(f"sub-task {name}: its prompts come from the train split {spec.train_split!r} its "
                              f"groups were cut from, not {split!r}")
        loaded = subtasks.select(spec, loaded, group, cfg.paths)
    return loaded


def dataset_prompts(cfg: DictConfig, name: str, split: str, known: dict | None = None) -> list[str]:
    """The unlabeled questions (MCRecord.prompt) of `split` of dataset (or sub-task) `name`."""
    return [r.prompt for r in task_split(cfg, name, split, known).records]


def descriptions(cfg: DictConfig, name: str, known: dict | None = None) -> list[str]:
    """The task descriptions of dataset `name` (a sub-task has its dataset's): its config's `description` list."""
    spec = dataset_spec(cfg, name, known)
    listed = spec.get("description") or (spec.get("mc") or {}).get("description") or []  # *_instruct: its mc dataset's
    texts = [str(t).strip() for t in listed if str(t).strip()]
    if not texts:
        raise ConfigError(f"dataset {spec.name} has no `description:` list in its config; "
                          f"generator.condition=description needs a few one-sentence task descriptions there")
    return texts


DESCRIPTION = "description"  # generate.prompts=<dataset>:description -> the dataset's task descriptions


def load_prompts(cfg: DictConfig, source: str, known: dict | None = None) -> tuple[list[str], dict[str, str]]:
    """Prompts from `<dataset>:<split>`, `<dataset>:description` (its task descriptions) or a text file (one prompt a
    line), and a record of where from."""
    path = Path(source)
    if path.is_file():
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"prompt file {path} has no prompts (expected one prompt a line)")
        return prompts, {"source": str(path.resolve()), "dataset": None, "split": None}
    if ":" not in source:
        raise ConfigError(f"generate.prompts={source!r} is neither a file nor <dataset>:<split> "
                          f"(e.g. arc_challenge:test)")
    name, split = source.split(":", 1)
    if split == DESCRIPTION:
        return descriptions(cfg, name, known), {"source": source, "dataset": name, "split": DESCRIPTION}
    return dataset_prompts(cfg, name, split, known), {"source": source, "dataset": name, "split": split}
