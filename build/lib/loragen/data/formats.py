"""Row -> MCRecord converters, one per dataset, in lm-evaluation-harness's 0-shot formats.

Each converter raises RowError naming the field; the caller adds file and line.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from loragen.data.records import MCRecord

DELIM = " "  # lm-evaluation-harness's target_delimiter


class RowError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")
        self.field = field


def _get(row: dict, field: str, kind: type | tuple[type, ...] = str) -> Any:
    if field not in row or row[field] is None:
        raise RowError(field, "missing")
    value = row[field]
    if not isinstance(value, kind):
        raise RowError(field, f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__} {value!r}")
    return value


def _choices(row: dict, field: str = "choices") -> tuple[list[str], list[str]]:
    ch = _get(row, field, dict)
    texts, labels = ch.get("text"), ch.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list):
        raise RowError(field, "expected {'text': [...], 'label': [...]}")
    if not texts:
        raise RowError(f"{field}.text", "empty choice list")
    if len(texts) != len(labels):
        raise RowError(field, f"{len(texts)} texts but {len(labels)} labels")
    return [str(t) for t in texts], [str(lab) for lab in labels]


def _index_of(key: str, labels: list[str], field: str) -> int:
    if key not in labels:
        raise RowError(field, f"answer key {key!r} is not among the labels {labels}")
    return labels.index(key)


def _int_label(row: dict, field: str, n: int, offset: int = 0) -> int:
    raw = _get(row, field, (int, str, bool))
    try:
        gold = int(raw) - offset
    except ValueError:
        raise RowError(field, f"expected an integer label, got {raw!r}") from None
    if not 0 <= gold < n:
        raise RowError(field, f"label {raw!r} is out of range for {n} choices")
    return gold


def _mc(rid: str, context: str, choices: list[str], gold: int) -> MCRecord:
    return MCRecord(
        id=rid,
        contexts=(context,),
        continuations=tuple(DELIM + c for c in choices),
        choices=tuple(choices),
        gold=gold,
        prompt=context,
    )


def arc(row: dict, rid: str) -> MCRecord:
    texts, labels = _choices(row)
    gold = _index_of(_get(row, "answerKey"), labels, "answerKey")
    return _mc(str(row.get("id", rid)), f"Question: {_get(row, 'question')}\nAnswer:", texts, gold)


def openbookqa(row: dict, rid: str) -> MCRecord:
    texts, labels = _choices(row)
    gold = _index_of(_get(row, "answerKey").strip(), labels, "answerKey")
    return _mc(str(row.get("id", rid)), _get(row, "question_stem"), texts, gold)


def boolq(row: dict, rid: str) -> MCRecord:
    # google/boolq has a bool `answer`; super_glue's boolq an int `label`.
    if "answer" in row:
        gold = int(bool(_get(row, "answer", bool)))
    else:
        gold = _int_label(row, "label", 2)
    context = f"{_get(row, 'passage')}\nQuestion: {_get(row, 'question')}?\nAnswer:"
    return _mc(str(row.get("idx", rid)), context, ["no", "yes"], gold)


def piqa(row: dict, rid: str) -> MCRecord:
    choices = [_get(row, "sol1"), _get(row, "sol2")]
    return _mc(rid, f"Question: {_get(row, 'goal')}\nAnswer:", choices, _int_label(row, "label", 2))


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict, rid: str) -> MCRecord:
    ctx = _get(row, "ctx_a") + " " + _get(row, "ctx_b").capitalize()
    query = hellaswag_preprocess(_get(row, "activity_label") + ": " + ctx)
    endings = _get(row, "endings", list)
    if not endings:
        raise RowError("endings", "empty choice list")
    choices = [hellaswag_preprocess(str(e)) for e in endings]
    return _mc(str(row.get("ind", rid)), query, choices, _int_label(row, "label", len(choices)))


def winogrande(row: dict, rid: str) -> MCRecord:
    sentence = _get(row, "sentence")
    if "_" not in sentence:
        raise RowError("sentence", "no blank '_' in the sentence")
    blank = sentence.index("_")
    options = [_get(row, "option1"), _get(row, "option2")]
    gold = _int_label(row, "answer", 2, offset=1)
    target = DELIM + sentence[blank + 1 :].strip()
    return MCRecord(
        id=rid,
        contexts=tuple(sentence[:blank] + o for o in options),
        continuations=(target, target),
        choices=(target[len(DELIM) :],) * 2,
        gold=gold,
        prompt=sentence,
    )


FORMATS: dict[str, Callable[[dict, str], MCRecord]] = {
    "arc": arc,
    "openbookqa": openbookqa,
    "boolq": boolq,
    "piqa": piqa,
    "hellaswag": hellaswag,
    "winogrande": winogrande,
}

# Which formats lm-evaluation-harness reports acc_norm for.
HAS_ACC_NORM = {"arc", "openbookqa", "piqa", "hellaswag"}
