"""How the accepted client changes of a round are combined into one pseudo-gradient Δ̄.

The server optimisers (fedit/strategies) then step on Δ̄; the aggregator decides
how much one client can move it.

- ``mean``: Σ p_k Δ_k with p_k proportional to the examples each client trained on (the paper's
  FedAvg weighting). Streams: one float64 accumulator. One client can move it arbitrarily far.
- ``median``: the coordinate-wise median of the Δ_k (Yin et al., ICML 2018); for an even number of
  clients, the mean of the two middle values.
- ``trimmed_mean``: per coordinate, drop the ⌊β·K⌋ largest and smallest values and average the rest
  (Yin et al., ICML 2018), β = ``trim_fraction``.
- ``krum`` / ``multikrum`` (Blanchard et al., NeurIPS 2017): each client's score is the sum of squared
  distances to its K − f − 2 nearest neighbours (f = ``byzantine_clients``); Krum takes the
  lowest-scoring client's Δ, Multi-Krum the mean of the K − f lowest.

The robust ones weight every client equally: a median or a Krum choice weighted by the example
counts clients report would let one client that claims many examples decide the result, which
is what they exist to prevent. They need every update of the round at once (the round loop holds
the round's K updates: K adapters in memory instead of one).

``max_update_norm`` (Sun et al., 2019, "Can You Really Backdoor Federated Learning?") bounds each
client's change to an L2 ball over all its tensors before any aggregator sees it.
"""

from __future__ import annotations

import math

import torch

Arrays = dict[str, torch.Tensor]
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum")


def clip_norm(delta: Arrays, bound: float) -> tuple[Arrays, float]:
    """(delta scaled into the L2 ball of radius ``bound`` over all its tensors, its norm before)."""
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))
    if bound <= 0 or norm <= bound:
        return delta, norm
    scale = bound / norm
    return {k: v * scale for k, v in delta.items()}, norm


class Aggregator:
    """Collects the round's deltas (float64) with their example counts; ``result`` is Δ̄ or None if none came."""

    def __init__(self, kind: str = "mean", trim_fraction: float = 0.1, byzantine_clients: int = 0):
        if kind not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {kind!r}")
        self.kind, self.trim_fraction, self.f = kind, trim_fraction, byzantine_clients
        self.acc: Arrays = {}
        self.total = 0
        self.deltas: list[Arrays] = []
        self.kept: list[int] | None = None  # Krum: the indices (in order of ``add``) whose mean is the result

    @property
    def streaming(self) -> bool:
        return self.kind == "mean"

    def add(self, delta: Arrays, num_examples: int) -> None:
        if self.streaming:
            for k, v in delta.items():
                if k not in self.acc:
                    self.acc[k] = torch.zeros_like(v, dtype=torch.float64)
                self.acc[k].add_(v, alpha=num_examples)
            self.total += num_examples
        else:
            self.deltas.append(delta)

    def add_sum(self, total: Arrays, count: int, unclipped: float | None = None) -> None:
        """``count`` changes already added up (secure aggregation), each with weight 1."""
        if not self.streaming:
            raise ValueError(f"aggregator {self.kind!r} needs every change, not their sum")
        for k, v in total.items():
            if k not in self.acc:
                self.acc[k] = torch.zeros_like(v, dtype=torch.float64)
            self.acc[k].add_(v)
        self.total += count

    def result(self) -> Arrays | None:
        if self.streaming:
            return {k: v / self.total for k, v in self.acc.items()} if self.total else None
        if not self.deltas:
            return None
        if self.kind == "median":
            return {k: median(torch.stack([d[k] for d in self.deltas])) for k in self.deltas[0]}
        if self.kind == "trimmed_mean":
            return {k: trimmed_mean(torch.stack([d[k] for d in self.deltas]), self.trim_fraction)
                    for k in self.deltas[0]}
        self.kept = krum_choice(self.deltas, self.f, multi=self.kind == "multikrum")
        return {k: torch.stack([self.deltas[i][k] for i in self.kept]).mean(0) for k in self.deltas[0]}


def median(x: torch.Tensor) -> torch.Tensor:
    """Median over the first dimension; the mean of the two middle values when it is even."""
    s = x.sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over the first dimension of what is left after dropping ⌊β·n⌋ values at each end
    (at most (n − 1) // 2, so one value always remains)."""
    n = x.shape[0]
    k = min(int(math.floor(beta * n)), (n - 1) // 2)
    return x.sort(dim=0).values[k:n - k].mean(0)


def krum_choice(deltas: list[Arrays], f: int, multi: bool) -> list[int]:
    """Indices Krum (one) or Multi-Krum (n − f) selects: lowest sums of squared distances to the
    n − f − 2 nearest other updates (at least one neighbour when the round is too small for that)."""
    n = len(deltas)
    d2 = torch.zeros(n, n, dtype=torch.float64)
    for k in deltas[0]:
        flat = torch.stack([d[k].reshape(-1) for d in deltas])
        d2 += torch.cdist(flat, flat).pow(2)
    neighbours = max(1, n - f - 2)
    scores = []
    for i in range(n):
        others = torch.cat([d2[i, :i], d2[i, i + 1:]])
        scores.append(float(others.sort().values[:neighbours].sum()) if n > 1 else 0.0)
    order = sorted(range(n), key=lambda i: (scores[i], i))
    return order[:max(1, n - f)] if multi else order[:1]
