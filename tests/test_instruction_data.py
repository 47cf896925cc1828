"""Instruction data: both row forms, UTF-8, bad input, the train/validation split, the commonsense
converter on real rows, and stage=data on instruction datasets (with the Alpaca JSONL round trip)."""

import hashlib
import json
import random
from pathlib import Path

import pytest

from loragen.data import load_split
from loragen.data.convert import to_text_record
from loragen.data.formats import hellaswag
from loragen.data.records import TextRecord
from loragen.errors import ConfigError, DataError
from tests.conftest import DATA_DIR, compose, run_stage_in_process

ZH_INSTRUCTION = "把下面的句子翻译成英文。"
ZH_INPUT = "我喜欢在春天散步，看花开。"
ZH_OUTPUT = "I like to take walks in spring and watch the flowers bloom. 🌸"


def spec(file=None, *overrides):
    extra = [f"dataset.file={file}"] if file is not None else []
    return compose(["dataset=instruction", *extra, *overrides]).dataset


def load(path, split="train", val_ratio=0.0, **kw):
    return load_split(spec(path, f"dataset.val_ratio={val_ratio}"), split, data_dir=DATA_DIR, **kw)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- both forms, UTF-8 -------------------------------------------------------------------------


def test_alpaca_jsonl_both_with_and_without_input(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Name a colour.", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"id": "q7", "instruction": "Echo.", "input": None, "output": "Echo."},
    ])
    loaded = load(f)
    assert [(r.prompt, r.target) for r in loaded.records] == [
        ("Name a colour.", "Blue."),
        ("Add the numbers.\n\n2 and 3", "5"),
        ("Say hi.", "hi"),
        ("Echo.", "Echo."),
    ]
    assert all(isinstance(r, TextRecord) for r in loaded.records)
    assert [r.id for r in loaded.records] == ["instruction/1", "instruction/2", "instruction/3", "q7"]
    assert loaded.records[1].source == f"{f}:2"
    assert loaded.has_acc_norm is False and loaded.meta["language"] == "en"
    assert loaded.source == str(f)
    assert loaded.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()


def test_prompt_target_json_list(tmp_path):
    f = tmp_path / "captions.json"
    f.write_text(json.dumps([
        {"prompt": "Describe the image: a red bicycle against a wall.", "target": "A red bike leans on a brick wall."},
        {"prompt": "Caption: two cats asleep.", "target": "Two cats sleeping on a sofa."},
    ], indent=2), encoding="utf-8")
    records = load(f).records
    assert [(r.prompt, r.target) for r in records] == [
        ("Describe the image: a red bicycle against a wall.", "A red bike leans on a brick wall."),
        ("Caption: two cats asleep.", "Two cats sleeping on a sofa."),
    ]
    assert records[1].source == f"{f}[1]"


@pytest.mark.parametrize("form", ["jsonl", "json"])
def test_chinese_text_round_trips_exactly(tmp_path, form):
    rows = [{"instruction": ZH_INSTRUCTION, "input": ZH_INPUT, "output": ZH_OUTPUT},
            {"prompt": "用一句话介绍北京。", "target": "北京是中国的首都，历史悠久。"}]
    f = tmp_path / f"zh.{form}"
    if form == "json":
        f.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        write_jsonl(f, rows)
    records = load(f, **{}).records
    assert records[0].prompt == ZH_INSTRUCTION + "\n\n" + ZH_INPUT
    assert records[0].target == ZH_OUTPUT
    assert (records[1].prompt, records[1].target) == ("用一句话介绍北京。", "北京是中国的首都，历史悠久。")


def test_escaped_unicode_and_byte_order_mark(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "你好", "target": "hello"}).encode() + b"\n")  # \u escapes
    (rec,) = load(f).records
    assert (rec.prompt, rec.target) == ("你好", "hello")


# --- bad input: file and line in every message ---------------------------------------------------


def test_non_utf8_file_names_file_and_line(tmp_path):
    f = tmp_path / "gbk.jsonl"
    f.write_bytes(json.dumps({"prompt": "ok", "target": "ok"}).encode() + b"\n"
                  + '{"prompt": "你好", "target": "x"}\n'.encode("gbk"))
    with pytest.raises(DataError, match=rf"{f}, line 2: not UTF-8"):
        load(f)


@pytest.mark.parametrize("content", [b"", b"  \n\n"])
def test_empty_file(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match=rf"{f}: empty file"):
        load(f)


def test_empty_json_list(tmp_path):
    f = tmp_path / "none.json"
    f.write_text("[]\n")
    with pytest.raises(DataError, match=rf"{f}: no rows"):
        load(f)


def test_invalid_json_list_names_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n  {"prompt": "a", "target": "b"},\n  {"prompt": "c" "target": "d"}\n]\n')
    with pytest.raises(DataError, match=rf"{f}, line 3: invalid JSON"):
        load(f)


@pytest.mark.parametrize("bad,fragment", [
    ({"instruction": "Do it.", "input": "x"}, "field 'output': missing"),
    ({"instruction": "Do it.", "output": None}, "field 'output': missing"),
    ({"instruction": "Do it.", "output": "   "}, "field 'output': empty"),
    ({"instruction": "Do it.", "output": 5}, "field 'output': expected str, got int"),
    ({"instruction": "Do it.", "input": ["x"], "output": "y"}, "field 'input': expected str"),
    ({"prompt": "Caption this."}, "field 'target': missing"),
    ({"question": "q", "answer": "a"}, r"field 'instruction': missing: expected .*\['answer', 'question'\]"),
    (["not", "an", "object"], "field .<row>.: expected a JSON object, got list"),
])
def test_bad_jsonl_row_names_file_line_and_field(tmp_path, bad, fragment):
    good = {"instruction": "Fine.", "output": "Fine."}
    f = write_jsonl(tmp_path / "rows.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match=rf"{f}, line 3: {fragment}"):
        load(f)


def test_malformed_jsonl_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "a", "target": "b"}\n\n{"prompt": "a", target: "b"}\n')
    with pytest.raises(DataError, match=rf"{f}, line 3: field '<line>': malformed JSON"):
        load(f)


def test_bad_element_of_json_list_names_its_index(tmp_path):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([{"prompt": "a", "target": "b"}, {"prompt": "a", "target": "b"}, {"prompt": "c"}]))
    with pytest.raises(DataError, match=rf"{f}, element 2: field 'target': missing"):
        load(f)


def test_skip_invalid_skips_bad_rows_and_counts_them(tmp_path, caplog):
    good = {"instruction": "Fine.", "output": "Fine."}
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join([json.dumps(good), json.dumps({"instruction": "no output"}), "{oops", json.dumps(good)]) + "\n")
    loaded = load(f, skip_invalid=True)
    assert len(loaded.records) == 2 and loaded.skipped == 2
    assert "skipped 2 invalid rows of 4" in caplog.text


def test_unset_or_missing_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"set dataset.file="):
        load_split(spec(), "train", data_dir=DATA_DIR)
    with pytest.raises(ConfigError, match=rf"dataset.file={tmp_path}/nope.jsonl does not exist"):
        load(tmp_path / "nope.jsonl")


def test_unknown_split_and_bad_ratio(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "target": "t"}] * 3)
    with pytest.raises(DataError, match=r"split 'test'; an instruction file has the splits \['train', 'validation'\]"):
        load(f, "test")
    with pytest.raises(ConfigError, match=r"dataset.val_ratio=1.5"):
        load(f, val_ratio=1.5)


# --- train/validation split ----------------------------------------------------------------------


def _numbered(n):
    return [{"instruction": f"Question number {i}?", "output": f"Answer {i}."} for i in range(n)]


def _split_sets(path, ratio, seed=0):
    s = spec(path, f"dataset.val_ratio={ratio}", f"dataset.split_seed={seed}")
    train = {r.target for r in load_split(s, "train", data_dir=None).records}
    val = {r.target for r in load_split(s, "validation", data_dir=None).records}
    return train, val


def test_split_ratio_is_exact_and_partitions(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", _numbered(50))
    train, val = _split_sets(f, 0.2)
    assert len(val) == 10 and len(train) == 40  # round(0.2 * 50)
    assert train.isdisjoint(val) and train | val == {f"Answer {i}." for i in range(50)}
    train, val = _split_sets(f, 0.25)
    assert len(val) == 12 and len(train) == 38  # round(12.5) = 12
    f3 = write_jsonl(tmp_path / "three.jsonl", _numbered(3))
    assert [len(s) for s in _split_sets(f3, 0.1)] == [2, 1]  # at least one validation row


def test_split_is_deterministic_and_independent_of_row_order(tmp_path):
    rows = _numbered(40)
    a = _split_sets(write_jsonl(tmp_path / "a.jsonl", rows), 0.3)
    assert a == _split_sets(write_jsonl(tmp_path / "a.jsonl", rows), 0.3)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert a == _split_sets(write_jsonl(tmp_path / "b.jsonl", shuffled), 0.3)
    as_list = tmp_path / "c.json"
    as_list.write_text(json.dumps(shuffled))
    assert a == _split_sets(as_list, 0.3)
    other_seed = _split_sets(write_jsonl(tmp_path / "d.jsonl", rows), 0.3, seed=1)
    assert other_seed[1] != a[1] and len(other_seed[1]) == len(a[1]) == 12


def test_split_slice_and_limit(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", _numbered(20))
    s = spec(f, "dataset.val_ratio=0.5")
    full = load_split(s, "train", data_dir=None).records
    assert load_split(s, "train[2:5]", data_dir=None).records == full[2:5]
    assert load_split(s, "train", data_dir=None, limit=4).records == full[:4]
    # in file order: row numbers increase
    assert [int(r.id.split("/")[1]) for r in full] == sorted(int(r.id.split("/")[1]) for r in full)


# --- commonsense -> instruction converter ---------------------------------------------------------


def raw_rows(name, split, n):
    with open(Path(DATA_DIR) / name / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def bullets(texts):
    return "\n".join(f"- {t.strip()}" for t in texts)


def expected_from_raw(name, row):
    """The instruction form of a raw Hub-schema row, built from its fields (not from an MCRecord)."""
    if name in ("arc_easy", "arc_challenge"):
        gold = row["choices"]["label"].index(row["answerKey"])
        return ("Answer the question with the text of the correct option.\n\n"
                f"Question: {row['question']}\nOptions:\n{bullets(row['choices']['text'])}",
                row["choices"]["text"][gold])
    if name == "openbookqa":
        gold = row["choices"]["label"].index(row["answerKey"].strip())
        return ("Answer the question, or complete the statement, with the text of the correct option.\n\n"
                f"{row['question_stem']}\nOptions:\n{bullets(row['choices']['text'])}", row["choices"]["text"][gold])
    if name == "piqa":
        sols = [row["sol1"], row["sol2"]]
        return ("Choose the better solution for reaching the goal and answer with its text.\n\n"
                f"Goal: {row['goal']}\nSolutions:\n{bullets(sols)}", sols[row["label"]].strip())
    if name == "boolq":
        return ("Read the passage and answer the question with yes or no.\n\n"
                f"Passage: {row['passage']}\nQuestion: {row['question']}?", "yes" if row["answer"] else "no")
    if name == "winogrande":
        opts = [row["option1"], row["option2"]]
        return ("Fill in the blank (_) in the sentence with the correct option and answer with that option.\n\n"
                f"Sentence: {row['sentence']}\nOptions:\n{bullets(opts)}", opts[int(row["answer"]) - 1])
    raise AssertionError(name)


# (dataset, eval split file, the first row's gold text, read off the file by hand)
FIRST_GOLD = [
    ("arc_easy", "test", "Sunlight is the source of energy for nearly all ecosystems."),
    ("arc_challenge", "test", "Planetary days will become shorter."),
    ("openbookqa", "test", "quit eating lunch out"),
    ("piqa", "validation", "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
                           "strips, you will also need to supply it with a water bottle and a food dish."),
    ("boolq", "validation", "no"),
    ("winogrande", "validation", "Maria"),
]


@pytest.mark.parametrize("name,split,first_gold", FIRST_GOLD)
def test_converter_on_real_rows(name, split, first_gold):
    s = compose([f"dataset={name}_instruct"]).dataset
    assert s.eval_split == split and s.mc.name == name
    loaded = load_split(s, split, data_dir=DATA_DIR, limit=30)
    assert loaded.dataset == f"{name}_instruct" and loaded.source.endswith(f"{name}/{split}.jsonl")
    assert loaded.records[0].target == first_gold
    for rec, row in zip(loaded.records, raw_rows(name, split, 30), strict=True):
        assert (rec.prompt, rec.target) == expected_from_raw(name, row)


def test_converter_by_hand_winogrande_and_piqa_spaces():
    (w,) = load_split(compose(["dataset=winogrande_instruct"]).dataset, "validation[:1]", data_dir=DATA_DIR).records
    assert w.prompt == ("Fill in the blank (_) in the sentence with the correct option and answer with that option.\n\n"
                        "Sentence: Sarah was a much better surgeon than Maria so _ always got the easier cases.\n"
                        "Options:\n- Sarah\n- Maria")
    # piqa validation line 2: sol2 "finish, woodgrain with  bobby pin " (label 1): outer spaces dropped, inner kept
    p = load_split(compose(["dataset=piqa_instruct"]).dataset, "validation[1:2]", data_dir=DATA_DIR).records[0]
    assert p.target == "finish, woodgrain with  bobby pin"
    assert p.prompt.endswith("Goal: dresser\nSolutions:\n- replace drawer with bobby pin\n- finish, woodgrain with  bobby pin")


def test_converter_hellaswag_hand_written_row():
    row = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
           "ctx_b": "then", "endings": [" the man continues.", "the man stops [title] and waits."], "label": "1"}
    rec = to_text_record(hellaswag(row, "h/0"), "hellaswag")
    assert rec.prompt == ("Choose the most plausible continuation of the text and answer with its text.\n\n"
                          "Text: Removing ice from car: Then, the man writes over the snow. Then\n"
                          "Continuations:\n- the man continues.\n- the man stops. and waits.")
    assert rec.target == "the man stops. and waits."


def test_instruct_dataset_uses_the_mc_splits():
    s = compose(["dataset=boolq_instruct"]).dataset
    assert (s.train_split, s.eval_split) == ("validation@train", "validation")
    train = load_split(s, "validation@train", data_dir=DATA_DIR)
    mc = load_split(s.mc, "validation@train", data_dir=DATA_DIR)
    assert [r.id for r in train.records] == [r.id for r in mc.records] and train.sha256 == mc.sha256


# --- stage=data -----------------------------------------------------------------------------------


def test_stage_data_on_chinese_instruction_file(tmp_path):
    f = write_jsonl(tmp_path / "zh.jsonl", [{"instruction": ZH_INSTRUCTION, "input": ZH_INPUT, "output": ZH_OUTPUT}]
                    + [{"prompt": f"第{i}个问题", "target": f"答案{i}"} for i in range(9)])
    out = tmp_path / "run"
    summary = run_stage_in_process(["stage=data", "dataset=instruction", f"dataset.file={f}", "dataset.val_ratio=0.2",
                                    "dataset.language=zh", "show.examples=10", "tracker=none"], out)
    assert summary["instruction"]["train"]["n"] == 8 and summary["instruction"]["validation"]["n"] == 2
    md = (out / "data_summary.md").read_text(encoding="utf-8")
    shown = sum(f"target:\n```\n答案{i}\n```" in md for i in range(9)) + (f"target:\n```\n{ZH_OUTPUT}\n```" in md)
    assert shown == 2  # both validation rows, prompt and target as written
    assert "prompt:\n```\n" in md


def test_stage_data_instruct_and_alpaca_round_trip(tmp_path):
    out = tmp_path / "mc"
    run_stage_in_process(["stage=data", "dataset=arc_challenge", "data.to_instruction=true", "tracker=none"], out)
    written = out / "arc_challenge" / "test.jsonl"
    rows = [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1172 and set(rows[0]) == {"id", "instruction", "input", "output"}
    assert rows[0]["id"] == "Mercury_7175875" and rows[0]["output"] == "Planetary days will become shorter."
    for split in ("train", "validation"):
        assert (out / "arc_challenge" / f"{split}.jsonl").is_file()

    back = load_split(spec(written, "dataset.val_ratio=0"), "train", data_dir=None).records
    direct = load_split(compose(["dataset=arc_challenge_instruct"]).dataset, "test", data_dir=DATA_DIR).records
    assert [(r.id, r.prompt, r.target) for r in back] == [(r.id, r.prompt, r.target) for r in direct]

    out2 = tmp_path / "instr"
    summary = run_stage_in_process(["stage=data", "dataset=arc_challenge_instruct", "tracker=none"], out2)
    assert {k: v["n"] for k, v in summary["arc_challenge_instruct"].items()} == {"train": 1119, "test": 1172,
                                                                                 "validation": 299}
    md = (out2 / "data_summary.md").read_text()
    assert "## arc_challenge_instruct (test) id=Mercury_7175875" in md
    assert "target:\n```\nPlanetary days will become shorter.\n```" in md
