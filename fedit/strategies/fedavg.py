"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017), as used by FedIT (Zhang et al., 2023).

Needs from each client: its adapter weights and its number of training examples.
The next global adapter is the example-weighted mean of the client adapters.
Accumulates in float64 so the mean is exact to fp32 (identical clients give
back exactly their adapter) and streams: one accumulator, one update at a time.
"""

from __future__ import annotations

from typing import Iterable

import torch

from fedit.client import Update
from fedit.model import Adapter
from fedit.strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(self, global_adapter: Adapter, updates: Iterable[Update]) -> tuple[Adapter, int]:
        acc: dict[str, torch.Tensor] = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_adapter.items()}
        total, used = 0, 0
        for u in updates:
            for k, v in u.adapter.items():
                acc[k].add_(v.to(torch.float64), alpha=u.num_examples)
            total += u.num_examples
            used += 1
        if used == 0:
            return global_adapter, 0
        return {k: (v / total).to(global_adapter[k].dtype) for k, v in acc.items()}, used
