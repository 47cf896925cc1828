"""Where the generator's prompts come from: a dataset split's unlabeled questions, or a text file."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from loragen.data import dataset_specs, load_split
from loragen.errors import ConfigError, DataError


def dataset_spec(cfg: DictConfig, name: str, known: dict | None = None) -> DictConfig:
    """The config of dataset `name` among the members of `cfg.dataset`, else among `known` (name -> spec)."""
    specs = {s.name: s for s in dataset_specs(cfg.dataset)}
    if name not in specs and known and name in known:
        return OmegaConf.create(known[name])
    if name not in specs:
        raise ConfigError(f"dataset {name!r} is not in dataset={cfg.dataset.name} (it holds {sorted(specs)}); "
                          f"choose a dataset config that contains it, e.g. dataset={name} or dataset=commonsense")
    return specs[name]


def dataset_prompts(cfg: DictConfig, name: str, split: str, known: dict | None = None) -> list[str]:
    """The unlabeled questions (MCRecord.prompt) of `split` of dataset `name`."""
    loaded = load_split(dataset_spec(cfg, name, known), split, data_dir=cfg.paths.data_dir, seed=cfg.seed,
                        skip_invalid=cfg.data.skip_invalid, hash_train_fraction=cfg.data.hash_train_fraction)
    return [r.prompt for r in loaded.records]


def load_prompts(cfg: DictConfig, source: str, known: dict | None = None) -> tuple[list[str], dict[str, str]]:
    """Prompts from `<dataset>:<split>` or a text file (one prompt a line), and a record of where from."""
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
    return dataset_prompts(cfg, name, split, known), {"source": source, "dataset": name, "split": split}
