"""The adaptive server optimisers of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
Algorithm 2: FedAdam, FedYogi and FedAdagrad share everything but the second moment.

Needs from each client: what FedAvg needs. With Δ̄ the example-weighted mean client change,
the server keeps m and v (saved with every round):
    m ← β1 m + (1 − β1) Δ̄          (round 1 with warm_start: m = Δ̄)
    v ← (each algorithm's rule, from Δ̄² — the update squared, never the momentum)
    θ ← θ + eta · m / (√v + tau)
v starts at tau² (the paper's v_{-1} ≥ tau²); no bias correction, as in the paper.

Defaults for LoRA with AdamW clients. A LoRA client under AdamW moves each weight by about
lr × steps (1e-4 to 1e-3 per round), so any fixed tau and eta are right for one setting only:
    - tau (default 0: derived) is set in round 1 to the median |Δ̄| over the coordinates that
      moved. tau is the size at which a coordinate's step stops growing in proportion to Δ̄:
      coordinates below it move as under FedAvg, those above it are damped. A tau far below
      every |Δ̄| (1e-6 against 1e-4 to 1e-3) makes the step eta·sign(Δ̄), the same size on
      every coordinate (server sign-SGD: the tiny coordinates amplified tens of times, a step
      of norm eta·√d); a tau far above them shrinks every step in proportion.
    - eta (default 0: derived) is set in round 1 so that round's step has the norm of FedAvg's,
      ‖Δ̄‖.
    - warm_start (default true): m starts at round 1's Δ̄, as OpenFedLLM's FedAdam and FedYogi
      do (Ye et al. 2024); then m is an average of the past Δ̄ with weights that sum to 1 from
      round 1 on. From zero (false: Reddi et al.'s m_0 = 0, without bias correction) m holds
      only 1 − β1^t of a steady Δ̄, and with eta matched in round 1 the step grows as m fills:
      for a Δ̄ that keeps its direction and size, by round 5 to 1.85 times round 1's (the limit
      for |Δ̄| ≫ tau, (1 − β1^5)/(1 − β1) over √((1 − β2^5)/(1 − β2))) up to 4.1 times (at
      |Δ̄| = tau). With eta derived, round 1's step is the same either way (eta absorbs the
      factor 1 − β1).
Both derived values are kept in the strategy's state (resume reuses them, bit for bit) and
reported by ``derived()``. β1 = 0.9, β2 = 0.99 (Reddi et al.; OpenFedLLM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedit.errors import FeditError
from fedit.fields import option
from fedit.protocol import Arrays
from fedit.strategies.base import ServerOptimizer, prefixed, unprefixed

HYPER = "hyper"  # state prefix of the values derived in round 1


def eta_option():
    return option(0.0, "Server learning rate; 0 (default): set in round 1 so that round's step has the norm of "
                       "FedAvg's step ‖Δ̄‖ (kept with the strategy's state).", min=0.0)


def tau_option():
    return option(0.0, "Adaptivity floor added to √v (v starts at tau²); 0 (default): set in round 1 to the median "
                       "|Δ̄| over the coordinates that moved (kept with the strategy's state).", min=0.0)


def warm_start_option():
    return option(True, "m starts at round 1's Δ̄ (OpenFedLLM) instead of 0 (Reddi et al.), so the step does not "
                        "grow by up to 1/(1 − β1) while m fills.")


@dataclass(frozen=True)
class FedOptOptions:
    eta: float = eta_option()
    beta_1: float = option(0.9, "First-moment decay β1.", min=0.0, max=1.0, exclusive_max=True)
    beta_2: float = option(0.99, "Second-moment decay β2.", min=0.0, max=1.0, exclusive_max=True)
    tau: float = tau_option()
    warm_start: bool = warm_start_option()


def norm(arrays: Arrays) -> float:
    """L2 norm over every tensor, summed in name order (the same number whatever order they arrive in)."""
    return math.sqrt(sum(float(arrays[k].pow(2).sum()) for k in sorted(arrays)))


def median_moved(delta: Arrays) -> float:
    """The (lower) median of |Δ̄| over the coordinates that moved; 0.0 if none did. Coordinates no
    client trains (A under lora.freeze_a, modules nobody targets) are exactly 0 and left out, or they
    would set tau to 0."""
    mags = torch.cat([delta[k].abs().flatten() for k in sorted(delta)])
    mags = mags[mags > 0]
    return float(mags.median()) if mags.numel() else 0.0


class FedOpt(ServerOptimizer):
    """The shared part; subclasses give ``second_moment``."""

    Options = FedOptOptions

    def __init__(self, options=None, num_clients: int = 1, **aggregation):
        super().__init__(options, num_clients, **aggregation)
        self.m: Arrays = {}
        self.v: Arrays = {}
        self.tau: float | None = self.options.tau or None  # None: derived in round 1
        self.eta: float | None = self.options.eta or None

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derived(self) -> dict[str, float]:
        """tau and eta as used (derived in round 1 where the options left them at 0)."""
        return {k: v for k, v in (("tau", self.tau), ("eta", self.eta)) if v is not None}

    def step(self, theta: Arrays, delta: Arrays) -> Arrays:
        o = self.options
        first = not self.m
        if not first and self.tau is None:
            raise FeditError("the saved FedOpt state has moments but no tau: it was written with another "
                             "strategy.tau; resume with the options it started with")
        if first:
            if self.tau is None:
                self.tau = median_moved(delta)
                if self.tau == 0.0:  # nothing moved: nothing to measure, and FedAvg's step is zero too
                    self.tau = None
                    return theta
            self.m = {k: torch.zeros_like(d) for k, d in delta.items()}
            self.v = {k: torch.full_like(d, self.tau ** 2) for k, d in delta.items()}
        u = {}
        for k, d in delta.items():
            self.m[k] = d.clone() if first and o.warm_start else o.beta_1 * self.m[k] + (1 - o.beta_1) * d
            self.v[k] = self.second_moment(self.v[k], d * d)
            u[k] = self.m[k] / (self.v[k].sqrt() + self.tau)
        if self.eta is None:  # round 1: the step FedAvg would take, in norm
            self.eta = norm(delta) / norm(u)
        return {k: theta[k] + self.eta * u[k] for k in theta}

    def state_dict(self) -> Arrays:
        hyper = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.derived().items()}
        return {**prefixed("m", self.m), **prefixed("v", self.v), **prefixed(HYPER, hyper)}

    def load_state_dict(self, state: Arrays) -> None:
        self.m, self.v = unprefixed("m", state), unprefixed("v", state)
        hyper = unprefixed(HYPER, state)
        self.tau = float(hyper["tau"]) if "tau" in hyper else self.options.tau or None
        self.eta = float(hyper["eta"]) if "eta" in hyper else self.options.eta or None
