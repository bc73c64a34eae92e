"""Tokenize records, mask labels, and group examples into micro-batches.

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

from fedit.data.prompts import record_prompt
from fedit.data.records import Record

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    category: str

    @property
    def trained_tokens(self) -> int:
        # Labels are shifted by one inside the loss: position 0 never counts as a target.
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def tokenize(records: list[Record], tokenizer, cutoff_len: int, train_on_inputs: bool = False,
             template: str = "alpaca") -> list[Example]:
    """prompt + response + EOS, truncated to ``cutoff_len``; prompt labels masked unless ``train_on_inputs``."""
    prompts = [record_prompt(r, template, tokenizer) for r in records]
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    r_ids = tokenizer([r.response for r in records], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for r, p, a in zip(records, p_ids, r_ids):
        ids = (p + a + [eos])[:cutoff_len]
        labels = list(ids) if train_on_inputs else ([IGNORE] * len(p) + a + [eos])[:cutoff_len]
        out.append(Example(ids, labels, r.category))
    return out


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
