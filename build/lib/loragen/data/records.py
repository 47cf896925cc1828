"""The one record type every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MCRecord:
    """One multiple-choice document.

    `contexts` holds one shared context, or one context per choice (winogrande's partial
    scoring). `continuations[k]` is what is scored after the context of choice k, with its
    leading target delimiter (" "). `choices[k]` is the choice text itself, whose length in
    characters normalises acc_norm. `prompt` is the unlabeled question (the generator's input).
    """

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int
    prompt: str

    def context(self, k: int) -> str:
        return self.contexts[k] if len(self.contexts) > 1 else self.contexts[0]

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice: the log-likelihood requests of this document."""
        return [(self.context(k), c) for k, c in enumerate(self.continuations)]

    @property
    def num_choices(self) -> int:
        return len(self.continuations)


@dataclass(frozen=True)
class TextRecord:
    """One prompt -> text document (instruction data, captions).

    `prompt` is the user's message as it would be typed: Alpaca's instruction, then a blank line
    and its input when there is one; `target` the reference output. `source` names the file and
    line it came from, for error messages. How the prompt is wrapped for a model (chat template
    or a plain template) is decided by loragen.models.chat.render_prompt, not here.
    """

    id: str
    prompt: str
    target: str
    source: str = ""

    @property
    def num_choices(self) -> int:  # not multiple choice
        return 0
