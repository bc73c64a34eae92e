"""The Strategy protocol: what the round loop asks of a federated algorithm.

A strategy has
- ``Options``: a frozen dataclass of its settings, filled from the config's ``[strategy]`` table
  (an unknown key is a config error that lists the ones it has);
- ``select``: the round's clients (seeded by (seed, round) alone, so resume picks alike);
- ``configure``: the FitIns of one selected client (the global adapter, and whatever else the
  algorithm sends);
- ``aggregate``: the accepted updates of the round -> the next global adapter. Updates arrive
  as an iterator: in the in-process simulation each client trains only when the strategy asks
  for the next one, so a streaming strategy holds one client adapter at a time;
- ``state_dict`` / ``load_state_dict``: every tensor it keeps between rounds, saved with each
  completed round and restored by ``--resume`` (values derived from the data, such as FedAdam's
  tau, included, so a resumed run uses the same ones);
- ``derived``: those derived values by name, for the run's records;
- ``client_algorithm``: the class of its hooks inside the client loop (fedit.protocol).

``ServerOptimizer`` is the shared base of the algorithms that work on the pseudo-gradient
Δ̄ = Σ p_k (θ_k − θ), p_k proportional to the examples client k trained on this round: it
streams Δ̄ in float64 and leaves one method, ``step``, to each algorithm.

To add a strategy: one file in this package with one class (``name``, ``Options``, a module
docstring citing its paper and saying what it needs from clients), registered in
``fedit/strategies/__init__.py``; tests with expectations worked out by hand and one test that
its degenerate setting is bit-identical to fedavg (tests/test_strategies.py).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Iterable

import numpy as np
import torch

from fedit.aggregators import Aggregator, clip_norm
from fedit.protocol import ADAPTER, GLOBAL, STATE_ROUND, Arrays, ClientAlgorithm, FitIns, Summed, Update


COVER_STREAM = 0xC0FE  # keeps the covering permutations apart from every other draw seeded by federation.seed


def cover(round_num: int, client_ids: list[int], k: int, seed: int) -> list[int]:
    """``federation.selection = "cover"``: round r takes the next ``k`` clients of the sequence
    perm_0 + perm_1 + ..., each perm_p a permutation of the clients seeded by (seed, p), so every client
    is drawn once before any is drawn twice (with 20 clients and 4 per round, rounds 1-5 draw each client
    exactly once). A block that spans two permutations and would hold a client twice takes the next
    distinct client instead. Seeded by (seed, round) alone, as ``Strategy.select``, so resume picks alike."""
    ids = sorted(client_ids)
    n, k = len(ids), min(k, len(ids))
    picked: list[int] = []
    i = (round_num - 1) * k
    while len(picked) < k:  # at most two permutations are read
        perm = np.random.default_rng([seed, COVER_STREAM, i // n]).permutation(n)
        for j in perm[i % n:]:
            if len(picked) < k and ids[j] not in picked:
                picked.append(ids[j])
        i = (i // n + 1) * n
    return sorted(picked)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    pass


class Strategy:
    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    client_algorithm: ClassVar[type[ClientAlgorithm]] = ClientAlgorithm
    reply_groups: ClassVar[tuple[str, ...]] = (ADAPTER,)  # array groups a client must send back

    def __init__(self, options=None, num_clients: int = 1, aggregator: str = "mean", trim_fraction: float = 0.1,
                 byzantine_clients: int = 0, max_update_norm: float = 0.0):
        self.options = options if options is not None else self.Options()
        self.num_clients = num_clients  # registered clients (SCAFFOLD's N)
        # How client changes are combined (fedit/aggregators.py), and the L2 bound on each one (0: none).
        self.aggregator = dict(kind=aggregator, trim_fraction=trim_fraction, byzantine_clients=byzantine_clients)
        self.max_update_norm = max_update_norm
        self.privacy = None  # a fedit.privacy.ClientDP when privacy.enabled: it then combines the changes
        self.kept_clients: list[int] | None = None  # after aggregate: the clients Krum kept (None: all used)

    def select(self, round_num: int, client_ids: list[int], k: int, seed: int) -> list[int]:
        """Pick ``k`` distinct clients uniformly at random; seeded by (seed, round) alone so resume picks alike."""
        rng = np.random.default_rng([seed, round_num])
        return sorted(rng.choice(client_ids, size=min(k, len(client_ids)), replace=False).tolist())

    def configure(self, round_num: int, client_id: int, global_adapter: Arrays, state_round: int) -> FitIns:
        """What one selected client gets this round; ``state_round`` says which of its saved states to use."""
        return FitIns(round_num, client_id, {GLOBAL: global_adapter}, {STATE_ROUND: state_round})

    def aggregate(self, round_num: int, global_adapter: Arrays, updates: Iterable[Update]) -> tuple[Arrays, int]:
        """(next global adapter, number of updates used)."""
        raise NotImplementedError

    def derived(self) -> dict[str, float]:
        """Settings the strategy set from the data instead of taking them from its options (FedAdam's tau
        and eta after round 1): for the run's records; {} for none."""
        return {}

    def state_dict(self) -> Arrays:
        return {}

    def load_state_dict(self, state: Arrays) -> None:
        if state:
            raise ValueError(f"strategy {self.name} keeps no state, got {sorted(state)[:3]}")


class ServerOptimizer(Strategy):
    """Δ̄ from the client changes θ_k − θ (in float64; by default Σ p_k (θ_k − θ) with p_k = n_k / Σ n,
    streamed; a robust aggregator or a norm bound if configured); ``step`` makes θ from θ and Δ̄."""

    def aggregate(self, round_num: int, global_adapter: Arrays,
                  updates: Iterable[Update | Summed]) -> tuple[Arrays, int]:
        base = {k: v.to(torch.float64) for k, v in global_adapter.items()}
        combine = self.privacy.combiner(base) if self.privacy else Aggregator(**self.aggregator)
        used, ids = 0, []
        for u in updates:
            if isinstance(u, Summed):  # secure aggregation: the contributors' changes, already added up
                combine.add_sum({k: v.to(torch.float64) for k, v in u.adapter.items()}, len(u.clients), u.unclipped)
                used += len(u.clients)
                continue
            delta = {k: v.to(torch.float64) - base[k] for k, v in u.adapter.items()}
            if self.max_update_norm:
                delta, _ = clip_norm(delta, self.max_update_norm)
            combine.add(delta, u.num_examples)
            self.observe(u)
            used += 1
            ids.append(u.client_id)
        delta = combine.result()
        kept = getattr(combine, "kept", None)
        self.kept_clients = None if kept is None else sorted(ids[i] for i in kept)
        if delta is None:
            return global_adapter, 0
        new = self.step(base, delta)
        return {k: v.to(global_adapter[k].dtype) for k, v in new.items()}, used

    def observe(self, update: Update) -> None:
        """Sees each accepted update as it streams past (SCAFFOLD sums its control deltas here)."""

    def step(self, theta: Arrays, delta: Arrays) -> Arrays:
        """The next global adapter (float64) from the current one and the pseudo-gradient (both float64)."""
        raise NotImplementedError


def prefixed(prefix: str, arrays: Arrays) -> Arrays:
    return {f"{prefix}/{k}": v for k, v in arrays.items()}


def unprefixed(prefix: str, state: Arrays) -> Arrays:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + "/")}
