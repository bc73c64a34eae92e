"""Prompt templates: the FedIT paper repo's Alpaca template, or the model's own chat template.

``alpaca`` is single-turn: an instruction, an optional input, a response. ``chat`` renders
the record as messages through ``tokenizer.apply_chat_template`` (an instruction row is one
user turn, its input appended, and one assistant turn), so multi-turn conversations train
and are asked exactly as the model's template lays them out.
"""

from __future__ import annotations

from typing import Sequence

from fedit.data.records import Record, Turn, conversation
from fedit.errors import FeditError

# templates/alpaca.json of the paper's repository (itself from alpaca-lora).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


def check_template(template: str, tokenizer=None) -> None:
    if template not in TEMPLATES:
        raise FeditError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise FeditError("the 'chat' template needs a model whose tokenizer has a chat template, and this one has "
                         "none; use the 'alpaca' template (single-turn instruction data) or an instruct model")


def chat_text(tokenizer, turns: Sequence[Turn], generation_prompt: bool = False) -> str:
    """``turns`` rendered by the model's chat template; with ``generation_prompt`` the header
    of the assistant turn that comes next, as generation sees it."""
    check_template("chat", tokenizer)
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def turns(r: Record) -> tuple[Turn, ...]:
    """A record as conversation turns: its own, or an instruction row as one exchange."""
    return r.messages or conversation(r.instruction, r.context, r.response)


def prompt(instruction: str, context: str = "", template: str = "alpaca", tokenizer=None) -> str:
    """The text the model sees before its answer to one instruction."""
    return record_prompt(Record(instruction, context, "", ""), template, tokenizer)


def record_prompt(r: Record, template: str = "alpaca", tokenizer=None) -> str:
    """The text before the record's (last) answer: what generation is given."""
    check_template(template, tokenizer)
    if template == "chat":
        return chat_text(tokenizer, turns(r)[:-1], generation_prompt=True)
    if r.is_conversation:
        raise FeditError("conversation records need the model's chat template: set data.template = \"chat\" "
                         "(the alpaca template has no turns)")
    if r.context:
        return ALPACA_WITH_INPUT.format(instruction=r.instruction, input=r.context)
    return ALPACA_NO_INPUT.format(instruction=r.instruction)
