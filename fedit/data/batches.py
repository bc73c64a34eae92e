"""Tokenize records, mask labels, and group examples into micro-batches.

What the loss covers. ``alpaca``: the response and EOS; prompt and response are tokenized as
one text and the prompt's tokens masked (as the paper's repository does: the tokens at the
boundary are the ones the full text gives, not a separate tokenization's). ``chat``: every
assistant turn of the conversation as the model's chat template renders it, from the end
of the template's assistant header to the end of the turn, its end-of-turn marker included
(the model learns to stop); system and user turns and the headers are masked.

Length. An example longer than ``cutoff_len`` tokens: a conversation first loses its oldest
whole exchanges (a user turn and its answer; the system turn stays), until it fits or one
exchange is left; what still does not fit is cut at the end, as an instruction row is. A turn's
header is never cut from its content except at that final cut; ``Example.dropped_turns`` and
``Example.cut`` record what was done, and ``shortening`` counts it for the reports.

An optimizer step sees ``batch_size`` examples drawn in random order, exactly as
a naive loop would; only inside a step are the examples sorted by length before
they are cut into micro-batches. A micro-batch is either right-padded to its
longest example (``collate``) or, where the attention supports it, packed into
one row with no padding at all (``pack``); either way no example ever attends
to another, and the loss reads the same targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedit.data.prompts import chat_text, check_template, record_prompt, turns
from fedit.data.records import Record, Turn
from fedit.errors import FeditError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    category: str
    dropped_turns: int = 0  # oldest turns left out to fit cutoff_len (conversations)
    cut: bool = False  # still longer than cutoff_len: cut at the end

    @property
    def trained_tokens(self) -> int:
        # Labels are shifted by one inside the loss: position 0 never counts as a target.
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def tokenize(records: list[Record], tokenizer, cutoff_len: int, train_on_inputs: bool = False,
             template: str = "alpaca") -> list[Example]:
    """Token ids and labels of each record under ``template``; see the module docstring for what
    is labelled and how an example is fitted to ``cutoff_len``."""
    check_template(template, tokenizer)
    if template == "chat":
        return [_chat_example(r, tokenizer, cutoff_len, train_on_inputs) for r in records]
    prompts = [record_prompt(r, template) for r in records]
    p_len = [len(p) for p in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    full = tokenizer([p + r.response for p, r in zip(prompts, records)], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for r, ids, n in zip(records, full, p_len):
        ids = ids + [eos]
        labels = list(ids) if train_on_inputs else [IGNORE] * n + ids[n:]
        out.append(Example(ids[:cutoff_len], labels[:cutoff_len], r.category, cut=len(ids) > cutoff_len))
    return out


def _chat_example(r: Record, tokenizer, cutoff_len: int, train_on_inputs: bool) -> Example:
    conv = turns(r)
    first = 1 if conv[0][0] == "system" else 0
    exchanges = [i for i in range(first, len(conv)) if conv[i][0] == "user"]
    for k, start in enumerate(exchanges):
        ids, labels = chat_tokens(tokenizer, conv[:first] + conv[start:], train_on_inputs)
        if len(ids) <= cutoff_len or k == len(exchanges) - 1:
            return Example(ids[:cutoff_len], labels[:cutoff_len], r.category, dropped_turns=start - first,
                           cut=len(ids) > cutoff_len)
    raise AssertionError("unreachable: a conversation has an exchange")


def chat_tokens(tokenizer, conv: tuple[Turn, ...], train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation rendered by the chat template, assistant turns labelled.

    An assistant turn's characters are found by rendering the conversation up to it twice: with
    the generation prompt (where its content starts) and with the turn (where it ends); then the
    whole text is tokenized once and a token is labelled when it starts inside such a span.
    """
    text = chat_text(tokenizer, conv)
    spans = []
    for i, (role, _) in enumerate(conv):
        if role != "assistant":
            continue
        head, upto = chat_text(tokenizer, conv[:i], True), chat_text(tokenizer, conv[:i + 1])
        if not (text.startswith(head) and text.startswith(upto) and len(upto.rstrip()) > len(head)):
            raise FeditError("this model's chat template renders a turn differently once later turns follow it, "
                             "so fedit cannot tell which tokens are the assistant's; use another model or the "
                             "'alpaca' template")
        spans.append((len(head), len(upto.rstrip())))
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise FeditError("the 'chat' template needs a fast tokenizer (offsets of the tokens in the text); "
                         "this model's tokenizer is a slow one") from None
    ids = list(enc["input_ids"])
    if train_on_inputs:
        return ids, list(ids)
    return ids, [t if any(s <= a < e for s, e in spans) else IGNORE for t, (a, _) in zip(ids, enc["offset_mapping"])]


def shortening(examples: list[Example]) -> str:
    """How many examples were fitted to cutoff_len, for the run's report ("" when none)."""
    dropped = sum(1 for e in examples if e.dropped_turns)
    cut = sum(1 for e in examples if e.cut)
    if not dropped and not cut:
        return ""
    parts = [f"{dropped} lost their oldest turns"] if dropped else []
    parts += [f"{cut} were cut at the end"] if cut else []
    return f"{' and '.join(parts)} to fit the cutoff length"


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of this micro-batch.

    ``targets[i, t]`` is the label of token t + 1 (IGNORE past the end): what position t predicts.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        targets[i, :n - 1] = torch.tensor(e.labels[1:], dtype=torch.long)
    rows = torch.arange(len(examples)).unsqueeze(1).expand(-1, width)
    return {"input_ids": ids, "targets": targets, "rows": rows}


def pack(examples: list[Example]) -> dict[str, torch.Tensor]:
    """The micro-batch's examples end to end in one row: no padding token is ever computed.

    The layout of transformers' padding-free training (DataCollatorWithFlattening): position
    ids restart at 0 in each example and ``cu_seq_lens`` marks where each one starts, so
    attention stays inside an example. Targets are shifted inside each example: no token is
    asked to predict the next example's first token.
    """
    ids, targets, positions, rows, starts = [], [], [], [], [0]
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids += e.input_ids
        targets += e.labels[1:] + [IGNORE]
        positions += range(n)
        rows += [i] * n
        starts.append(starts[-1] + n)
    return {"input_ids": torch.tensor([ids]), "targets": torch.tensor([targets]), "rows": torch.tensor([rows]),
            "position_ids": torch.tensor([positions]), "cu_seq_lens": torch.tensor(starts, dtype=torch.int32)}


def make_batch(examples: list[Example], pad_id: int, packed: bool, device: torch.device) -> dict[str, torch.Tensor]:
    batch = pack(examples) if packed else collate(examples, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def plan_steps(n: int, batch_size: int, epochs: float, max_steps: int, rng: np.random.Generator) -> list[list[int]]:
    """Example indices of each optimizer step: ``epochs`` shuffled passes, cut into batches."""
    total = math.ceil(n * epochs)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(epochs))])[:total]
    steps = [order[i:i + batch_size].tolist() for i in range(0, total, batch_size)]
    return steps[:max_steps] if max_steps else steps


def micro_batches(indices: list[int], examples: list[Example], micro_batch_size: int, max_tokens: int = 0,
                  packed: bool = True) -> list[list[int]]:
    """Cut one step's examples into micro-batches of similar length (longest first): at most
    ``micro_batch_size`` examples and, if ``max_tokens``, at most that many tokens as computed
    (their sum packed; the longest times the count padded). Activation memory follows the
    tokens of a micro-batch, so the budget bounds the peak whatever the lengths; an example
    longer than the budget goes alone."""
    ordered = sorted(indices, key=lambda i: -len(examples[i].input_ids))
    out: list[list[int]] = []
    cost = 0
    for i in ordered:
        n = len(examples[i].input_ids)
        if out and len(out[-1]) < micro_batch_size:
            # padded: every row costs the micro-batch's longest, its first example (longest first)
            add = n if packed else len(examples[out[-1][0]].input_ids)
            if not max_tokens or cost + add <= max_tokens:
                out[-1].append(i)
                cost += add
                continue
        out.append([i])
        cost = n
    return out
