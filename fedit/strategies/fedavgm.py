"""FedAvgM: Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification" (2019): FedAvg with heavy-ball momentum on the server.

Needs from each client: what FedAvg needs. The server keeps a momentum buffer v (saved with
every round): v ← server_momentum · v + Δ̄; θ ← θ + server_learning_rate · v.
server_momentum = 0 is FedAvg (at server_learning_rate η) bit for bit.

Defaults: β = server_momentum = 0.9 and η = server_learning_rate = 1 − β = 0.1, with v warm-started.
For a Δ̄ that keeps its direction and size, v tends to Δ̄ / (1 − β), so the step tends to
η / (1 − β) · Δ̄ (Hsu et al.'s effective learning rate): at η = 1 − β that is FedAvg's step, where
η = 1 would be ten times it. With warm_start, v starts at that steady state for round 1's Δ̄,
v = Δ̄ / (1 − β), so round 1's step is FedAvg's as well; from zero (warm_start = false, Hsu et al.'s
v_0 = 0) the step is η · Δ̄ in round 1 and reaches 1 − β^t of FedAvg's after t rounds (0.41 by
round 5), a lag of about 1 / (1 − β) = 10 rounds. With η = 1 − β and warm_start this is exactly
OpenFedLLM's FedAvgM (Ye et al. 2024): v' ← β v' + (1 − β) Δ̄, θ ← θ + v', with v' = Δ̄ in its
first round (v' = (1 − β) v here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedit.fields import option
from fedit.protocol import Arrays
from fedit.strategies.base import ServerOptimizer, prefixed, unprefixed


@dataclass(frozen=True)
class FedAvgMOptions:
    server_learning_rate: float = option(0.1, "Server step η on the momentum buffer; η / (1 − β) is the step on a "
                                              "steady Δ̄ relative to FedAvg's (0.1 with β = 0.9: FedAvg's).",
                                         min=0.0, exclusive_min=True)
    server_momentum: float = option(0.9, "Heavy-ball momentum β of the server (0: FedAvg).", min=0.0, max=1.0,
                                    exclusive_max=True)
    warm_start: bool = option(True, "v starts at round 1's Δ̄ / (1 − β), its steady state for that Δ̄ (OpenFedLLM), "
                                    "instead of 0 (Hsu et al.), so the first rounds do not lag.")


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    Options = FedAvgMOptions

    def __init__(self, options=None, num_clients: int = 1, **aggregation):
        super().__init__(options, num_clients, **aggregation)
        self.v: Arrays = {}

    def step(self, theta: Arrays, delta: Arrays) -> Arrays:
        o = self.options
        if not self.v:
            if o.warm_start:
                self.v = {k: d / (1 - o.server_momentum) for k, d in delta.items()}
                return {k: theta[k] + o.server_learning_rate * self.v[k] for k in theta}
            self.v = {k: torch.zeros_like(d) for k, d in delta.items()}
        for k, d in delta.items():
            self.v[k] = o.server_momentum * self.v[k] + d
        return {k: theta[k] + o.server_learning_rate * self.v[k] for k in theta}

    def state_dict(self) -> Arrays:
        return prefixed("v", self.v)

    def load_state_dict(self, state: Arrays) -> None:
        self.v = unprefixed("v", state)
