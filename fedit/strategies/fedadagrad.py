"""FedAdagrad: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2.

v ← v + Δ̄² (no decay: the step shrinks as changes accumulate, about as 1/√t for a steady Δ̄).
It has no β2. Its β1 defaults to 0 (Flower's FedAdagrad, and OpenFedLLM's, which uses no momentum
for it), so m = Δ̄ and warm_start changes nothing unless β1 is set. The rest (tau and eta derived from
round 1's Δ̄) is in fedopt.py.
"""

from dataclasses import dataclass

from fedit.fields import option
from fedit.strategies.fedopt import FedOpt, eta_option, tau_option, warm_start_option


@dataclass(frozen=True)
class FedAdagradOptions:
    eta: float = eta_option()
    beta_1: float = option(0.0, "First-moment decay β1 (0: no server momentum).", min=0.0, max=1.0,
                           exclusive_max=True)
    tau: float = tau_option()
    warm_start: bool = warm_start_option()


class FedAdagrad(FedOpt):
    name = "fedadagrad"
    Options = FedAdagradOptions

    def second_moment(self, v, d2):
        return v + d2
