"""Client-level DP: the clip, the noise's calibration, the sensitivity bound, adaptive clipping's
direction, the accountant's golden values, the budget stop, and resume, tested as the trusted
libraries test them (statistics, golden values, directions)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from scipy.stats import norm as normal

from fedit import config, privacy, runner, server
from fedit.adapter import load_adapter_file
from fedit.config import PrivacyConfig
from fedit.errors import FeditError
from fedit.strategies import FedAvg

from conftest import tiny_config


def mechanism(m=4, num_clients=10, rounds=10, seed=0, **kw) -> privacy.ClientDP:
    dp = privacy.ClientDP(PrivacyConfig(enabled=True, **kw), m, num_clients, rounds)
    dp.generator.manual_seed(seed)  # the secret seed, fixed for a test
    return dp


def random_update(g: torch.Generator, scale: float) -> dict:
    """Tensors of several shapes and dtypes, a 0-d one and a bf16 one included."""
    return {"a": torch.randn(3, 5, generator=g) * scale, "b": (torch.randn(7, generator=g) * scale).bfloat16(),
            "s": torch.randn((), generator=g, dtype=torch.float64) * scale}


def l2(arrays: dict) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in arrays.values()))


def test_clip_bounds_every_update_and_leaves_one_inside_the_ball_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 0.05, 1.0, 30.0):
        for _ in range(20):
            u = random_update(g, scale)
            mean = mechanism(clipping_norm=0.5).combiner(u)
            mean.add(u, 1)
            clipped = mean.sum  # one client: the pre-noise sum is its clipped change
            assert l2(clipped) <= 0.5 * (1 + 1e-6)
            assert all(v.dtype == torch.float64 for v in clipped.values()) and clipped["s"].dim() == 0
            if l2(u) <= 0.5:
                assert all(torch.equal(clipped[k], u[k].double()) for k in u)
            else:  # on the sphere, same direction
                assert l2(clipped) == pytest.approx(0.5, rel=1e-9)
                ratio = 0.5 / l2(u)
                assert all(torch.allclose(clipped[k], u[k].double() * ratio, rtol=1e-12, atol=0) for k in u)


def test_noise_std_is_z_c_over_m_and_its_mean_zero():
    z, c, m, rounds = 1.3, 0.4, 5, 400
    dp = mechanism(m=m, clipping_norm=c, noise_multiplier=z, rounds=rounds)
    ref = {"w": torch.zeros(40)}
    outs = []
    for _ in range(rounds):
        mean = dp.combiner(ref)
        for _ in range(m):
            mean.add({"w": torch.zeros(40)}, 1)
        outs.append(mean.result()["w"])
    x = torch.stack(outs)  # rounds x coordinates
    expected = z * c / m
    assert torch.all((x.std(dim=0) / expected - 1).abs() < 0.15)
    assert abs(float(x.mean())) < 4 * expected / math.sqrt(x.numel())
    assert mean.report["noise_std"] == pytest.approx(expected, rel=1e-12)


def test_one_client_moves_the_pre_noise_mean_by_at_most_2c_over_m_whatever_it_sends_or_claims():
    g = torch.Generator().manual_seed(2)
    c, m = 0.3, 6
    updates = [random_update(g, 0.2) for _ in range(m)]

    def pre_noise(us, counts):
        mean = mechanism(m=m, clipping_norm=c).combiner(us[0])
        for u, n in zip(us, counts):
            mean.add(u, n)
        return {k: v / m for k, v in mean.sum.items()}

    honest = pre_noise(updates, [1] * m)
    for factor in (1000.0, -1000.0):  # scaled up, or flipped and scaled up: the worst case is 2C/m
        hostile = pre_noise([{k: v.double() * factor for k, v in updates[0].items()}] + updates[1:], [1] * m)
        moved = l2({k: hostile[k] - honest[k] for k in honest})
        assert moved <= 2 * c / m * (1 + 1e-9)
    assert moved == pytest.approx(2 * c / m, rel=1e-9)  # the flip, both clipped to C: exactly 2C/m
    # the example count a client claims has no weight at all
    claimed = pre_noise(updates, [10**9] + [1] * (m - 1))
    assert all(torch.equal(claimed[k], honest[k]) for k in honest)


def test_fedavg_under_dp_is_theta_plus_the_noised_clipped_sum_over_m():
    """Worked by hand: the clipped changes, the noise drawn from the same generator state, / m."""
    from fedit.protocol import ADAPTER, Update

    z, c, m = 0.8, 1.0, 4
    theta = {"w": torch.zeros(3)}
    s = FedAvg()
    s.privacy = mechanism(m=m, clipping_norm=c, noise_multiplier=z, seed=5)
    ups = [Update(i, {ADAPTER: {"w": torch.tensor(v)}}, 10 * (i + 1), {})
           for i, v in enumerate([[3.0, 4.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, -2.0]])]
    new, used = s.aggregate(1, theta, iter(ups))
    clipped = torch.tensor([0.6, 0.8, 0.0]) + torch.tensor([0.1, 0.0, 0.0]) + torch.tensor([0.0, 0.0, -1.0])
    noise = torch.randn(3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * z * c
    assert used == 3
    assert torch.allclose(new["w"].double(), (clipped.double() + noise) / m, rtol=0, atol=1e-7)


def test_adaptive_clipping_moves_towards_the_target_quantile_in_the_papers_direction():
    m = 20
    for start, direction in ((0.1, 1), (10.0, -1)):
        dp = mechanism(m=m, clipping_norm=start, noise_multiplier=1.0, adaptive=True, target_quantile=0.5,
                       clip_learning_rate=0.2)
        norms = [dp.clip]
        for _ in range(40):
            mean = dp.combiner({"w": torch.zeros(4)})
            for _ in range(m):
                mean.add({"w": torch.tensor([1.0, 0.0, 0.0, 0.0])}, 1)  # every update has norm 1.0
            mean.result()
            norms.append(dp.clip)
        steps = [b - a for a, b in zip(norms, norms[1:])]
        first = next(i for i, n in enumerate(norms) if (n - 1.0) * direction > 0)  # crossed 1.0
        assert all(d * direction > 0 for d in steps[:first - 1])  # round after round, towards 1.0
        assert 0.8 < norms[-1] < 1.25  # then it stays around the median norm


def test_adaptive_quantile_is_the_target_one_not_off_by_the_centring():
    """Norms 0.1, 0.2, ..., 2.0 over m = 20 clients: the 0.8-quantile lies between 1.6 and 1.7 (16 of the 20
    norms are at most 1.6); from below and from above the bound settles there."""
    m = 20
    norms = [0.1 * (i + 1) for i in range(m)]
    for start in (0.2, 5.0):
        dp = mechanism(m=m, num_clients=100, clipping_norm=start, noise_multiplier=1.0, adaptive=True,
                       count_noise=1.0, target_quantile=0.8, clip_learning_rate=0.2, seed=4)
        dp.epsilon = lambda rounds=None: 0.0  # the ledger is not what this test is about (and costs time)
        late = []
        for r in range(120):
            mean = dp.combiner({"w": torch.zeros(2)})
            for n in norms:
                mean.add({"w": torch.tensor([n, 0.0])}, 1)
            mean.result()
            late += [dp.clip] if r >= 60 else []
        assert 1.5 < sum(late) / len(late) < 1.8


def test_adaptive_noise_is_calibrated_to_the_norm_the_updates_were_clipped_to():
    """Worked by hand with 3 replies for m = 4 (the fixed denominator): the centred bits sum to
    Σ (b_k − 1/2) = 3 − 3/2, b̄ = (that + noise) / m + 1/2."""
    z, sigma_b, m, c = 1.0, 1.0, 4, 2.0
    dp = mechanism(m=m, clipping_norm=c, noise_multiplier=z, adaptive=True, count_noise=sigma_b, seed=9)
    z_delta = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5  # Andrew et al. 2021, Theorem 1, for bits of sensitivity 1/2
    assert dp.z_delta == pytest.approx(z_delta) == pytest.approx(1.1547005)
    mean = dp.combiner({"w": torch.zeros(2)})
    for _ in range(3):
        mean.add({"w": torch.zeros(2)}, 1)  # norm 0 <= C: all unclipped, so C falls after this round
    out = mean.result()
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(2, generator=g, dtype=torch.float64) * z_delta * c  # this round's C, not the next
    b = (3 - 1.5 + float(torch.randn((), generator=g, dtype=torch.float64)) * sigma_b) / m + 0.5
    assert torch.equal(out["w"], noise / m)
    assert mean.report["unclipped_fraction_noised"] == pytest.approx(b, rel=1e-12)
    assert dp.clip == pytest.approx(c * math.exp(-0.2 * (min(b, 1.0) - 0.5)), rel=1e-12) and dp.clip < c
    assert mean.report["clipping_norm"] == c


def test_invalid_count_noise_is_a_clear_error():
    with pytest.raises(FeditError, match=r"needs σ_b > z / 2 = 1.5; raise privacy.count_noise"):
        mechanism(noise_multiplier=3.0, adaptive=True, count_noise=1.0)
    with pytest.raises(FeditError, match="count noise"):  # exactly z / 2: nothing left for the updates
        mechanism(noise_multiplier=1.0, adaptive=True, count_noise=0.5)
    with pytest.raises(FeditError, match=r"the default, expected clients per round / 20 = 4 / 20"):
        mechanism(m=4, noise_multiplier=1.0, adaptive=True)  # σ_b = 0.2, z / 2 = 0.5
    mechanism(noise_multiplier=1.0, adaptive=True, count_noise=0.51)  # just above: allowed


def _released_bits(dp, unclipped: int, clipped: int, extra: str | None, seed: int) -> float:
    """m · b̄ of one round with the given clients (norm 0, or 10·C), plus one more client added one by one
    (``extra`` = "unclipped" / "clipped"), or through the secure-aggregation path (``"summed ..."``)."""
    dp.generator.manual_seed(seed)  # the same noise for both neighbours
    mean = dp.combiner({"w": torch.zeros(2)})
    for n in [0.0] * unclipped + [10 * dp.clip] * clipped:
        mean.add({"w": torch.tensor([n, 0.0])}, 1)
    if extra in ("unclipped", "clipped"):
        mean.add({"w": torch.tensor([0.0 if extra == "unclipped" else 10 * dp.clip, 0.0])}, 1)
    elif extra:  # one client's clipped change and its bit, as flower.py's check_sum hands them over
        mean.add_sum({"w": torch.zeros(2, dtype=torch.float64)}, 1, 1.0 if extra == "summed unclipped" else 0.0)
    mean.result()
    return mean.report["unclipped_fraction_noised"] * dp.m


@pytest.mark.parametrize("case", [
    # the red team's reproducer (issue 28): target ε 8, count_noise 2, 20 rounds of 20 of 100 clients
    dict(m=20, num_clients=100, rounds=20, target_epsilon=8.0, count_noise=2.0),
    dict(m=20, num_clients=100, rounds=20, noise_multiplier=1.0, count_noise=0.6),
    dict(m=100, num_clients=1000, rounds=10, noise_multiplier=1.0),  # the default σ_b = m / 20 = 5
    dict(m=20, num_clients=100, rounds=20, noise_multiplier=1.0, count_noise=1.0, sampling="poisson"),
])
def test_reported_epsilon_is_dp_accountings_composition_of_both_gaussian_mechanisms(case):
    """Each round releases two Gaussian mechanisms on the same clients: the sum of clipped updates and the
    sum of "not clipped" bits. Their sensitivities and noise are measured on the mechanism (neighbouring
    inputs with the same noise draw; the std of the released noise), then composed over the rounds by
    dp-accounting's RDP accountant, Poisson-sampled as one when the run samples so. The ε the run reports
    must be at least that; the mechanism is exactly that, so equal to it."""
    import dp_accounting
    from dp_accounting import rdp

    case = dict(case)
    m, rounds = case["m"], case["rounds"]
    make = lambda: mechanism(clipping_norm=0.5, adaptive=True, **case)  # noqa: E731

    # the bit sum's sensitivity: one client added (unclipped or clipped, one by one or summed) moves m·b̄ by
    dp = make()
    dp.epsilon = lambda rounds=None: 0.0
    moves = [abs(_released_bits(dp, 7, 5, extra, s) - _released_bits(dp, 7, 5, None, s))
             for extra in ("unclipped", "clipped", "summed unclipped", "summed clipped") for s in (1, 2)]
    bit_sensitivity = max(moves)
    # the bit noise: the std of m·b̄ with the same clients round after round (all unclipped: norm 0)
    draws = [_released_bits(dp, m, 0, None, s) for s in range(2000)]
    sigma_b = float(torch.tensor(draws).std())
    assert sigma_b == pytest.approx(case.get("count_noise") or m / 20, rel=0.06)
    sigma_b = case.get("count_noise") or m / 20  # measured within 6% (4 standard errors); the exact value
    # the update noise multiplier: the std of the released noise on a large all-zero round, over C
    dp = make()
    mean = dp.combiner({"w": torch.zeros(40000)})
    mean.add({"w": torch.zeros(40000)}, 1)
    z_delta_measured = float(mean.result()["w"].std()) * m / 0.5
    z_delta = mean.report["noise_std"] * m / 0.5
    assert z_delta_measured == pytest.approx(z_delta, rel=0.02)

    both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_delta),  # update sum: sensitivity C
                                          dp_accounting.GaussianDpEvent(sigma_b / bit_sensitivity)])
    q = m / case["num_clients"]
    event = dp_accounting.PoissonSampledDpEvent(q, both) if case.get("sampling") == "poisson" else both
    acc = rdp.RdpAccountant()
    acc.compose(event, rounds)
    true_epsilon = acc.get_epsilon(1e-5)

    dp = make()
    for _ in range(rounds):
        mean = dp.combiner({"w": torch.zeros(3)})
        for i in range(m):
            mean.add({"w": torch.tensor([0.1 * i, 0.0, 0.0])}, 1)
        mean.result()
    reported = mean.report["epsilon"]
    assert reported >= true_epsilon * (1 - 1e-9), f"reported ε {reported:.3f} < {true_epsilon:.3f} composed"
    assert reported == pytest.approx(true_epsilon, rel=1e-6)
    assert bit_sensitivity == pytest.approx(0.5, abs=1e-9)  # centred: b − 1/2 is ±1/2 (uncentred: 1)
    if "target_epsilon" in case:
        assert reported <= case["target_epsilon"]


def test_accountant_golden_values():
    # Opacus's test value for the RDP accountant: z = 1.5, q = 0.04, 2,250 steps, δ = 1e-5 -> ε = 7.33
    assert privacy.epsilon(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.33, rel=0.01)
    # Fixed sampling: R Gaussian mechanisms are one Gaussian mechanism with μ = √R / z (Dong et al.); the
    # RDP accountant's ε lies between its exact ε (Balle & Wang 2018) and the classic RDP conversion.
    z, rounds, delta = 2.0, 30, 1e-5
    mu = math.sqrt(rounds) / z
    exact = next(e / 1000 for e in range(1, 100000)
                 if normal.cdf(-e / 1000 / mu + mu / 2) - math.exp(e / 1000) * normal.cdf(-e / 1000 / mu - mu / 2)
                 <= delta)
    classic = min(rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in [1 + x / 10 for x in range(1, 2000)])
    eps = privacy.epsilon(z, None, rounds, delta)
    assert exact <= eps <= classic and eps < 1.2 * exact
    # the run's ledger: rounds one at a time equal the one-shot composition
    import dp_accounting
    from dp_accounting import rdp

    dp = mechanism(m=4, num_clients=40, clipping_norm=1.0, noise_multiplier=1.1, sampling="poisson")
    acc = rdp.RdpAccountant()
    for _ in range(12):
        mean = dp.combiner({"w": torch.zeros(1)})
        mean.result()
        acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)))
        assert mean.report["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # calibration from a target ε: the smallest z that meets it
    z = privacy.calibrate(3.0, 0.1, 50, 1e-5)
    assert privacy.epsilon(z, 0.1, 50, 1e-5) <= 3.0 < privacy.epsilon(z * 0.99, 0.1, 50, 1e-5)


def test_poisson_sampling_uses_the_secret_generator():
    dp = mechanism(m=5, num_clients=50, sampling="poisson")
    draws = [dp.select(list(range(50))) for _ in range(400)]
    sizes = [len(d) for d in draws]
    assert sum(sizes) / len(sizes) == pytest.approx(5, rel=0.1)  # q = m / N
    assert len({tuple(d) for d in draws}) > 350  # not a function of a public (seed, round)


def test_dp_with_a_robust_aggregator_or_scaffold_is_refused():
    for extra in ({"federation": {"aggregator": "median"}}, {"federation": {"strategy": "scaffold"}},
                  {"federation": {"max_update_norm": 1.0}}):
        with pytest.raises(FeditError, match="privacy.enabled"):
            config.from_dict({"privacy": {"enabled": True}, **extra})


def _dp_config(model, parts, out, **privacy_keys):
    return tiny_config(model, parts, out, privacy={"enabled": True, "clipping_norm": 0.05, "noise_multiplier": 0.5,
                                                    **privacy_keys},
                       federation={"rounds": 3, "clients_per_round": 2})


def test_a_dp_run_reports_epsilon_each_round_and_resumes_bit_identical(tmp_path, tiny_model_dir, partition_dir,
                                                                          monkeypatch):
    seeds = iter(range(1000, 2000))
    monkeypatch.setattr(privacy.secrets, "randbits", lambda bits: next(seeds))
    # uninterrupted: 3 rounds
    whole = runner.run(_dp_config(tiny_model_dir, partition_dir, tmp_path / "whole", adaptive=True, count_noise=1.0))
    rows = server.RunDir(whole).events("round")
    eps = [r["privacy"]["epsilon"] for r in rows[1:]]
    z = json.loads((whole / "run.json").read_text())["privacy"]["noise_multiplier"]
    assert eps == pytest.approx([privacy.epsilon(z, None, r, 1e-5) for r in (1, 2, 3)]) and eps[0] < eps[1] < eps[2]
    # interrupted after round 2 (same secret seed for the start), resumed with another: the saved state wins
    seeds = iter(range(1000, 2000))
    cut = runner.run(_dp_config(tiny_model_dir, partition_dir, tmp_path / "cut", adaptive=True, count_noise=1.0)
                     .replace(federation={"rounds": 2}))
    (cut / "config.toml").write_text((cut / "config.toml").read_text().replace("rounds = 2", "rounds = 3"))
    seeds = iter(range(5000, 6000))
    runner.run(None, resume=str(cut))
    a, b = load_adapter_file(whole / "adapter"), load_adapter_file(cut / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["privacy"] for r in server.RunDir(cut).events("round")[1:]] == [r["privacy"] for r in rows[1:]]
    assert "privacy: ε = " in runner.summary(cut)


def test_the_noise_does_not_follow_the_public_seed(tmp_path, tiny_model_dir, partition_dir):
    one = runner.run(_dp_config(tiny_model_dir, partition_dir, tmp_path / "one").replace(federation={"rounds": 1}))
    two = runner.run(_dp_config(tiny_model_dir, partition_dir, tmp_path / "two").replace(federation={"rounds": 1}))
    a, b = load_adapter_file(one / "adapter"), load_adapter_file(two / "adapter")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same config and seed, other noise


def test_the_budget_stops_before_the_round_that_would_exceed_it(tmp_path, tiny_model_dir, partition_dir):
    z = 0.5
    budget = (privacy.epsilon(z, None, 2, 1e-5) + privacy.epsilon(z, None, 3, 1e-5)) / 2
    cfg = _dp_config(tiny_model_dir, partition_dir, tmp_path / "run", max_epsilon=budget)
    run_dir = runner.run(cfg.replace(federation={"rounds": 5}))
    rd = server.RunDir(run_dir)
    assert [r["round"] for r in rd.events("round")] == [0, 1, 2] and rd.read_state()["round"] == 2
    assert rd.events("round")[-1]["privacy"]["epsilon"] <= budget
    assert "privacy budget: round 3" in rd.events("stop")[0]["reason"]
    backup = tmp_path / "before"
    shutil.copytree(run_dir, backup)
    runner.run(None, resume=str(run_dir))  # resumable: it stops again at the same point, nothing broken
    assert server.RunDir(run_dir).read_state()["round"] == 2


def test_exposure_is_log2_references_plus_one_minus_log2_rank(tiny_model_dir, monkeypatch):
    """Worked by hand: inserted log-perplexities 1.0 and 5.0 among references 2, 3, 4, 6."""
    from transformers import AutoTokenizer

    from fedit import canaries
    from fedit.evaluation import heldout

    monkeypatch.setattr(heldout, "heldout_loss", lambda loaded, exs, adapter, bs: {
        "examples": [[s, 6] for s in (1.0, 5.0, 2.0, 3.0, 4.0, 6.0)]})

    class Loaded:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    out = canaries.exposure(Loaded(), None, ["a", "b"], ["c", "d", "e", "f"], "alpaca", 64)
    assert [r["rank"] for r in out["canaries"]] == [1, 4]
    assert [r["exposure"] for r in out["canaries"]] == pytest.approx([math.log2(5), math.log2(5) - 2])
    inserted, refs = canaries.secrets_of(0, 3, 50)
    assert len(set(inserted + refs)) == 53 and all(s.startswith("my PIN is ") and len(s) == 21 for s in refs)


def test_canaries_are_exposed_without_dp_and_hidden_with_it(tmp_path, tiny_model_dir, partition_dir, monkeypatch):
    """The positive control first: without DP the inserted secrets rank at the top of 100 references;
    with DP (z = 4, C = 0.05: ε below 2 after 3 rounds at δ = 1e-5) they rank like references."""
    monkeypatch.setattr(privacy.secrets, "randbits", lambda bits: 12345)  # the secret seed, fixed for a test
    canary = {"client": 0, "count": 3, "repeats": 20, "references": 100, "seed": 1}
    fed = {"rounds": 3, "clients_per_round": 3}
    plain = runner.run(tiny_config(tiny_model_dir, partition_dir, tmp_path / "plain", canary=canary, federation=fed))
    exposed = json.loads((plain / "canary.json").read_text())
    assert all(r["rank"] <= 3 for r in exposed["canaries"]) and exposed["mean_exposure"] > 5
    assert "canaries: mean exposure" in runner.summary(plain)
    private = runner.run(tiny_config(tiny_model_dir, partition_dir, tmp_path / "dp", canary=canary, federation=fed,
                                     privacy={"enabled": True, "clipping_norm": 0.05, "noise_multiplier": 4.0}))
    hidden = json.loads((private / "canary.json").read_text())
    eps = server.RunDir(private).events("round")[-1]["privacy"]["epsilon"]
    # uniform ranks average 1.44 bits; a mean of 3 uniform ranks' exposures passes 3.5 bits with p < 1%
    assert eps < 2 and hidden["mean_exposure"] < 3.5



def test_a_resumed_run_keeps_the_noise_it_started_with():
    """target_epsilon calibrates z for the configured rounds; a resume that asks for more rounds must not
    change z under the rounds already spent (the ledger counts one z)."""
    first = mechanism(target_epsilon=5.0, rounds=2)
    later = mechanism(target_epsilon=5.0, rounds=3)
    assert later.z > first.z  # more rounds at the same ε need more noise
    later.load_state_dict(first.state_dict())
    assert (later.z, later.z_delta, later.rounds_done) == (first.z, first.z_delta, 0)
    # and the count noise with it: the split of z between updates and bits was made for that σ_b
    first = mechanism(noise_multiplier=1.0, adaptive=True, count_noise=2.0)
    later = mechanism(noise_multiplier=1.0, adaptive=True, count_noise=1.0)
    later.load_state_dict(first.state_dict())
    assert (later.z_delta, later.sigma_b) == (first.z_delta, 2.0)
    with pytest.raises(FeditError, match="privacy.adaptive is true in this config but this run started with false"):
        mechanism(noise_multiplier=1.0, adaptive=True, count_noise=1.0).load_state_dict(mechanism().state_dict())


def _composed(*segments) -> float:
    """dp-accounting's ε at δ = 1e-5 for (z_Δ, bits' multiplier or None, q or None, rounds) segments."""
    import dp_accounting
    from dp_accounting import rdp

    acc = rdp.RdpAccountant()
    for z_delta, bits, q, rounds in segments:
        event = dp_accounting.GaussianDpEvent(z_delta)
        if bits:
            event = dp_accounting.ComposedDpEvent([event, dp_accounting.GaussianDpEvent(bits)])
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, event) if q else event, rounds)
    return acc.get_epsilon(1e-5)


def _run_rounds(dp, rounds):
    for _ in range(rounds):
        mean = dp.combiner({"w": torch.zeros(1)})
        mean.add({"w": torch.zeros(1)}, 1)
        mean.result()
    return mean.report["epsilon"]


def test_a_checkpoint_from_before_the_centring_counts_its_rounds_as_they_ran(caplog):
    """A run saved by the earlier code (noise = [z, z_Δ], its bits summed uncentred: multiplier σ_b, not
    2σ_b): resumed, ε composes those rounds as they ran and the new rounds as they run now."""
    z, sigma_b = 1.0, 1.0
    z_delta = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5  # the split the earlier code made
    old = mechanism(noise_multiplier=z, adaptive=True, count_noise=sigma_b).state_dict()
    legacy = {"clip": old["clip"], "noise": torch.tensor([z, z_delta], dtype=torch.float64),
              "rounds": torch.tensor([5]), "generator": old["generator"]}
    dp = mechanism(noise_multiplier=z, adaptive=True, count_noise=sigma_b)
    dp.load_state_dict(legacy)
    assert dp.sigma_b == pytest.approx(sigma_b) and dp.z_delta == z_delta
    assert dp.epsilon() == pytest.approx(_composed((z_delta, sigma_b, None, 5)), rel=1e-6)
    assert dp.epsilon() > privacy.epsilon(z, None, 5, 1e-5) * 1.3  # what it had reported: 12.30, now 17.49
    assert "summed the adaptive clipping's bits uncentred" in caplog.text
    assert _run_rounds(dp, 2) == pytest.approx(_composed((z_delta, sigma_b, None, 5), (z_delta, 2 * sigma_b, None, 2)),
                                               rel=1e-6)
    # a legacy run without adaptive clipping: nothing to recount
    dp = mechanism(noise_multiplier=z)
    dp.load_state_dict({**legacy, "noise": torch.tensor([z, z], dtype=torch.float64)})
    assert dp.epsilon() == pytest.approx(privacy.epsilon(z, None, 5, 1e-5), rel=1e-9)


def test_the_ledger_keeps_each_rounds_sampling_rate_across_a_resume():
    """Poisson sampling at q = 10/100 for 3 rounds, resumed with 20 clients per round: the 3 rounds stay
    at q = 0.1, the next 2 are at q = 0.2."""
    first = mechanism(m=10, num_clients=100, noise_multiplier=1.0, sampling="poisson")
    _run_rounds(first, 3)
    later = mechanism(m=20, num_clients=100, noise_multiplier=1.0, sampling="poisson")
    later.load_state_dict(first.state_dict())
    assert later.epsilon() == pytest.approx(_composed((1.0, None, 0.1, 3)), rel=1e-9)
    assert later.epsilon(5) == pytest.approx(_composed((1.0, None, 0.1, 3), (1.0, None, 0.2, 2)), rel=1e-9)
    assert _run_rounds(later, 2) == pytest.approx(later.epsilon(5), rel=1e-12) and later.rounds_done == 5


def test_a_delta_not_below_one_over_the_clients_is_warned_about(caplog):
    mechanism(num_clients=10, delta=1e-5)
    assert "weak" not in caplog.text
    mechanism(num_clients=10, delta=0.1)
    assert "privacy.delta = 0.1 is not below 1 / 10 clients" in caplog.text
