"""The Strategy protocol: what the round loop asks of an aggregation algorithm.

A strategy picks the round's clients (``configure_round``) and turns the
accepted client updates into the next global adapter (``aggregate``). Updates
arrive as an iterator: in the in-process simulation each is trained only when
the strategy asks for the next one, so a streaming strategy holds one client
adapter and one accumulator at a time, whatever the number of clients.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from fedit.client import Update
from fedit.model import Adapter


class Strategy:
    name = "base"

    def configure_round(self, round_num: int, client_ids: list[int], k: int, seed: int) -> list[int]:
        """Pick ``k`` distinct clients uniformly at random; seeded by (seed, round) alone so resume picks alike."""
        rng = np.random.default_rng([seed, round_num])
        return sorted(rng.choice(client_ids, size=min(k, len(client_ids)), replace=False).tolist())

    def aggregate(self, global_adapter: Adapter, updates: Iterable[Update]) -> tuple[Adapter, int]:
        """(next global adapter, number of updates used)."""
        raise NotImplementedError
