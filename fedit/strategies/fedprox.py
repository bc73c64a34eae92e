"""FedProx: Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020).

Needs from each client: what FedAvg needs; the client minimises its loss plus
(proximal_mu / 2) · ‖θ − θ_global‖² over the trainable adapter weights, which keeps its
adapter near the global one on non-IID data. The term's gradient, proximal_mu · (θ − θ_global),
is added to each optimizer step's gradient before clipping and AdamW (the same as adding the
term to the loss, without a second autograd graph). The server aggregates as FedAvg.
proximal_mu = 0 is FedAvg bit for bit.

With LoRA, θ is the factors: the term is (μ/2)(‖A − A_global‖² + ‖B − B_global‖²), a pull on
the factors, not on the weight change s·B·A they make.

Default μ = 0.1, for AdamW clients. Adam divides each coordinate's gradient by its own running
size, so what the term does depends on its size relative to the loss gradient g, not on μ
alone. After K AdamW steps a coordinate has moved at most about lr·K, and with
train.max_grad_norm = C the loss gradient over d trainable coordinates has RMS at most C/√d;
so at the end of a round ‖μ(θ − θ_global)‖ / ‖g‖ is about μ·lr·K·√d / C when clipping is active
(larger when it is not). For SmolLM2-135M at r = 8 (√d ≈ 1563), lr 5e-4 and 3 steps this is
0.23 at μ = 0.1 and 0.02 at μ = 0.01 (OpenFedLLM's default, Ye et al. 2024, which leaves
AdamW's step nearly as it was); for LLaMA-7B q,v at r = 8 (√d ≈ 2048), the paper's lr 1.5e-4
and 5 steps, 0.15. μ = 0.1 (in Li et al.'s grid {0.001, 0.01, 0.1, 1}) pulls without
dominating; μ = 1 makes the pull larger than the loss gradient by the end of a round. Each
client reports the ratio at its last step as the metric ``prox_ratio``, so a run shows
whether the term did anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedit.fields import option
from fedit.protocol import ClientAlgorithm
from fedit.strategies.fedavg import FedAvg

MU = "proximal_mu"


@dataclass(frozen=True)
class FedProxOptions:
    proximal_mu: float = option(0.1, "Weight μ of the proximal term (μ/2)·‖θ − θ_global‖² on the LoRA factors "
                                     "(0: FedAvg); the metric prox_ratio shows its pull against the loss gradient.",
                                min=0.0)
    server_learning_rate: float = option(1.0, "Server step on the mean client change, as in fedavg.",
                                         min=0.0, exclusive_min=True)


class ProxClient(ClientAlgorithm):
    def __init__(self, ins, state):
        super().__init__(ins, state)
        self.ratio: float | None = None

    def on_grads(self, params) -> None:
        mu = float(self.ins.config[MU])
        start = self.ins.global_adapter
        grad_sq = pull_sq = 0.0
        for k, p in params.items():
            if p.grad is not None:
                pull = (p.detach() - start[k].to(p.device, p.dtype)) * mu
                grad_sq += float(p.grad.detach().double().pow(2).sum())
                pull_sq += float(pull.double().pow(2).sum())
                p.grad.add_(pull)
        self.ratio = math.sqrt(pull_sq / grad_sq) if grad_sq > 0 else None

    def metrics(self) -> dict[str, float]:
        # ‖μ(θ − θ_global)‖ / ‖g‖ at the last step, g the loss gradient before the term, clipping and AdamW
        return {"prox_ratio": self.ratio} if self.ratio is not None else {}


class FedProx(FedAvg):
    name = "fedprox"
    Options = FedProxOptions
    client_algorithm = ProxClient

    def configure(self, round_num, client_id, global_adapter, state_round):
        ins = super().configure(round_num, client_id, global_adapter, state_round)
        return type(ins)(ins.round, ins.client_id, ins.arrays, {**ins.config, MU: self.options.proximal_mu})
