"""Federated evaluation: the clients score the global adapter on their own validation splits.

A server that holds no data still has to see whether a round helped, pick a round
(run.keep_best), stop (federation.early_stop_patience) and compare options (fedit
compare --select). Each evaluation round the server sends the global adapter to the
clients ``eval.clients`` names; each replies, for its validation split
(data.client_validation), with the summed loss, the labelled tokens and the examples
per category, and nothing else (fedit.protocol.Evaluation). The server then forms

- the token-weighted loss overall and per category: Σ_k loss_sum_k / Σ_k tokens_k, exactly the
  loss of one model scored on the union of the splits;
- each client's own loss L_k = loss_sum_k / tokens_k, and their spread over clients: min, median,
  max, and the worst tenth (the mean L_k of the ⌈K/10⌉ clients with the highest loss: the sites
  the federation serves worst).

Replies cross the trust boundary like training replies: ``check`` gives the reason a reply is
left out (non-finite or negative sums, counts that are not whole numbers, more examples than the
client's split holds, more tokens than its examples can have), and a left-out client is logged.
What the server learns from a reply is in the clear, also under secure aggregation and
differential privacy: a client's validation loss per category (docs/federated-evaluation.md says so).
"""

from __future__ import annotations

import math
from statistics import median

import numpy as np

from fedit.data.batches import Example
from fedit.fields import amount_of
from fedit.protocol import Evaluation

MAX_CATEGORIES = 1000  # a reply naming more categories than this is not a validation split's report
MAX_NAME = 200  # characters of a category name


def category_sums(examples: list[Example], per_example: list[list]) -> dict[str, list]:
    """{category: [loss sum, labelled tokens, examples]} from heldout_loss's per-example [sum, tokens]."""
    out: dict[str, list] = {}
    for e, (s, n) in zip(examples, per_example):
        acc = out.setdefault(e.category, [0.0, 0, 0])
        acc[0] += s
        acc[1] += n
        acc[2] += 1
    return out


def select(client_ids: list[int], amount, seed: int, round_num: int) -> list[int]:
    """The clients asked to evaluate this round: all, or a seeded draw of ``amount`` (eval.clients)."""
    k = amount_of(amount, len(client_ids))
    if k >= len(client_ids):
        return sorted(client_ids)
    rng = np.random.default_rng([seed, round_num, 0x6576])  # "ev": apart from training's selection
    return sorted(rng.choice(client_ids, size=k, replace=False).tolist())


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check(e: Evaluation, max_examples: int | None, max_tokens_per_example: int) -> str | None:
    """Why an evaluation reply must be left out, or None. Anything a client sends gives a reason, never an error."""
    if not _whole(e.examples) or e.examples < 0:
        return f"examples = {e.examples!r:.40}, expected a whole number >= 0"
    if max_examples is not None and e.examples > max_examples:
        return f"examples = {e.examples} is more than this client's validation split holds ({max_examples})"
    if not isinstance(e.by_category, dict) or len(e.by_category) > MAX_CATEGORIES:
        return "by_category is not a table of at most 1000 categories"
    counted = 0
    for name, v in e.by_category.items():
        if not isinstance(name, str) or len(name) > MAX_NAME:
            return f"category {name!r:.60} is not a name of at most {MAX_NAME} characters"
        if not isinstance(v, (list, tuple)) or len(v) != 3:
            return f"category {name!r}: expected [loss sum, tokens, examples], got {v!r:.60}"
        s, tokens, n = v
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            return f"category {name!r}: loss sum {s!r:.40} is not a finite number >= 0"
        if not _whole(tokens) or not _whole(n) or tokens < 0 or n < 0:
            return f"category {name!r}: tokens {tokens!r:.40} and examples {n!r:.40} must be whole numbers >= 0"
        if tokens > n * max_tokens_per_example:
            return f"category {name!r}: {tokens} tokens from {n} examples of at most {max_tokens_per_example} tokens"
        if tokens == 0 and s > 0:
            return f"category {name!r}: a loss sum of {s:g} over no tokens"
        counted += n
    if counted != e.examples:
        return f"the categories count {counted} examples, the reply {e.examples}"
    return None


def combine(evaluations: list[Evaluation], source: str = "validation (federated)") -> dict | None:
    """The round's figures from the accepted replies (see the module docstring); None if no tokens were scored."""
    sums: dict[str, list] = {}
    per_client: dict[str, dict] = {}
    for e in evaluations:
        for c, (s, n, x) in e.by_category.items():
            acc = sums.setdefault(c, [0.0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + s, acc[1] + n, acc[2] + x
        if e.tokens:
            per_client[str(e.client_id)] = {"loss": e.loss_sum / e.tokens, "tokens": e.tokens,
                                            "examples": e.examples}
    tokens = sum(n for _, n, _ in sums.values())
    if not tokens:
        return None
    losses = sorted(p["loss"] for p in per_client.values())
    worst = losses[-math.ceil(len(losses) / 10):]
    loss = sum(s for s, _, _ in sums.values()) / tokens
    return {"source": source, "loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens,
            "examples": sum(x for _, _, x in sums.values()), "clients": len(per_client),
            "by_category": {c: s / n for c, (s, n, _) in sorted(sums.items()) if n},
            "spread": {"min": losses[0], "median": median(losses), "max": losses[-1],
                       "worst_tenth": sum(worst) / len(worst)},
            "per_client": per_client}


def label(figures: dict) -> str:
    """Where a figure came from, as every output names it."""
    return f"validation (federated, {figures['clients']} clients)" if "clients" in figures else "test"
