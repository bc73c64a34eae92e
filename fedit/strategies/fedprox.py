"""FedProx: Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020).

Needs from each client: what FedAvg needs; the client minimises its loss plus
(proximal_mu / 2) · ‖θ − θ_global‖² over the trainable adapter weights, which keeps its
adapter near the global one on non-IID data. The term's gradient, proximal_mu · (θ − θ_global),
is added to each optimizer step's gradient before clipping and AdamW (the same as adding the
term to the loss, without a second autograd graph). The server aggregates as FedAvg.
proximal_mu = 0 is FedAvg bit for bit. Default 0.01: OpenFedLLM's (Ye et al., 2024) for LoRA;
Li et al. pick μ from {0.001, 0.01, 0.1, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedit.fields import option
from fedit.protocol import ClientAlgorithm
from fedit.strategies.fedavg import FedAvg

MU = "proximal_mu"


@dataclass(frozen=True)
class FedProxOptions:
    proximal_mu: float = option(0.01, "Weight μ of the proximal term (μ/2)·‖θ − θ_global‖² (0: FedAvg).", min=0.0)
    server_learning_rate: float = option(1.0, "Server step on the mean client change, as in fedavg.",
                                     min=0.0, exclusive_min=True)


class ProxClient(ClientAlgorithm):
    def on_grads(self, params) -> None:
        mu = float(self.ins.config[MU])
        start = self.ins.global_adapter
        for k, p in params.items():
            if p.grad is not None:
                p.grad.add_(p.detach() - start[k].to(p.device, p.dtype), alpha=mu)


class FedProx(FedAvg):
    name = "fedprox"
    Options = FedProxOptions
    client_algorithm = ProxClient

    def configure(self, round_num, client_id, global_adapter, state_round):
        ins = super().configure(round_num, client_id, global_adapter, state_round)
        return type(ins)(ins.round, ins.client_id, ins.arrays, {**ins.config, MU: self.options.proximal_mu})
