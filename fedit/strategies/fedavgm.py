"""FedAvgM: Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification" (2019): FedAvg with heavy-ball momentum on the server.

Needs from each client: what FedAvg needs. The server keeps a momentum buffer v (saved with
every round): v ← server_momentum · v + Δ̄; θ ← θ + server_learning_rate · v.
server_momentum = 0 is FedAvg bit for bit. Defaults: momentum 0.9 and server learning rate 1.0,
as OpenFedLLM's FedAvgM (Ye et al., 2024) uses for LoRA adapters; Hsu et al. tune
β ∈ {0.7, 0.9, 0.97, 0.99} and note the effective step is server_learning_rate / (1 − β).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedit.fields import option
from fedit.protocol import Arrays
from fedit.strategies.base import ServerOptimizer, prefixed, unprefixed


@dataclass(frozen=True)
class FedAvgMOptions:
    server_learning_rate: float = option(1.0, "Server step on the momentum buffer.", min=0.0, exclusive_min=True)
    server_momentum: float = option(0.9, "Heavy-ball momentum β of the server (0: FedAvg).", min=0.0, max=1.0,
                                exclusive_max=True)


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    Options = FedAvgMOptions

    def __init__(self, options=None, num_clients: int = 1, **aggregation):
        super().__init__(options, num_clients, **aggregation)
        self.v: Arrays = {}

    def step(self, theta: Arrays, delta: Arrays) -> Arrays:
        o = self.options
        if not self.v:
            self.v = {k: torch.zeros_like(d) for k, d in delta.items()}
        for k, d in delta.items():
            self.v[k] = o.server_momentum * self.v[k] + d
        return {k: theta[k] + o.server_learning_rate * self.v[k] for k in theta}

    def state_dict(self) -> Arrays:
        return prefixed("v", self.v)

    def load_state_dict(self, state: Arrays) -> None:
        self.v = unprefixed("v", state)
