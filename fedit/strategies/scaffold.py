"""SCAFFOLD: Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML 2020), Algorithm 1.

Needs from each client: its adapter, the examples it trained on, and Δc_k, the change of its
control variate; each client keeps its own c_k between the rounds it takes part in (in the run
directory in the simulation, in the SuperNode's state on Flower). Each round the server sends
the global adapter and its control variate c (twice FedAvg's bytes down, and twice up).

Client: every optimizer step's gradient g gets the correction c − c_k before clipping and the
optimizer's step (a correction of the gradient, not of the parameters after the step). After its
K local steps, c_k⁺ = the mean of the K gradients g it computed. That is the value of the paper's
option II, c_k − c + (x − y_k)/(Kη), under plain SGD without clipping; under AdamW,
(x − y_k)/(Kη) measures Adam's normalised steps instead of gradients, so fedit takes the mean
gradient directly, keeping c and c_k in gradient units. It sends Δc_k = c_k⁺ − c_k and keeps c_k⁺.

The local optimizer (``local_optimizer``). The paper analyses plain SGD: y ← y − η_l (g + c − c_k),
where the correction moves each step by exactly η_l (c − c_k) and cancels the client's drift in
expectation. Under AdamW (the default, the paper's clients in FedIT) the correction enters before
Adam divides each coordinate by its running gradient size, so what reaches the step is a
renormalised mix of g and c − c_k, and the variance-reduction argument does not carry over.
``local_optimizer = "sgd"`` runs the paper's setting: torch.optim.SGD, no momentum, no weight decay,
at ``local_lr``. SGD's rate is not AdamW's (a gradient step, not a normalised one): local_lr = 0
(the default) sets it to train.lr · √d / train.max_grad_norm (d: the adapter's trained
coordinates), at which the longest step SGD can take, that of a clipped gradient, has the norm of
AdamW's sign-like first step, lr · √d. Steps on smaller gradients are shorter, as SGD's are.

Server: θ ← θ + server_learning_rate · Δ̄ (example-weighted, as FedAvg) and
c ← c + (1/N) Σ_{k ∈ round} Δc_k with N the number of registered clients, so c is the mean of all
N clients' c_k with those that never took part counted at their initial 0 (the paper's rule):
with 4 of 20 clients per round, a share (1 − 4/20)^R of the clients is expected to be unseen after
R rounds (a third after 5; 7 of 20 with seed 42), and c is shrunk by that share. In the first
round every control variate is zero and SCAFFOLD is FedAvg bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedit.errors import FeditError
from fedit.fields import option
from fedit.protocol import ADAPTER, ClientAlgorithm, FitIns, Update
from fedit.strategies.base import ServerOptimizer, prefixed, unprefixed

CONTROL = "control"  # FitIns: the server's c (the client's own c_k is its state)
CONTROL_DELTA = "control_delta"  # Update: Δc_k
LOCAL_OPTIMIZER, LOCAL_LR = "local_optimizer", "local_lr"  # FitIns.config keys, sent with "sgd" only


@dataclass(frozen=True)
class ScaffoldOptions:
    server_learning_rate: float = option(1.0, "Server step on the mean client change (the paper's η_g).",
                                         min=0.0, exclusive_min=True)
    local_optimizer: str = option("adamw", "The clients' optimizer: 'adamw' (train.lr, as every strategy) or 'sgd' "
                                           "(plain SGD at local_lr: the paper's setting).", choices=("adamw", "sgd"))
    local_lr: float = option(0.0, "SGD's learning rate with local_optimizer = 'sgd'; 0 (default): train.lr · √d / "
                                  "train.max_grad_norm, d the trained coordinates (a clipped gradient's step then has "
                                  "the norm of AdamW's first step). Unused with 'adamw'.", min=0.0)


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

    def make_optimizer(self, params, cfg):
        if self.ins.config.get(LOCAL_OPTIMIZER, "adamw") != "sgd":
            return super().make_optimizer(params, cfg)
        lr = float(self.ins.config.get(LOCAL_LR, 0.0))
        if not lr:
            if not cfg.max_grad_norm:
                raise FeditError("strategy.local_optimizer = 'sgd' with strategy.local_lr = 0 derives SGD's rate from "
                                 "train.max_grad_norm, which is 0 (no clipping): set train.max_grad_norm > 0 or "
                                 "strategy.local_lr")
            d = sum(p.numel() for p in params)
            lr = cfg.lr * math.sqrt(d) / cfg.max_grad_norm
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)

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
        o = self.options
        config = {**ins.config, LOCAL_OPTIMIZER: "sgd", LOCAL_LR: o.local_lr} if o.local_optimizer == "sgd" \
            else ins.config
        return FitIns(ins.round, ins.client_id, {**ins.arrays, CONTROL: control}, config)

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
