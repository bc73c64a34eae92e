"""SCAFFOLD: Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML 2020), Algorithm 1.

Needs from each client: its adapter, the examples it trained on, and Δc_k, the change of its
control variate; each client keeps its own c_k between the rounds it takes part in (in the run
directory in the simulation, in the SuperNode's state on Flower). Each round the server sends
the global adapter and its control variate c (twice FedAvg's bytes down, and twice up).

Client: every optimizer step's gradient g gets the correction c − c_k before clipping and AdamW
(a correction of the gradient, not of the parameters after the optimizer's step). After its K
local steps, c_k⁺ = the mean of the K gradients g it computed. That is the value of the paper's
option II, c_k − c + (x − y_k)/(Kη), under plain SGD; under AdamW, (x − y_k)/(Kη) measures
Adam's normalised steps instead of gradients, so fedit takes the mean gradient directly, keeping
c and c_k in gradient units. It sends Δc_k = c_k⁺ − c_k and keeps c_k⁺.

Server: θ ← θ + server_learning_rate · Δ̄ (example-weighted, as FedAvg) and
c ← c + (1/N) Σ_{k ∈ round} Δc_k with N the number of registered clients. In the first round
every control variate is zero and SCAFFOLD is FedAvg bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedit.fields import option
from fedit.protocol import ADAPTER, ClientAlgorithm, FitIns, Update
from fedit.strategies.base import ServerOptimizer, prefixed, unprefixed

CONTROL = "control"  # FitIns: the server's c (the client's own c_k is its state)
CONTROL_DELTA = "control_delta"  # Update: Δc_k


@dataclass(frozen=True)
class ScaffoldOptions:
    server_learning_rate: float = option(1.0, "Server step on the mean client change (the paper's η_g).",
                                         min=0.0, exclusive_min=True)


class ScaffoldClient(ClientAlgorithm):
    stateful = True

    def __init__(self, ins: FitIns, state):
        super().__init__(ins, state)
        c = ins.arrays[CONTROL]
        self.c_k = dict(state) if state else {k: torch.zeros_like(v) for k, v in c.items()}  # state: c_k
        self.correction = {k: c[k] - self.c_k[k] for k in c}
        self.grad_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in c.items()}
        self.steps = 0

    def on_grads(self, params) -> None:
        for k, p in params.items():
            if p.grad is None:
                continue
            self.grad_sum[k].add_(p.grad.detach().to("cpu", torch.float64))
            p.grad.add_(self.correction[k].to(p.device, p.grad.dtype))
        self.steps += 1

    def finish(self, params):
        if self.steps == 0:  # nothing trained: c_k stays, nothing changes
            return {CONTROL_DELTA: {k: torch.zeros_like(v) for k, v in self.c_k.items()}}, self.c_k
        new = {k: (s / self.steps).to(torch.float32) for k, s in self.grad_sum.items()}
        return {CONTROL_DELTA: {k: new[k] - self.c_k[k] for k in new}}, new


class Scaffold(ServerOptimizer):
    name = "scaffold"
    Options = ScaffoldOptions
    client_algorithm = ScaffoldClient
    reply_groups = (ADAPTER, CONTROL_DELTA)

    def __init__(self, options=None, num_clients: int = 1, **aggregation):
        super().__init__(options, num_clients, **aggregation)
        self.c: dict[str, torch.Tensor] = {}
        self._dc: dict[str, torch.Tensor] = {}

    def configure(self, round_num, client_id, global_adapter, state_round):
        ins = super().configure(round_num, client_id, global_adapter, state_round)
        if not self.c:
            self.c = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_adapter.items()}
        control = {k: v.to(torch.float32) for k, v in self.c.items()}
        return FitIns(ins.round, ins.client_id, {**ins.arrays, CONTROL: control}, ins.config)

    def observe(self, update: Update) -> None:
        for k, v in update.arrays[CONTROL_DELTA].items():
            if k not in self._dc:
                self._dc[k] = torch.zeros_like(v, dtype=torch.float64)
            self._dc[k].add_(v.to(torch.float64))

    def step(self, theta, delta):
        for k, dc in self._dc.items():
            self.c[k] = self.c[k] + dc / self.num_clients
        self._dc = {}
        lr = self.options.server_learning_rate
        return {k: theta[k] + lr * delta[k] for k in theta}

    def state_dict(self):
        return prefixed("c", self.c)

    def load_state_dict(self, state) -> None:
        self.c = unprefixed("c", state)
