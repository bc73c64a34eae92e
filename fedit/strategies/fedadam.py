"""FedAdam: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2.

v ← β2 v + (1 − β2) Δ̄². The rest (m, the step, the defaults for LoRA: tau and eta derived
from round 1's Δ̄, m warm-started) is in fedopt.py.
"""

from fedit.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v, d2):
        b2 = self.options.beta_2
        return b2 * v + (1 - b2) * d2
