"""The adaptive server optimisers of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
Algorithm 2: FedAdam, FedYogi and FedAdagrad share everything but the second moment.

Needs from each client: what FedAvg needs. With Δ̄ the example-weighted mean client change,
the server keeps m and v (saved with every round):
    m ← β1 m + (1 − β1) Δ̄
    v ← (each algorithm's rule, from Δ̄² — the update squared, never the momentum)
    θ ← θ + eta · m / (√v + tau)
m starts at 0 and v at tau² (the paper's v_{-1} ≥ tau²); no bias correction, as in the paper.

Defaults for LoRA adapters. The full-model defaults (Flower: eta = 0.1, tau = 1e-9) move every
coordinate by about eta per round, while a LoRA client under the paper's AdamW (lr 1.5e-4, a few
to tens of steps per round) moves each weight by about 1e-4 to 1e-3: eta = 0.1 would be a hundred
times the clients' own steps. eta = 1e-3 (OpenFedLLM's default for LoRA, Ye et al. 2024) matches
them. tau sets the smallest change treated as signal: OpenFedLLM's tau = 1e-3 is larger than the
LoRA changes themselves and would shrink the first rounds' steps about twentyfold, so fedit uses
tau = 1e-6, below them. β1 = 0.9, β2 = 0.99 (Reddi et al.; OpenFedLLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedit.fields import option
from fedit.protocol import Arrays
from fedit.strategies.base import ServerOptimizer, prefixed, unprefixed


def eta_option():
    return option(1e-3, "Server learning rate.", min=0.0, exclusive_min=True)


def tau_option():
    return option(1e-6, "Adaptivity floor added to √v; v starts at tau².", min=0.0, exclusive_min=True)


@dataclass(frozen=True)
class FedOptOptions:
    eta: float = eta_option()
    beta_1: float = option(0.9, "First-moment decay β1.", min=0.0, max=1.0, exclusive_max=True)
    beta_2: float = option(0.99, "Second-moment decay β2.", min=0.0, max=1.0, exclusive_max=True)
    tau: float = tau_option()


class FedOpt(ServerOptimizer):
    """The shared part; subclasses give ``second_moment``."""

    Options = FedOptOptions

    def __init__(self, options=None, num_clients: int = 1, **aggregation):
        super().__init__(options, num_clients, **aggregation)
        self.m: Arrays = {}
        self.v: Arrays = {}

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, theta: Arrays, delta: Arrays) -> Arrays:
        o = self.options
        if not self.m:
            self.m = {k: torch.zeros_like(d) for k, d in delta.items()}
            self.v = {k: torch.full_like(d, o.tau ** 2) for k, d in delta.items()}
        out = {}
        for k, d in delta.items():
            self.m[k] = o.beta_1 * self.m[k] + (1 - o.beta_1) * d
            self.v[k] = self.second_moment(self.v[k], d * d)
            out[k] = theta[k] + o.eta * self.m[k] / (self.v[k].sqrt() + o.tau)
        return out

    def state_dict(self) -> Arrays:
        return {**prefixed("m", self.m), **prefixed("v", self.v)}

    def load_state_dict(self, state: Arrays) -> None:
        self.m, self.v = unprefixed("m", state), unprefixed("v", state)
