"""Prompt templates: the FedIT paper repo's Alpaca template, or the model's own chat template."""

from __future__ import annotations

from fedit.data.records import Record

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


def prompt(instruction: str, context: str = "", template: str = "alpaca", tokenizer=None) -> str:
    """The text the model sees before its answer."""
    if template == "alpaca":
        if context:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=context)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("the 'chat' template needs a tokenizer with a chat template")
        user = f"{instruction}\n\n{context}" if context else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def record_prompt(r: Record, template: str = "alpaca", tokenizer=None) -> str:
    return prompt(r.instruction, r.context, template, tokenizer)
