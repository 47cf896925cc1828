"""Multiple-choice records -> instruction rows: the question and its options become the instruction's
input, the gold choice's text the output.

Works from the MCRecord (the lm-evaluation-harness context built by data.formats), so every
source of a commonsense dataset (Hub or local) converts the same way. Choice texts are stripped
of surrounding spaces; boolq's output is "yes" or "no".
"""

from __future__ import annotations

from typing import Callable

from loragen.data.instruction import alpaca_prompt
from loragen.data.records import MCRecord, TextRecord
from loragen.errors import DataError

INSTRUCTIONS = {
    "arc": "Answer the question with the text of the correct option.",
    "openbookqa": "Answer the question, or complete the statement, with the text of the correct option.",
    "piqa": "Choose the better solution for reaching the goal and answer with its text.",
    "hellaswag": "Choose the most plausible continuation of the text and answer with its text.",
    "winogrande": "Fill in the blank (_) in the sentence with the correct option and answer with that option.",
    "boolq": "Read the passage and answer the question with yes or no.",
}


def to_alpaca(rec: MCRecord, fmt: str) -> dict[str, str]:
    """An Alpaca row {id, instruction, input, output} for a record of multiple-choice format `fmt`."""
    if fmt not in _INPUTS:
        raise DataError(f"record {rec.id}: no instruction form for format {fmt!r}; known: {sorted(_INPUTS)}")
    input_text, output = _INPUTS[fmt](rec)
    return {"id": rec.id, "instruction": INSTRUCTIONS[fmt], "input": input_text, "output": output}


def to_text_record(rec: MCRecord, fmt: str, source: str = "") -> TextRecord:
    row = to_alpaca(rec, fmt)
    return TextRecord(id=row["id"], prompt=alpaca_prompt(row["instruction"], row["input"]), target=row["output"],
                      source=source)


def alpaca_rows(records: list, fmt: str) -> list[dict[str, str]]:
    """Alpaca rows for records of one dataset: MCRecords converted, TextRecords as their prompt and target."""
    return [to_alpaca(r, fmt) if isinstance(r, MCRecord) else
            {"id": r.id, "instruction": r.prompt, "input": "", "output": r.target} for r in records]


def _options(choices: list[str] | tuple[str, ...]) -> str:
    return "\n".join(f"- {c.strip()}" for c in choices)


def _between(text: str, prefix: str, suffix: str, rec: MCRecord) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise DataError(f"record {rec.id}: context {text!r} is not {prefix!r}...{suffix!r}")
    return text[len(prefix): len(text) - len(suffix)]


def _gold(rec: MCRecord) -> str:
    return rec.choices[rec.gold].strip()


def _arc(rec: MCRecord) -> tuple[str, str]:
    question = _between(rec.prompt, "Question: ", "\nAnswer:", rec)
    return f"Question: {question}\nOptions:\n{_options(rec.choices)}", _gold(rec)


def _openbookqa(rec: MCRecord) -> tuple[str, str]:
    return f"{rec.prompt}\nOptions:\n{_options(rec.choices)}", _gold(rec)


def _piqa(rec: MCRecord) -> tuple[str, str]:
    goal = _between(rec.prompt, "Question: ", "\nAnswer:", rec)
    return f"Goal: {goal}\nSolutions:\n{_options(rec.choices)}", _gold(rec)


def _hellaswag(rec: MCRecord) -> tuple[str, str]:
    return f"Text: {rec.prompt}\nContinuations:\n{_options(rec.choices)}", _gold(rec)


def _winogrande(rec: MCRecord) -> tuple[str, str]:
    sentence = rec.prompt
    blank = sentence.index("_")
    options = [ctx[blank:] for ctx in rec.contexts]  # each context is sentence[:blank] + option
    return f"Sentence: {sentence}\nOptions:\n{_options(options)}", options[rec.gold].strip()


def _boolq(rec: MCRecord) -> tuple[str, str]:
    body = _between(rec.prompt, "", "?\nAnswer:", rec)
    passage, sep, question = body.rpartition("\nQuestion: ")
    if not sep:
        raise DataError(f"record {rec.id}: boolq context has no '\\nQuestion: '")
    return f"Passage: {passage}\nQuestion: {question}?", _gold(rec)


_INPUTS: dict[str, Callable[[MCRecord], tuple[str, str]]] = {
    "arc": _arc,
    "openbookqa": _openbookqa,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "boolq": _boolq,
}
