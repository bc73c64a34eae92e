"""Held-out loss of an adapter on test examples, overall and per category.

Uses the training loss and masking (fedit.loss), averaged over tokens: the
overall figure is the mean over every labelled token, a category's figure the
mean over that category's tokens. ``examples`` keeps each example's loss sum
and token count (in the order given), so a comparison can resample examples
for a confidence interval (fedit compare).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from fedit.data.batches import Example, make_batch, micro_batches
from fedit.token_loss import token_losses
from fedit.adapter import Adapter, set_adapter
from fedit.model import Loaded


@torch.no_grad()
def heldout_loss(loaded: Loaded, examples: list[Example], adapter: Adapter | None = None,
                 batch_size: int = 8, max_tokens: int = 0) -> dict:
    """``batch_size`` examples and, if ``max_tokens``, at most that many tokens per forward pass
    (train.micro_batch_tokens: the LM head's fp32 logits make memory grow with the tokens)."""
    model = loaded.model
    if adapter is not None:
        set_adapter(model, adapter)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    per_example: list[list] = [[0.0, 0]] * len(examples)
    # Longest first keeps padding low and the peak memory at the start.
    for idx in micro_batches(list(range(len(examples))), examples, batch_size, max_tokens, loaded.packed):
        chunk = [examples[i] for i in idx]
        batch = make_batch(chunk, loaded.tokenizer.pad_token_id, loaded.packed, loaded.device)
        with loaded.autocast():
            losses, rows = token_losses(model, batch, loaded.own_logits)
        per_row = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows.cpu(), losses.double().cpu())
        n_row = torch.bincount(rows.cpu(), minlength=len(chunk))
        for i, e, s, n in zip(idx, chunk, per_row.tolist(), n_row.tolist()):
            sums[e.category] += s
            counts[e.category] += n
            per_example[i] = [round(s, 6), n]
    model.train(was_training)
    total = sum(counts.values())
    by_cat = {c: sums[c] / counts[c] for c in sorted(counts) if counts[c]}
    loss = sum(sums.values()) / total if total else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total, "by_category": by_cat,
            "examples": per_example}
