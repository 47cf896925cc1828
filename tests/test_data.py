"""Data registry: counts, gold labels and formats to the character on the local files; splits; bad input."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from loragen.data import load_split
from loragen.data.formats import hellaswag_preprocess
from loragen.data.registry import heldout_split
from loragen.errors import DataError
from tests.conftest import CONF, DATA_DIR


def spec(name):
    return OmegaConf.load(CONF / "dataset" / f"{name}.yaml")


def load(name, split, data_dir=DATA_DIR, **kw):
    return load_split(spec(name), split, data_dir=data_dir, **kw)


def raw_rows(name, split):
    with open(Path(DATA_DIR) / name / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize(
    "name,split,n",
    [
        ("arc_challenge", "test", 1172), ("arc_challenge", "train", 1119), ("arc_easy", "test", 2376),
        ("arc_easy", "train", 2251), ("openbookqa", "test", 500), ("openbookqa", "train", 4957),
        ("boolq", "validation", 3270), ("piqa", "validation", 1838), ("winogrande", "validation", 1267),
        ("winogrande", "train", 9248),
    ],
)
def test_counts(name, split, n):
    assert len(load(name, split).records) == n


def test_gold_labels_match_raw_rows():
    # Independent of the converters: recompute gold from the raw fields.
    rows = raw_rows("arc_challenge", "test")
    recs = load("arc_challenge", "test").records
    assert [r["choices"]["label"].index(r["answerKey"]) for r in rows] == [x.gold for x in recs]
    assert recs[0].gold == 2  # answerKey C of Mercury_7175875
    rows = raw_rows("openbookqa", "test")
    assert [r["choices"]["label"].index(r["answerKey"].strip()) for r in rows] == [x.gold for x in load("openbookqa", "test").records]
    assert [int(r["answer"]) for r in raw_rows("boolq", "validation")] == [x.gold for x in load("boolq", "validation").records]
    assert [r["label"] for r in raw_rows("piqa", "validation")] == [x.gold for x in load("piqa", "validation").records]
    assert [int(r["answer"]) - 1 for r in raw_rows("winogrande", "validation")] == [
        x.gold for x in load("winogrande", "validation").records
    ]


def test_arc_numeric_labels():
    recs = {r.id: r for r in load("arc_challenge", "train").records}
    rec = recs["NYSEDREGENTS_2004_8_31"]
    assert rec.gold == 1 and rec.continuations[1] == " bubbles when acid is placed on it"


def test_formats_to_the_character():
    r = load("arc_challenge", "test").records[0]
    assert r.requests()[2] == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer:",
        " Planetary days will become shorter.",
    )
    assert r.choices[2] == "Planetary days will become shorter."
    r = load("openbookqa", "test").records[0]
    assert r.contexts == (
        "A person wants to start saving money so that they can afford a nice vacation at the end of the year. After "
        "looking over their budget and expenses, they decide the best way to save money is to",
    )
    assert r.continuations == (" make more phone calls", " quit eating lunch out", " buy less with monopoly money", " have lunch with friends")
    assert r.gold == 1
    r = load("boolq", "validation").records[0]
    assert r.contexts[0].startswith("All biomass goes through")
    assert r.contexts[0].endswith("than producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert r.continuations == (" no", " yes") and r.gold == 0
    r = load("piqa", "validation").records[1]
    assert r.contexts == ("Question: dresser\nAnswer:",)
    assert r.continuations == (" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin ") and r.gold == 1
    r = load("winogrande", "validation").records[0]
    assert r.contexts == ("Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria")
    assert r.continuations == (" always got the easier cases.",) * 2 and r.gold == 1


HELLASWAG_ROWS = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
     "ctx_b": "then", "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow on his car."], "label": "3"},
    {"ind": 99, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Heat the grill.", "ctx_b": "turn it", "endings": ["on [step] high  for ten minutes.", "off."], "label": "0"},
]


def test_hellaswag_hand_written_rows(tmp_path):
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG_ROWS))
    recs = load("hellaswag", "validation", data_dir=tmp_path).records
    assert recs[0].contexts == (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles. Then",
    )
    assert recs[0].continuations[3] == " , the man continues removing the snow on his car." and recs[0].gold == 3
    assert recs[0].id == "4"
    # " [title]" -> ". ", brackets dropped, double spaces collapsed, ctx_b capitalized.
    assert recs[1].contexts == ("Home and Garden: How to clean a grill. Heat the grill. Turn it",)
    assert recs[1].continuations == (" on high for ten minutes.", " off.") and recs[1].gold == 0
    assert hellaswag_preprocess("  a [title] b  [x]c ") == "a. b c"


def test_split_slicing_limit_and_sample_ratio():
    full = load("arc_easy", "train").records
    assert [r.id for r in load("arc_easy", "train[100:400]").records] == [r.id for r in full[100:400]]
    assert len(load("arc_easy", "train[:70%]").records) == round(0.7 * len(full))
    assert [r.id for r in load("arc_easy", "test", limit=7).records] == [r.id for r in load("arc_easy", "test").records[:7]]
    a = load("arc_easy", "train", sample_ratio=0.1, seed=3).records
    b = load("arc_easy", "train", sample_ratio=0.1, seed=3).records
    c = load("arc_easy", "train", sample_ratio=0.1, seed=4).records
    assert len(a) == 226 and [r.id for r in a] == [r.id for r in b] and [r.id for r in a] != [r.id for r in c]
    order = {r.id: i for i, r in enumerate(full)}
    assert [order[r.id] for r in a] == sorted(order[r.id] for r in a)


def test_hash_split_partitions_validation(tmp_path):
    full = load("piqa", "validation").records
    tr = load("piqa", "validation@train").records
    ev = load("piqa", "validation@eval").records
    assert len(tr) + len(ev) == len(full) == 1838
    assert {r.id for r in tr}.isdisjoint({r.id for r in ev})
    assert 0.4 < len(tr) / len(full) < 0.6
    assert heldout_split(spec("piqa")) == "validation@eval" and heldout_split(spec("arc_easy")) == "test"
    # Independent of row order: a reversed file gives the same partition.
    lines = (Path(DATA_DIR) / "piqa" / "validation.jsonl").read_text().splitlines()[::-1]
    write(tmp_path, "piqa", "validation", lines)
    rev = load("piqa", "validation@train", data_dir=tmp_path).records
    assert sorted(r.contexts + r.continuations for r in rev) == sorted(r.contexts + r.continuations for r in tr)


def write(tmp_path, name, split, lines):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    p = d / f"{split}.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD_ARC = json.dumps({"id": "x1", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"})


@pytest.mark.parametrize(
    "bad,fragment",
    [
        (json.dumps({"id": "x2", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}), "field 'question': missing"),
        (json.dumps({"id": "x2", "question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}), "answer key 'E' is not among the labels ['A']"),
        (json.dumps({"id": "x2", "question": "q", "choices": {"text": [], "label": []}, "answerKey": "A"}), "empty choice list"),
        ('{"id": "x2", "question": "q", ', "malformed JSON"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, bad, fragment):
    p = write(tmp_path, "arc_easy", "test", [GOOD_ARC, bad, GOOD_ARC])
    with pytest.raises(DataError) as e:
        load("arc_easy", "test", data_dir=tmp_path)
    assert f"{p}, line 2: " in str(e.value) and fragment in str(e.value)
    ok = load("arc_easy", "test", data_dir=tmp_path, skip_invalid=True)
    assert len(ok.records) == 2 and ok.skipped == 1


def test_winogrande_bad_answer(tmp_path):
    p = write(tmp_path, "winogrande", "validation", [json.dumps({"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "3"})])
    with pytest.raises(DataError, match=rf"{p}, line 1: field 'answer': label '3' is out of range for 2 choices"):
        load("winogrande", "validation", data_dir=tmp_path)


def test_missing_dataset_and_split_list_what_is_there(tmp_path):
    write(tmp_path, "arc_easy", "test", [GOOD_ARC])
    with pytest.raises(DataError, match=r"dataset 'boolq' not found in the local data dir .*it holds: \['arc_easy'\]"):
        load("boolq", "validation", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"split 'train' of dataset 'arc_easy' not found.*available splits: \['test'\]"):
        load("arc_easy", "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="cannot parse split"):
        load("arc_easy", "test[1:2:3]", data_dir=tmp_path)
