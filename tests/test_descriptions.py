"""dataset.description: the paraphrased task descriptions of each multiple-choice dataset.

They are the prompt pool of generator.condition=description, so: 8-16 distinct one-sentence strings per
dataset, no dataset names, and none of them a question of the dataset's eval split.
"""

import json
import re
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, compose

DATASETS = ["arc_easy", "arc_challenge", "boolq", "piqa", "hellaswag", "winogrande", "openbookqa"]
# The field of an eval row that holds the question (hellaswag has no local data).
QUESTION_FIELD = {
    "arc_easy": "question",
    "arc_challenge": "question",
    "boolq": "question",
    "piqa": "goal",
    "winogrande": "sentence",
    "openbookqa": "question_stem",
}
NAMES = re.compile(r"\b(arc|ai2|boolq|piqa|hellaswag|swag|winogrande|winograd|openbook(qa)?|open book)\b", re.I)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


@pytest.fixture(scope="module")
def configs():
    cfg = compose(["dataset=commonsense"])  # all seven members in one composition
    return {name: cfg.dataset.members[name] for name in DATASETS}


@pytest.mark.parametrize("name", DATASETS)
def test_descriptions_are_well_formed(configs, name):
    descriptions = list(configs[name].description)
    assert 8 <= len(descriptions) <= 16, f"{name}: {len(descriptions)} descriptions"
    assert all(isinstance(d, str) for d in descriptions)
    assert len({_norm(d) for d in descriptions}) == len(descriptions), f"{name}: duplicate descriptions"
    for d in descriptions:
        assert 20 <= len(d) <= 200, f"{name}: length {len(d)}: {d!r}"
        assert d == d.strip() and "\n" not in d, d
        assert d[0].isupper() and d.endswith("."), f"{name}: not a sentence: {d!r}"
        assert not re.search(r"[.!?]\s", d), f"{name}: more than one sentence: {d!r}"
        assert not NAMES.search(d), f"{name}: names a dataset: {d!r}"


def test_descriptions_are_not_shared_between_datasets(configs):
    seen = {}
    for name in DATASETS:
        for d in configs[name].description:
            assert _norm(d) not in seen, f"{d!r} in both {seen.get(_norm(d))} and {name}"
            seen[_norm(d)] = name


def test_instruct_configs_carry_descriptions_of_their_mc_dataset():
    cfg = compose(["dataset=arc_easy_instruct"])
    assert "description" not in cfg.dataset  # prompt->text dataset: no top-level key
    assert list(cfg.dataset.mc.description) == list(compose(["dataset=arc_easy"]).dataset.description)


@pytest.mark.parametrize("name", sorted(QUESTION_FIELD))
def test_no_description_is_an_eval_question(configs, name):
    path = Path(DATA_DIR) / name / f"{configs[name].eval_split}.jsonl"
    if not path.is_file():
        pytest.skip(f"no local eval data at {path}")
    field = QUESTION_FIELD[name]
    with path.open(encoding="utf-8") as f:
        questions = {_norm(json.loads(line)[field]) for line in f if line.strip()}
    assert questions, path
    for d in configs[name].description:
        nd = _norm(d)
        assert nd not in questions, f"{name}: description is an eval question: {d!r}"
        assert not any(len(q) >= 20 and q in nd for q in questions), f"{name}: contains an eval question: {d!r}"
