"""Datasets: Hub-schema rows -> multiple-choice records in lm-evaluation-harness formats."""

from loragen.data.records import MCRecord
from loragen.data.registry import LoadedSplit, dataset_specs, load_split

__all__ = ["MCRecord", "LoadedSplit", "dataset_specs", "load_split"]
