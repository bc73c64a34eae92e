"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017), as used by FedIT (Zhang et al., 2023).

Needs from each client: its adapter and the number of examples it trained on.
θ ← θ + server_learning_rate · Δ̄, Δ̄ the example-weighted mean of the clients'
changes; with the default server_learning_rate = 1.0 that is the paper's
example-weighted mean of the client adapters. Streams: one float64 accumulator,
one client adapter at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedit.fields import option
from fedit.protocol import Arrays
from fedit.strategies.base import ServerOptimizer


@dataclass(frozen=True)
class FedAvgOptions:
    server_learning_rate: float = option(1.0, "Server step on the mean client change; 1.0 is the paper's FedAvg.",
                                     min=0.0, exclusive_min=True)


class FedAvg(ServerOptimizer):
    name = "fedavg"
    Options = FedAvgOptions

    def step(self, theta: Arrays, delta: Arrays) -> Arrays:
        lr = self.options.server_learning_rate
        return {k: theta[k] + lr * delta[k] for k in theta}
