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

A robust aggregator never quietly becomes the mean: ``defence_problems`` refuses a setting that
tolerates no bad client at the round's size (Krum with f = 0, a trim that drops nothing, a median of
two), and ``tolerance`` says in one sentence what the chosen combination tolerates; the run prints it
before round 1.

The robust ones weight every client equally: a median or a Krum choice weighted by the example
counts clients report would let one client that claims many examples decide the result, which
is what they exist to prevent. They need every update of the round at once (the round loop holds
the round's K updates: K adapters in memory instead of one).

``max_update_norm`` (Sun et al., 2019, "Can You Really Backdoor Federated Learning?") bounds each
client's change to an L2 ball over all its tensors before any aggregator sees it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from fedit.errors import FeditError

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


def share_of(share: float, n: int) -> int:
    """⌊share·n⌋ for the decimal share the user wrote: 0.29 of 100 is 29, where the float product
    0.29 * 100 = 28.999999999999996 would drop one client too few."""
    return math.floor(Fraction(repr(float(share))) * n)


def trimmed_mean(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over the first dimension of what is left after dropping ⌊β·n⌋ values at each end
    (at most (n − 1) // 2, so one value always remains)."""
    n = x.shape[0]
    k = min(share_of(beta, n), (n - 1) // 2)
    return x.sort(dim=0).values[k:n - k].mean(0)


def krum_choice(deltas: list[Arrays], f: int, multi: bool) -> list[int]:
    """Indices Krum (one) or Multi-Krum (n − f) selects: lowest sums of squared distances to the
    n − f − 2 nearest other updates (at least one neighbour when the round is too small for that)."""
    n = len(deltas)
    d2 = torch.zeros(n, n, dtype=torch.float64)
    for k in deltas[0]:
        flat = torch.stack([d[k].reshape(-1) for d in deltas])
        # the exact path: the matmul one (‖x‖² + ‖y‖² − 2x·y, torch's choice above 25 rows) cancels
        # catastrophically for near-identical large-norm changes and can pick the wrong client
        d2 += torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    neighbours = max(1, n - f - 2)
    scores = []
    for i in range(n):
        others = torch.cat([d2[i, :i], d2[i, i + 1:]])
        scores.append(float(others.sort().values[:neighbours].sum()) if n > 1 else 0.0)
    order = sorted(range(n), key=lambda i: (scores[i], i))
    return order[:max(1, n - f)] if multi else order[:1]


# ---------------------------------------------------------------- what a defence tolerates

ROBUST = ("median", "trimmed_mean", "krum", "multikrum")


def round_size(fed, registered: int) -> int:
    """Clients asked per round: federation.fraction of the ``registered`` ones (at least 1), else
    clients_per_round (the round loop's rule, fedit/server.py)."""
    return max(1, round(fed.fraction * registered)) if fed.fraction > 0 else fed.clients_per_round


def _lowest_share(k: int) -> str:
    """The smallest share (3 decimals, rounded up) of which ⌊share·k⌋ is 1."""
    return f"{math.ceil(1000 / k) / 1000:g}"


def defence_problems(fed, k: int | None) -> list[str]:
    """Why ``fed``'s robust aggregator would tolerate no bad client in a round of ``k`` clients (it would
    be the mean, or one client's choice, in disguise), each with its fix; [] when it holds. ``k`` None:
    the round's size is not known yet, and only what fails at every size is checked."""
    kind, a = fed.aggregator, fed.assumed_bad_fraction
    if k is None:
        if kind in ("krum", "multikrum") and fed.byzantine_clients < 1:
            return [f"federation.aggregator = \"{kind}\" with federation.byzantine_clients = 0 "
                    + ("keeps every client: it is the mean" if kind == "multikrum"
                       else "promises to tolerate no bad client")
                    + "; set federation.byzantine_clients = f >= 1, the bad clients per round it must tolerate "
                      "(clients per round must exceed 2f + 2)"]
        return []
    if kind == "median" and k < 3:
        return [f"federation.aggregator = \"median\" with {k} client(s) per round: the median of {k} is their mean "
                f"and tolerates no bad client; use at least 3 clients per round (it then tolerates fewer than half)"]
    if kind == "trimmed_mean":
        key = "assumed_bad_fraction" if a else "trim_fraction"
        if k < 3:
            return [f"federation.aggregator = \"trimmed_mean\" with {k} client(s) per round drops no value at either "
                    f"end (the trim is below half): it is the mean; use at least 3 clients per round"]
        if share_of(fed.trim_fraction, k) < 1:
            return [f"federation.aggregator = \"trimmed_mean\" with federation.{key} = {fed.trim_fraction:g} drops "
                    f"⌊{fed.trim_fraction:g} × {k}⌋ = 0 values at each end of a round of {k} clients: it is the mean; "
                    f"set federation.{key} >= {_lowest_share(k)} (then it drops 1 at each end and tolerates 1 bad "
                    f"client per round), or use more clients per round"]
    if kind in ("krum", "multikrum"):
        f, most = fed.byzantine_clients, (k - 3) // 2  # Blanchard et al. need k > 2f + 2
        what = "keeps every client: it is the mean" if kind == "multikrum" else "promises to tolerate no bad client"
        room = (f"at most {most} with {k} clients per round" if most >= 1 else
                f"a round then needs at least 5 clients; it has {k}")
        if f < 1 and a:
            return [f"federation.aggregator = \"{kind}\" with federation.assumed_bad_fraction = {a:g} of {k} clients "
                    f"per round assumes ⌊{a:g} × {k}⌋ = 0 bad clients, and with f = 0 it {what}; raise it to at "
                    f"least {_lowest_share(k)} ({room}), or use more clients per round"]
        if f < 1:
            return [f"federation.aggregator = \"{kind}\" with federation.byzantine_clients = 0 {what}; set "
                    f"federation.byzantine_clients = f >= 1, the bad clients per round it must tolerate ({room}), "
                    f"or federation.assumed_bad_fraction (e.g. 0.2)"]
        if k <= 2 * f + 2:
            return [f"federation.aggregator = \"{kind}\" tolerates byzantine_clients = {f} only with more than "
                    f"{2 * f + 2} clients per round (Blanchard et al.); a round has {k}: "
                    + (f"lower f to {most} or " if most >= 1 else "")
                    + f"raise the clients per round (federation.clients_per_round or fraction) to {2 * f + 3}"]
    return []


def tolerance(cfg, k: int) -> str:
    """One sentence: how many bad clients per round the run's combination of changes tolerates with ``k``
    clients per round, or what little it bounds. Raises FeditError for a degenerate robust setting."""
    fed = cfg.federation
    problems = defence_problems(fed, k)
    if problems:
        raise FeditError("\n".join(problems))
    if cfg.privacy.enabled:
        p = cfg.privacy
        return (f"defence: clipping only (privacy.enabled: each change clipped to norm {p.clipping_norm:g}"
                f"{' at first, then adapted' if p.adaptive else ''} and the sum divided by {k}: a bad client moves "
                f"the aggregate by at most that norm / {k} before the noise; it outvotes no one)")
    if fed.aggregator == "mean":
        if fed.max_update_norm:
            return (f"defence: norm bound only (each change clipped to norm {fed.max_update_norm:g} before the "
                    f"example-weighted mean: a bad client moves the aggregate by at most its example share × "
                    f"{fed.max_update_norm:g}; it outvotes no one)")
        if cfg.secagg.enabled:
            c = cfg.secagg.clipping_range
            return (f"defence: none (the mean under secure aggregation: each value of a change is clipped to "
                    f"[-{c:g}, {c:g}], so a bad client's part of each aggregated value is at most {c:g} / {k})")
        return (f"defence: none (the mean: one client can move the aggregate arbitrarily far, within "
                f"federation.max_value = {fed.max_value:g} per value)")
    clip = f", each change first clipped to norm {fed.max_update_norm:g}" if fed.max_update_norm else ""
    stated = f" (from federation.assumed_bad_fraction = {fed.assumed_bad_fraction:g})" if fed.assumed_bad_fraction \
        and fed.aggregator != "median" else ""
    if fed.aggregator == "median":
        return f"defence: median tolerates up to {(k - 1) // 2} bad clients of {k} per round (fewer than half){clip}"
    if fed.aggregator == "trimmed_mean":
        b = share_of(fed.trim_fraction, k)
        return (f"defence: trimmed_mean with trim {fed.trim_fraction:g}{stated} drops {b} value(s) at each end: "
                f"tolerates up to {b} bad clients of {k} per round{clip}")
    f = fed.byzantine_clients
    return f"defence: {fed.aggregator} with f = {f}{stated} tolerates up to {f} bad clients of {k} per round{clip}"
