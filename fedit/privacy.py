"""Client-level differential privacy: DP-FedAvg with adaptive clipping, accounted by dp-accounting.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", with its
fixed-denominator estimator: each selected client's change Δ_k = θ_k − θ is clipped to L2 norm
C over all its adapter tensors together (in float64), the clipped changes are summed with equal
weights (an example count a client reports would break the bound), N(0, (z·C)²) is added to
every coordinate of the sum, and the sum is divided by m, the expected number of clients per
round (not by the number that replied, which would leak through the denominator). Adding or
removing one client's whole data moves the sum by at most C, so each round is a Gaussian
mechanism with noise multiplier z. The server optimiser (fedit/strategies) then steps on this
noised mean as on any Δ̄: post-processing, no further privacy cost.

Neighbouring relation: one client's data added or removed. What is protected: everything
released after the mechanism (every round's global adapter, metrics of it); not the server's
view of single updates (that takes secure aggregation: then each client clips its own change
and the server noises the sum it is given), not the noise's floating-point representation
(Mironov 2012).

Accounting (Google's dp-accounting, RDP): with the default ``fixed`` sampling the round's
clients are drawn with the public seed, so no amplification by sampling is claimed: R rounds
are R Gaussian mechanisms. With ``poisson`` each client joins each round with probability
q = m / N, drawn from the secret generator, and each round is a Poisson-sampled Gaussian.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"):
each client contributes the bit b_k = [‖Δ_k‖ ≤ C] ("not clipped"); the server noises their sum
with N(0, σ_b²), b̄ = (Σ b_k + noise) / m, and moves C ← C·exp(−η (b̄ − γ)) towards the γ-quantile
of the norms: too many clipped (b̄ < γ) raises C. The round's updates are clipped to, and their
noise calibrated to, the C of that round; the new C serves the next round. The bits cost privacy
too: Δ gets the noise multiplier z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), so that the pair is accounted as
one Gaussian mechanism with multiplier z (the paper's Theorem 1).

The noise comes from a generator seeded from the operating system's secret randomness, never
from federation.seed (saved in the run's config: anyone with it could subtract the noise). Its
state is checkpointed with each round (in the run directory, not the config), so a resumed run
continues the same stream and ends bit-identical to an uninterrupted one; two fresh runs differ.
"""

from __future__ import annotations

import logging
import math
import secrets

import torch

from fedit.aggregators import clip_norm
from fedit.errors import FeditError

Arrays = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


def dp_event(noise_multiplier: float, sampling_rate: float | None):
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sampling_rate is None else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def epsilon(noise_multiplier: float, sampling_rate: float | None, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` rounds (RDP accountant); 0 before any."""
    if rounds <= 0:
        return 0.0
    from dp_accounting import rdp

    # dp-accounting warns (through absl) for each RDP order whose series does not converge and leaves
    # that order out: the ε of the other orders still holds. Not something a user can act on.
    logging.getLogger("absl").setLevel(logging.ERROR)
    acc = rdp.RdpAccountant()
    acc.compose(dp_event(noise_multiplier, sampling_rate), rounds)
    return float(acc.get_epsilon(delta))


def calibrate(target: float, sampling_rate: float | None, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1%) whose ε after ``rounds`` rounds is at most ``target``."""
    lo, hi = 1e-3, 1.0
    while epsilon(hi, sampling_rate, rounds, delta) > target:
        hi *= 2
        if hi > 1e6:
            raise FeditError(f"privacy.target_epsilon = {target:g} cannot be reached in {rounds} rounds at δ = "
                             f"{delta:g}; allow a larger ε or fewer rounds")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon(mid, sampling_rate, rounds, delta) <= target else (mid, hi)
    return hi


class ClientDP:
    """The mechanism of one run: its clipping bound, its secret generator, its ledger of rounds."""

    def __init__(self, p, expected_clients: float, num_clients: int, rounds: int):
        self.p, self.m = p, float(expected_clients)
        self.q = self.m / num_clients if p.sampling == "poisson" else None
        self.z = calibrate(p.target_epsilon, self.q, rounds, p.delta) if p.target_epsilon else p.noise_multiplier
        self.sigma_b = (p.count_noise or self.m / 20) if p.adaptive else 0.0
        self.z_delta = self.z
        if p.adaptive:
            rest = self.z ** -2 - (2 * self.sigma_b) ** -2
            if rest <= 0:
                raise FeditError(f"adaptive clipping: the count noise σ_b = {self.sigma_b:g} leaves no noise for the "
                                 f"updates at z = {self.z:g} (needs σ_b > z / 2); raise privacy.count_noise")
            self.z_delta = rest ** -0.5
        if p.delta >= 1 / num_clients:  # δ is the chance the guarantee fails: 1/N lets it fail for a client
            log.warning("privacy.delta = %g is not below 1 / %d clients: the (ε, δ) guarantee is weak; choose a "
                        "smaller δ", p.delta, num_clients)
        self.clip = p.clipping_norm
        self.rounds_done = 0
        self.last_report: dict = {}  # the last round's figures, for its metrics line
        # Tensors no client trains, public and fixed (A under lora.freeze_a, from the seeded init): their
        # change is zero and releasing them costs no privacy, so they get no noise and stay bit for bit.
        self.fixed = lambda key: False
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def epsilon(self, rounds: int | None = None) -> float:
        return epsilon(self.z, self.q, self.rounds_done if rounds is None else rounds, self.p.delta)

    def over_budget(self, round_num: int) -> str | None:
        """Why round ``round_num`` must not run (it would take ε past privacy.max_epsilon), or None."""
        after = self.epsilon(self.rounds_done + 1)
        if not self.p.max_epsilon or after <= self.p.max_epsilon:
            return None
        return (f"privacy budget: round {round_num} would take ε to {after:.3f}, past privacy.max_epsilon = "
                f"{self.p.max_epsilon:g} (ε = {self.epsilon():.3f} at δ = {self.p.delta:g} after round "
                f"{round_num - 1}); the run stops here")

    def select(self, client_ids: list[int]) -> list[int]:
        """Poisson sampling with the secret generator: each client joins with probability q."""
        draws = torch.rand(len(client_ids), generator=self.generator, dtype=torch.float64)
        return [c for c, u in zip(client_ids, draws.tolist()) if u < self.q]

    def combiner(self, reference: Arrays) -> "NoisedMean":
        return NoisedMean(self, reference)

    def state_dict(self) -> Arrays:
        return {"clip": torch.tensor([self.clip], dtype=torch.float64),
                "noise": torch.tensor([self.z, self.z_delta], dtype=torch.float64),
                "rounds": torch.tensor([self.rounds_done], dtype=torch.int64), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Arrays) -> None:
        self.clip = float(state["clip"][0])
        # the run's noise stays what it started with, even if a resumed config asks more rounds of
        # target_epsilon: the ledger counts one noise multiplier for every round
        self.z, self.z_delta = (float(v) for v in state["noise"])
        self.rounds_done = int(state["rounds"][0])
        self.generator.set_state(state["generator"])


class NoisedMean:
    """One round of the mechanism, in the Aggregator interface the strategies use (fedit/aggregators.py)."""

    def __init__(self, dp: ClientDP, reference: Arrays):
        self.dp = dp
        # sorted: the noise goes to the tensors in one fixed order, whatever order the adapter's dict has
        # (a resumed run reads it from a file, in another order than the model's)
        self.sum = {k: torch.zeros(reference[k].shape, dtype=torch.float64) for k in sorted(reference)}
        self.unclipped = 0
        self.clients = 0
        self.report: dict = {}

    def add(self, delta: Arrays, num_examples: int) -> None:  # num_examples: not used, equal weights
        clipped, norm = clip_norm({k: v.to(torch.float64) for k, v in delta.items()}, self.dp.clip)
        for k, v in clipped.items():
            self.sum[k].add_(v)
        self.unclipped += int(norm <= self.dp.clip)
        self.clients += 1

    def add_sum(self, total: Arrays, count: int, unclipped: float | None) -> None:
        """``count`` changes clipped on their clients and added up by secure aggregation, with the
        sum of their "not clipped" bits (fedit/runtime/flower.py)."""
        for k, v in total.items():
            self.sum[k].add_(v.to(torch.float64))
        self.unclipped += unclipped or 0
        self.clients += count

    def result(self) -> Arrays:
        """(Σ clipped Δ_k + N(0, (z_Δ·C)²)) / m; then C moves for the next round when adaptive. Always a
        result, even from no update (an empty Poisson sample): the noise is what the round releases."""
        dp, c = self.dp, self.dp.clip
        std = dp.z_delta * c
        out = {k: (v if dp.fixed(k) else v + torch.randn(v.shape, generator=dp.generator, dtype=torch.float64) * std)
               / dp.m for k, v in self.sum.items()}
        self.report = {"clipping_norm": c, "noise_std": std / dp.m}
        if dp.p.adaptive:
            b = (self.unclipped + float(torch.randn((), generator=dp.generator, dtype=torch.float64)) * dp.sigma_b) / dp.m
            dp.clip = c * math.exp(-dp.p.clip_learning_rate * (b - dp.p.target_quantile))
            self.report["unclipped_fraction_noised"] = b
        dp.rounds_done += 1
        self.report.update(epsilon=dp.epsilon(), delta=dp.p.delta, noise_multiplier=dp.z)
        dp.last_report = self.report
        return out
