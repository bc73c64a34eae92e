"""FedYogi: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2
(Yogi: Zaheer et al., NeurIPS 2018).

v ← v − (1 − β2) Δ̄² sign(v − Δ̄²): v moves towards Δ̄² by an additive step, so it grows no faster
than Adam's and shrinks more slowly. The rest (the defaults for LoRA) is in fedopt.py.
"""

import torch

from fedit.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v, d2):
        return v - (1 - self.options.beta_2) * d2 * torch.sign(v - d2)
