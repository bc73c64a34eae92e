"""Choosing options on federated validation, never on the test split (`fedit compare --select`).

Each strategy runs once per point of a grid of its options that the user states
before any run (``--grid fedprox:strategy.proximal_mu=0.001,0.01,0.1``; several
grids of one strategy multiply). Every candidate trains on the clients' training
splits with ``eval.test = false``: the server reads no test data, and each round's
only figure is the clients' federated validation loss (fedit.evaluation.federated).
Each strategy's candidate with the lowest validation loss after its last round is
chosen, and the choice is written (selection.json) before the test split is read
at all; only then are the chosen runs (and, for the record, every candidate's final
adapter) scored on the test split.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from fedit.errors import FeditError


def parse_grids(grids: list[str], labels: list[str]) -> dict[str, list[list[str]]]:
    """``LABEL:section.key=v1,v2`` (repeatable) -> each label's candidates, as lists of overrides: the
    product of its grids; a label without a grid has one candidate, its own settings."""
    axes: dict[str, list[list[str]]] = {label: [] for label in labels}
    for text in grids:
        label, sep, rest = text.partition(":")
        key, eq, values = rest.partition("=")
        if not sep or not eq or "." not in key or not values.strip():
            raise FeditError(f"--grid {text!r} must look like STRATEGY:section.key=v1,v2,..., e.g. "
                             f"fedprox:strategy.proximal_mu=0.001,0.01,0.1")
        if label not in axes:
            raise FeditError(f"--grid {text!r}: {label!r} is not among --strategies ({', '.join(labels)})")
        if any(k.split("=", 1)[0] == key.strip() for axis in axes[label] for k in axis):
            raise FeditError(f"--grid names {label}:{key.strip()} twice; give its values in one list")
        vals = [v.strip() for v in _split_values(values)]
        if len(set(vals)) != len(vals) or not all(vals):
            raise FeditError(f"--grid {text!r}: the values must be distinct and non-empty")
        axes[label].append([f"{key.strip()}={v}" for v in vals])
    return {label: [list(c) for c in itertools.product(*a)] if a else [[]] for label, a in axes.items()}


def _split_values(text: str) -> list[str]:
    """Commas split values, except inside brackets (a list value such as [2,4])."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def candidate_name(label: str, overrides: list[str]) -> str:
    """A directory name for one candidate: its label and its grid values."""
    if not overrides:
        return label
    parts = [re.sub(r"[^A-Za-z0-9_.=-]+", "_", o.split(".", 1)[1]) for o in overrides]
    return f"{label}__" + "__".join(parts)


def choose(validation: dict[str, float]) -> str:
    """The candidate with the lowest validation loss (the first in grid order on a tie)."""
    return min(validation, key=lambda name: validation[name])


def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's τ-a between two score lists (1: the same order, −1: reversed); None below two items."""
    n = len(a)
    if n < 2:
        return None
    s = 0
    for i, j in itertools.combinations(range(n), 2):
        x, y = a[i] - a[j], b[i] - b[j]
        s += (x * y > 0) - (x * y < 0)
    return s / (n * (n - 1) / 2)


def training_union(fedit_dir: Path, amount, seed: int, out: Path) -> Path:
    """A one-client partition holding every client's training split (validation records left out): what
    Centralized trains on when the federation's clients hold validation back."""
    from fedit.data import partition
    from fedit.data.clients import ClientFiles
    from fedit.data.records import LoadResult

    if (out / "manifest.json").is_file():
        return out
    clients = ClientFiles(fedit_dir, None, 0, False, "alpaca", validation=amount, seed=seed)
    records = [r for cid in clients.ids for r in clients.records(cid)[0]]
    loaded = LoadResult(records=records, skipped=[], source=str(fedit_dir))
    partition.write(out, loaded, partition.Split(test=[], clients=[list(range(len(records)))]),
                    scheme="single (the clients' training splits)", seed=seed, alpha=0.0, test_per_category=0)
    return out
