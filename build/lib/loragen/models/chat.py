"""How a prompt reaches a model: its tokenizer's chat template, or a plain template.

One function for training (SFT) and generation, so an adapter is trained on exactly the text it
is later asked with.
"""

from __future__ import annotations

from loragen.errors import ConfigError

# Used when a causal model has no chat template (or chat_template=false): Alpaca's layout.
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str, *, kind: str, chat_template: bool | str = "auto",
                  system: str | None = None) -> str:
    """The text fed to the model before its answer.

    kind: causal | seq2seq. Seq2seq models (T5) take the prompt as is, as FLAN was trained.
    chat_template: "auto" applies the tokenizer's template when it has one; true requires one;
    false always uses PLAIN_TEMPLATE.
    """
    if kind == "seq2seq":
        return prompt if system is None else f"{system}\n\n{prompt}"
    use = has_chat_template(tokenizer) if chat_template == "auto" else bool(chat_template)
    if use:
        if not has_chat_template(tokenizer):
            raise ConfigError("chat_template=true but the model's tokenizer has no chat template (use auto or false)")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _without_duplicate_bos(tokenizer, text)
    text = PLAIN_TEMPLATE.format(prompt=prompt)
    return text if system is None else f"{system}\n\n{text}"


def _without_duplicate_bos(tokenizer, text: str) -> str:
    """Drop a leading BOS written by the chat template when tokenizing adds one anyway (Llama-3, Gemma):
    otherwise every prompt would start with two BOS tokens, in training and in generation alike."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not text.startswith(bos):
        return text
    ids = tokenizer("x")["input_ids"]
    return text[len(bos):] if ids and ids[0] == tokenizer.bos_token_id else text
