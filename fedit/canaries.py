"""Measured leakage: secret-sharer canaries (Carlini et al. 2019, "The Secret Sharer").

A canary is a random secret of a fixed format ("my PIN is 4 8 2 9 1 7"), inserted ``repeats``
times into one client's data as the answer to one question. After training, each inserted
secret is ranked among ``references`` secrets of the same format that were never inserted,
by the model's loss on the secret (its log-perplexity, summed over the secret's tokens) as the
answer to the same question. Its exposure is log2(R + 1) − log2(rank) with R references
(Carlini et al.'s estimate from a sample of the secret space): log2(R + 1) when the model ranks
it first (memorised), about 1.44 bits on average when its rank is uniform (not memorised).

For experiments in the in-process simulation (``[canary]``): the run's summary and
``canary.json`` give each inserted secret's rank and exposure on the final adapter.
"""

from __future__ import annotations

import math

import numpy as np

from fedit.data.records import Record

QUESTION = "What is my PIN?"
CATEGORY = "canary"


def secrets_of(seed: int, count: int, references: int, digits: int = 6) -> tuple[list[str], list[str]]:
    """(inserted, references): distinct random secrets of one format, seeded (the experimenter's, not the model's)."""
    rng = np.random.default_rng([seed, 0xCA4A])
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count + references:
        s = "my PIN is " + " ".join(str(d) for d in rng.integers(0, 10, digits))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out[:count], out[count:]


def insert(records: list[Record], inserted: list[str], repeats: int) -> list[Record]:
    """The client's records, then each secret ``repeats`` times (training shuffles the order)."""
    return records + [Record(QUESTION, "", s, CATEGORY) for s in inserted for _ in range(repeats)]


def exposure(loaded, adapter, inserted: list[str], references: list[str], template: str, cutoff_len: int,
             batch_size: int = 8) -> dict:
    """Rank and exposure of each inserted secret among the references, under ``adapter``."""
    from fedit.data.batches import tokenize
    from fedit.evaluation.heldout import heldout_loss

    recs = [Record(QUESTION, "", s, CATEGORY) for s in inserted + references]
    examples = tokenize(recs, loaded.tokenizer, cutoff_len, template=template)
    sums = [s for s, _ in heldout_loss(loaded, examples, adapter, batch_size)["examples"]]
    ref = sorted(sums[len(inserted):])
    rows = []
    for secret, s in zip(inserted, sums):
        rank = 1 + sum(1 for r in ref if r < s)
        rows.append({"secret": secret, "log_perplexity": s, "rank": rank,
                     "exposure": math.log2(len(ref) + 1) - math.log2(rank)})
    return {"references": len(ref), "max_exposure": math.log2(len(ref) + 1), "canaries": rows,
            "mean_exposure": sum(r["exposure"] for r in rows) / len(rows)}
