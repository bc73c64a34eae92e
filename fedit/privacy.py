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

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping", as
TF-Privacy's QuantileEstimatorQuery does it): each client contributes the bit b_k = [‖Δ_k‖ ≤ C] ("not
clipped"), centred: the server sums b_k − 1/2, so that adding or removing one client moves the sum by
at most 1/2 (uncentred bits would move it by 1, and cost four times as much privacy at the same noise).
It noises that sum with N(0, σ_b²), un-centres it with the fixed denominator, b̄ = (Σ (b_k − 1/2) +
noise) / m + 1/2, and moves C ← C·exp(−η (clamp(b̄, 0, 1) − γ)) towards the γ-quantile of the norms:
too many clipped (b̄ < γ) raises C. The round's updates are clipped to, and their noise calibrated to,
the C of that round; the new C serves the next round. Each round releases two Gaussian mechanisms on
the same clients: the update sum (sensitivity C, noise z_Δ·C: multiplier z_Δ) and the bit sum
(sensitivity 1/2, noise σ_b: multiplier 2σ_b). Together they are one Gaussian mechanism with multiplier
(z_Δ⁻² + (2σ_b)⁻²)^(−1/2) (the paper's Theorem 1), so z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) keeps the pair at
the z the accountant was asked for; it needs σ_b > z / 2. The accountant composes the two mechanisms
as they are (a ComposedDpEvent, Poisson-sampled as one when sampling is ``poisson``), not z alone.
Secure aggregation hands the server Σ b_k and the number of clients n in the sum
(fedit/runtime/flower.py); the centring, Σ b_k − n/2, is done here.

Ledger: each round spent is recorded with the mechanism it ran (z_Δ, the bits' multiplier, q), so a
resume that changes clients_per_round (and so q) counts the earlier rounds as they ran; z, z_Δ and σ_b
stay what the run started with. A checkpoint written before the bits were centred (its noise has no
σ_b) is counted as it ran: its adaptive rounds with the bits' multiplier σ_b, not 2σ_b.

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


def dp_event(noise_multiplier: float, sampling_rate: float | None, count_multiplier: float = 0.0):
    """One round as a DpEvent: the Gaussian sum of clipped updates, and with adaptive clipping the Gaussian
    sum of centred bits (``count_multiplier`` = σ_b over its sensitivity) released on the same clients; with
    ``sampling_rate`` both under one Poisson sample (dp-accounting treats the pair as one Gaussian mechanism)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if count_multiplier:
        gaussian = dp_accounting.ComposedDpEvent([gaussian, dp_accounting.GaussianDpEvent(count_multiplier)])
    return gaussian if sampling_rate is None else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def _accountant():
    from dp_accounting import rdp

    # dp-accounting warns (through absl) for each RDP order whose series does not converge and leaves
    # that order out: the ε of the other orders still holds. Not something a user can act on.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return rdp.RdpAccountant()


def epsilon(noise_multiplier: float, sampling_rate: float | None, rounds: int, delta: float,
            count_multiplier: float = 0.0) -> float:
    """ε at ``delta`` after ``rounds`` rounds (RDP accountant); 0 before any."""
    if rounds <= 0:
        return 0.0
    acc = _accountant()
    acc.compose(dp_event(noise_multiplier, sampling_rate, count_multiplier), rounds)
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


# Sensitivity of the bit sum: one client added or removed moves Σ (b_k − 1/2) by 1/2 (centred bits).
BIT_SENSITIVITY = 0.5


def split_noise(z: float, sigma_b: float) -> float:
    """z_Δ, the update noise multiplier that leaves the pair (updates at z_Δ, centred bits at σ_b) at z."""
    rest = z ** -2 - (sigma_b / BIT_SENSITIVITY) ** -2
    if rest <= 0:
        raise FeditError(f"adaptive clipping: the count noise σ_b = {sigma_b:g} leaves no noise for the updates at "
                         f"z = {z:g}: it needs σ_b > z / 2 = {z / 2:g}; raise privacy.count_noise")
    return rest ** -0.5


class ClientDP:
    """The mechanism of one run: its clipping bound, its secret generator, its ledger of rounds."""

    def __init__(self, p, expected_clients: float, num_clients: int, rounds: int):
        self.p, self.m = p, float(expected_clients)
        self.q = self.m / num_clients if p.sampling == "poisson" else None
        self.z = calibrate(p.target_epsilon, self.q, rounds, p.delta) if p.target_epsilon else p.noise_multiplier
        self.sigma_b = (p.count_noise or self.m / 20) if p.adaptive else 0.0
        self.z_delta = self.z
        if p.adaptive:
            try:
                self.z_delta = split_noise(self.z, self.sigma_b)
            except FeditError as e:
                default = "" if p.count_noise else f" (the default, expected clients per round / 20 = {self.m:g} / 20)"
                raise FeditError(f"{e}{default}") from None
        if p.delta >= 1 / num_clients:  # δ is the chance the guarantee fails: 1/N lets it fail for a client
            log.warning("privacy.delta = %g is not below 1 / %d clients: the (ε, δ) guarantee is weak; choose a "
                        "smaller δ", p.delta, num_clients)
        self.clip = p.clipping_norm
        self.rounds_done = 0
        # the rounds spent, in order: [z_Δ, the bits' multiplier (0: no bits), q (0: no sampling), rounds]
        self.ledger: list[list[float]] = []
        self.last_report: dict = {}  # the last round's figures, for its metrics line
        # Tensors no client trains, public and fixed (A under lora.freeze_a, from the seeded init): their
        # change is zero and releasing them costs no privacy, so they get no noise and stay bit for bit.
        self.fixed = lambda key: False
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def _round(self) -> list[float]:
        """This run's round as a ledger row (rounds = 1)."""
        return [self.z_delta, self.sigma_b / BIT_SENSITIVITY if self.sigma_b else 0.0, self.q or 0.0, 1]

    def _spend(self) -> None:
        row = self._round()
        if self.ledger and self.ledger[-1][:3] == row[:3]:
            self.ledger[-1][3] += 1
        else:
            self.ledger.append(row)
        self.rounds_done += 1

    def epsilon(self, rounds: int | None = None) -> float:
        """ε after ``rounds`` rounds (default: those done): the ledger's, then this run's round for the rest."""
        rounds = self.rounds_done if rounds is None else rounds
        if rounds <= 0:
            return 0.0
        acc, counted = _accountant(), 0
        for z_delta, bits, q, n in self.ledger + [self._round()[:3] + [math.inf]]:
            n = int(min(n, rounds - counted))
            if n > 0:
                acc.compose(dp_event(z_delta, q or None, bits), n)
                counted += n
        return float(acc.get_epsilon(self.p.delta))

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
                "noise": torch.tensor([self.z, self.z_delta, self.sigma_b], dtype=torch.float64),
                "ledger": torch.tensor(self.ledger or [[0.0, 0.0, 0.0, 0]], dtype=torch.float64),
                "rounds": torch.tensor([self.rounds_done], dtype=torch.int64), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Arrays) -> None:
        self.clip = float(state["clip"][0])
        self.rounds_done = int(state["rounds"][0])
        self.generator.set_state(state["generator"])
        # the run's noise stays what it started with, even if a resumed config asks more rounds of
        # target_epsilon or another count_noise: the split of z between updates and bits was made for it
        noise = [float(v) for v in state["noise"]]
        self.z, self.z_delta = noise[:2]
        if len(noise) == 3:
            self.sigma_b = noise[2]
            self.ledger = [[float(x) for x in row[:3]] + [int(row[3])] for row in state["ledger"].tolist() if row[3]]
        else:  # saved before the bits were centred: z_Δ was split for bits of sensitivity 1/2, which were 1
            self.sigma_b = 0.5 * (self.z ** -2 - self.z_delta ** -2) ** -0.5 if self.z_delta > self.z else 0.0
            self.ledger = [[self.z_delta, self.sigma_b, self.q or 0.0, self.rounds_done]] if self.rounds_done else []
            if self.sigma_b and self.rounds_done:
                log.warning("privacy: this run's %d rounds so far summed the adaptive clipping's bits uncentred "
                            "(a bug fixed since): ε now counts them as they ran, %.3f where %.3f was reported; "
                            "the rounds from here on cost what the config asked", self.rounds_done, self.epsilon(),
                            epsilon(self.z, self.q, self.rounds_done, self.p.delta))
        if bool(self.sigma_b) != bool(self.p.adaptive):
            raise FeditError(f"privacy.adaptive is {str(bool(self.p.adaptive)).lower()} in this config but this run "
                             f"started with {str(not self.p.adaptive).lower()}: its noise was split for that when it "
                             f"started; restore privacy.adaptive, or start a new run")


class NoisedMean:
    """One round of the mechanism, in the Aggregator interface the strategies use (fedit/aggregators.py)."""

    def __init__(self, dp: ClientDP, reference: Arrays):
        self.dp = dp
        # sorted: the noise goes to the tensors in one fixed order, whatever order the adapter's dict has
        # (a resumed run reads it from a file, in another order than the model's)
        self.sum = {k: torch.zeros(reference[k].shape, dtype=torch.float64) for k in sorted(reference)}
        self.unclipped = 0.0  # Σ b_k, uncentred: the centring needs the clients' count, known at the end
        self.clients = 0
        self.report: dict = {}

    def add(self, delta: Arrays, num_examples: int) -> None:  # num_examples: not used, equal weights
        clipped, norm = clip_norm({k: v.to(torch.float64) for k, v in delta.items()}, self.dp.clip)
        for k, v in clipped.items():
            self.sum[k].add_(v)
        self.unclipped += float(norm <= self.dp.clip)
        self.clients += 1

    def add_sum(self, total: Arrays, count: int, unclipped: float | None) -> None:
        """``count`` changes clipped on their clients and added up by secure aggregation, with the
        sum of their "not clipped" bits, uncentred, Σ b_k in [0, count] (fedit/runtime/flower.py)."""
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
            centred = self.unclipped - self.clients / 2  # Σ (b_k − 1/2): sensitivity 1/2
            noised = centred + float(torch.randn((), generator=dp.generator, dtype=torch.float64)) * dp.sigma_b
            b = noised / dp.m + 0.5
            # the noise can take b̄ outside [0, 1]; clamped (post-processing, as TF-Privacy) so one round's
            # step stays within exp(±η)
            dp.clip = c * math.exp(-dp.p.clip_learning_rate * (min(1.0, max(0.0, b)) - dp.p.target_quantile))
            self.report["unclipped_fraction_noised"] = b
        dp._spend()
        self.report.update(epsilon=dp.epsilon(), delta=dp.p.delta, noise_multiplier=dp.z)
        dp.last_report = self.report
        return out
