"""Every strategy against expectations worked out by hand, and each degenerate setting against fedavg.

The pattern to copy for a new strategy: a few one- or two-coordinate tensors, two or three
clients with different example counts, the expected values written out as arithmetic in the
test (never by calling the strategy's own helpers), and one test that the setting in which the
algorithm must reduce to FedAvg gives FedAvg's adapters bit for bit.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedit.errors import FeditError
from fedit.protocol import FitIns, Update
from fedit.strategies import STRATEGIES
from fedit.strategies.fedadagrad import FedAdagrad
from fedit.strategies.fedadam import FedAdam
from fedit.strategies.fedavg import FedAvg
from fedit.strategies.fedavgm import FedAvgM
from fedit.strategies.fedprox import FedProx, ProxClient
from fedit.strategies.fedyogi import FedYogi
from fedit.strategies.scaffold import Scaffold, ScaffoldClient


def T(*v):
    return torch.tensor(v, dtype=torch.float32)


def upd(cid, n, **groups):
    return Update(cid, {g: {k: T(*v) for k, v in arrays.items()} for g, arrays in groups.items()}, n)


def client(cid, n, **adapter):
    return upd(cid, n, adapter=adapter)


def opts(cls, **kw):
    return cls.Options(**kw)


# ---------------------------------------------------------------- fedavg

def test_fedavg_weights_are_example_counts_hand_computed():
    g = {"a": T(0.0, 0.0), "b": T(0.0)}
    new, used = FedAvg().aggregate(1, g, iter([client(0, 1, a=[1.0, 2.0], b=[3.0]), client(1, 3, a=[5.0, 6.0], b=[-1.0])]))
    # a = (1*[1,2] + 3*[5,6]) / 4 = [4, 5];  b = (1*3 + 3*-1) / 4 = 0
    assert used == 2 and torch.equal(new["a"], T(4.0, 5.0)) and torch.equal(new["b"], T(0.0))


def test_fedavg_server_learning_rate_hand_computed():
    g = {"a": T(1.0, 1.0)}
    s = FedAvg(opts(FedAvg, server_learning_rate=0.5))
    new, _ = s.aggregate(1, g, [client(0, 1, a=[3.0, 1.0]), client(1, 3, a=[1.0, 5.0])])
    # deltas [2, 0] (n=1) and [0, 4] (n=3): mean [0.5, 3]; θ + 0.5 · mean = [1.25, 2.5]
    assert torch.equal(new["a"], T(1.25, 2.5))


def test_fedavg_equals_the_weighted_mean_of_adapters_bit_for_bit():
    """The paper's FedAvg, Σ n_k θ_k / Σ n in float64, as fedit computed it before the pseudo-gradient form."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        g = {"x": torch.randn(64, 8, generator=gen), "y": torch.randn(8, 64, generator=gen) * 1e-3}
        ups = [Update(i, {"adapter": {k: v + torch.randn(v.shape, generator=gen) * 1e-3 for k, v in g.items()}}, n)
               for i, n in enumerate([7, 130, 1])]
        mean = {k: (sum(u.adapter[k].double() * u.num_examples for u in ups) / 138).float() for k in g}
        new, _ = FedAvg().aggregate(1, g, ups)
        assert all(torch.equal(new[k], mean[k]) for k in g), trial


def test_identical_clients_aggregate_to_themselves_exactly():
    torch.manual_seed(0)
    w = {"x": torch.randn(64, 8), "y": torch.randn(8, 64)}
    ups = [Update(i, {"adapter": {k: v.clone() for k, v in w.items()}}, n) for i, n in enumerate([7, 130, 1, 999])]
    for name, cls in STRATEGIES.items():
        if cls in (FedAvg, FedProx):
            new, _ = cls().aggregate(1, {k: torch.zeros_like(v) for k, v in w.items()}, ups)
            assert all(torch.equal(new[k], w[k]) for k in w), name


def test_no_updates_keeps_the_global_adapter():
    g = {"a": torch.ones(3)}
    for cls in STRATEGIES.values():
        new, used = cls().aggregate(1, g, [])
        assert used == 0 and new is g, cls.name


def test_streams_one_update_at_a_time():
    made = []

    def gen():
        for i in range(5):
            made.append(i)
            yield client(i, 1, a=[float(i)])

    new, used = FedAvg().aggregate(1, {"a": T(0.0)}, gen())
    assert made == [0, 1, 2, 3, 4] and used == 5 and new["a"].item() == 2.0


def test_selection_is_seeded_by_round_and_distinct():
    s = FedAvg()
    ids = list(range(100))
    a = s.select(3, ids, 5, seed=1)
    assert a == s.select(3, ids, 5, seed=1) and a != s.select(4, ids, 5, seed=1)
    assert len(set(a)) == 5 and set(a) <= set(ids)


def test_cover_draws_each_client_once_per_pass_in_permutation_blocks():
    from fedit.strategies.base import cover

    ids = list(range(20))
    # worked out from the definition: round r takes positions 4(r-1)..4r-1 of perm_0 + perm_1 + ..., perm_p the
    # permutation numpy draws from (seed, 0xC0FE, p)
    perm0 = np.random.default_rng([7, 0xC0FE, 0]).permutation(20).tolist()
    perm1 = np.random.default_rng([7, 0xC0FE, 1]).permutation(20).tolist()
    assert cover(2, ids, 4, 7) == sorted(perm0[4:8])
    assert cover(6, ids, 4, 7) == sorted(perm1[0:4])
    first = [c for r in range(1, 6) for c in cover(r, ids, 4, 7)]
    second = [c for r in range(6, 11) for c in cover(r, ids, 4, 7)]
    assert sorted(first) == ids and sorted(second) == ids  # every client once per pass, none twice
    assert [cover(r, ids, 4, 7) for r in range(1, 6)] != [FedAvg().select(r, ids, 4, 7) for r in range(1, 6)]
    # 5 clients, 2 per round: round 3 spans perm_0's last client and perm_1's first; if they are the same
    # client it takes perm_1's second instead
    p0 = np.random.default_rng([1, 0xC0FE, 0]).permutation(5).tolist()
    p1 = np.random.default_rng([1, 0xC0FE, 1]).permutation(5).tolist()
    want = [p0[4], p1[0]] if p0[4] != p1[0] else [p0[4], p1[1]]
    assert cover(3, list(range(5)), 2, 1) == sorted(want)
    assert all(len(set(cover(r, list(range(5)), 2, s))) == 2 for r in range(1, 30) for s in range(5))


# ---------------------------------------------------------------- fedavgm

def test_fedavgm_heavy_ball_hand_computed():
    """Hsu et al.'s form, v from zero."""
    s = FedAvgM(opts(FedAvgM, server_momentum=0.5, server_learning_rate=2.0, warm_start=False))
    theta = {"a": T(0.0, 0.0)}
    theta, _ = s.aggregate(1, theta, [client(0, 1, a=[1.0, -2.0])])
    # v = [1, -2]; θ = 0 + 2 · v = [2, -4]
    assert torch.equal(theta["a"], T(2.0, -4.0))
    theta, _ = s.aggregate(2, theta, [client(0, 1, a=[5.0, -4.0])])
    # Δ̄ = [3, 0]; v = 0.5 · [1, -2] + [3, 0] = [3.5, -1]; θ = [2, -4] + 2 · [3.5, -1] = [9, -6]
    assert torch.equal(theta["a"], T(9.0, -6.0))
    assert torch.equal(s.state_dict()["v/a"].float(), T(3.5, -1.0))


def test_fedavgm_defaults_take_fedavgs_step_from_round_1_and_at_steady_state():
    """β = 0.9, η = 1 − β = 0.1, v warm-started at Δ̄ / (1 − β): OpenFedLLM's v' ← β v' + (1 − β) Δ̄ with
    v' = Δ̄ in its first round (v' = (1 − β) v)."""
    s = FedAvgM()
    theta = {"a": T(0.0, 0.0)}
    theta, _ = s.aggregate(1, theta, [client(0, 1, a=[1.0, -2.0])])
    # v = [1, −2] / 0.1 = [10, −20]; θ = 0 + 0.1 · v = [1, −2]: FedAvg's step
    assert torch.allclose(theta["a"], T(1.0, -2.0), rtol=1e-6)
    theta, _ = s.aggregate(2, theta, [client(0, 1, a=[theta["a"][0].item() + 3.0, theta["a"][1].item()])])
    # Δ̄ = [3, 0]; v = 0.9 · [10, −20] + [3, 0] = [12, −18]; θ = [1, −2] + 0.1 · v = [2.2, −3.8]
    # (OpenFedLLM: v' = 0.9 · [1, −2] + 0.1 · [3, 0] = [1.2, −1.8], the same step)
    assert torch.allclose(theta["a"], T(2.2, -3.8), rtol=1e-6)
    # a Δ̄ that never changes: the step stays Δ̄ every round (v stays at 10 Δ̄) ...
    s, old = FedAvgM(), FedAvgM(opts(FedAvgM, server_learning_rate=1.0, warm_start=False))
    g, h = {"a": T(0.0)}, {"a": T(0.0)}
    for r in range(1, 31):
        new_g, _ = s.aggregate(r, g, [client(0, 1, a=[g["a"].item() + 1.0])])
        new_h, _ = old.aggregate(r, h, [client(0, 1, a=[h["a"].item() + 1.0])])
        step, old_step = (new_g["a"] - g["a"]).item(), (new_h["a"] - h["a"]).item()
        assert abs(step - 1.0) < 1e-5, (r, step)
        g, h = new_g, new_h
    # ... where η = 1 from zero (the former default) has grown to 1 + 0.9 + ... + 0.9^29 = (1 − 0.9^30) / 0.1
    assert abs(old_step - (1 - 0.9 ** 30) / 0.1) < 1e-3


# ---------------------------------------------------------------- the adaptive family (Reddi et al.)

def _two_rounds(cls, **o):
    """Two rounds from θ = [1, 0]; the pseudo-gradients are Δ̄ = [2, 1], then [-1, 3] (worked out below)."""
    s = cls(opts(cls, **o))
    theta = {"a": T(1.0, 0.0)}
    # Round 1, deltas: client 0 (n=1) [2, 4], client 1 (n=3) [2, 0] -> Δ̄ = [2, 1]
    theta1, _ = s.aggregate(1, theta, [client(0, 1, a=[3.0, 4.0]), client(1, 3, a=[3.0, 0.0])])
    # Round 2, one client (n=5), delta [-1, 3]
    theta2, _ = s.aggregate(2, theta1, [client(0, 5, a=[theta1["a"][0].item() - 1.0, theta1["a"][1].item() + 3.0])])
    return s, theta1["a"].double(), theta2["a"].double()


def _close(t, values):
    assert torch.allclose(t, torch.tensor(values, dtype=torch.float64), rtol=1e-6, atol=1e-7), (t, values)


def test_fedadam_hand_computed():
    s, t1, t2 = _two_rounds(FedAdam, eta=0.1, beta_1=0.5, beta_2=0.75, tau=0.5, warm_start=False)
    # v starts at tau² = 0.25, m at 0.
    # round 1, Δ̄ = [2, 1]: m = 0.5·[2, 1] = [1, 0.5]; v = 0.75·0.25 + 0.25·[4, 1] = [1.1875, 0.4375]
    m1, v1 = [1.0, 0.5], [0.75 * 0.25 + 0.25 * 4, 0.75 * 0.25 + 0.25 * 1]
    e1 = [1.0 + 0.1 * m1[0] / (math.sqrt(v1[0]) + 0.5), 0.0 + 0.1 * m1[1] / (math.sqrt(v1[1]) + 0.5)]
    _close(t1, e1)
    # round 2, Δ̄ = [-1, 3]: m = 0.5·m1 + 0.5·Δ̄; v = 0.75·v1 + 0.25·Δ̄² (the update squared, not m²)
    m2 = [0.5 * 1.0 + 0.5 * -1.0, 0.5 * 0.5 + 0.5 * 3.0]
    v2 = [0.75 * v1[0] + 0.25 * 1.0, 0.75 * v1[1] + 0.25 * 9.0]
    _close(t2, [e1[i] + 0.1 * m2[i] / (math.sqrt(v2[i]) + 0.5) for i in range(2)])
    _close(s.state_dict()["v/a"], v2)


def test_fedyogi_hand_computed():
    s, t1, t2 = _two_rounds(FedYogi, eta=0.1, beta_1=0.5, beta_2=0.75, tau=0.5, warm_start=False)
    # round 1, Δ̄² = [4, 1] > v0 = 0.25: sign(v − Δ̄²) = −1, v = 0.25 + 0.25·Δ̄² = [1.25, 0.5]
    m1, v1 = [1.0, 0.5], [0.25 + 0.25 * 4, 0.25 + 0.25 * 1]
    e1 = [1.0 + 0.1 * m1[0] / (math.sqrt(v1[0]) + 0.5), 0.1 * m1[1] / (math.sqrt(v1[1]) + 0.5)]
    _close(t1, e1)
    # round 2, Δ̄² = [1, 9]: coordinate 0 has v = 1.25 > 1 -> v shrinks by 0.25·1; coordinate 1 grows by 0.25·9
    m2 = [0.0, 1.75]
    v2 = [1.25 - 0.25 * 1.0, 0.5 + 0.25 * 9.0]
    _close(t2, [e1[i] + 0.1 * m2[i] / (math.sqrt(v2[i]) + 0.5) for i in range(2)])
    _close(s.state_dict()["v/a"], v2)


def test_fedadagrad_hand_computed():
    s, t1, t2 = _two_rounds(FedAdagrad, eta=0.1, beta_1=0.0, tau=0.5, warm_start=False)
    # m = Δ̄ (β1 = 0); v = 0.25 + Σ Δ̄²
    v1 = [0.25 + 4, 0.25 + 1]
    e1 = [1.0 + 0.1 * 2 / (math.sqrt(v1[0]) + 0.5), 0.1 * 1 / (math.sqrt(v1[1]) + 0.5)]
    _close(t1, e1)
    v2 = [v1[0] + 1, v1[1] + 9]
    _close(t2, [e1[0] + 0.1 * -1 / (math.sqrt(v2[0]) + 0.5), e1[1] + 0.1 * 3 / (math.sqrt(v2[1]) + 0.5)])


def test_fedadam_warm_start_hand_computed():
    s, t1, t2 = _two_rounds(FedAdam, eta=0.1, beta_1=0.5, beta_2=0.75, tau=0.5, warm_start=True)
    # round 1: m = Δ̄ = [2, 1] (not 0.5 · Δ̄); v as from zero: 0.75 · 0.25 + 0.25 · Δ̄²
    m1, v1 = [2.0, 1.0], [0.75 * 0.25 + 0.25 * 4, 0.75 * 0.25 + 0.25 * 1]
    e1 = [1.0 + 0.1 * m1[0] / (math.sqrt(v1[0]) + 0.5), 0.1 * m1[1] / (math.sqrt(v1[1]) + 0.5)]
    _close(t1, e1)
    # round 2, Δ̄ = [-1, 3]: m = 0.5 · [2, 1] + 0.5 · [-1, 3] = [0.5, 2]
    m2, v2 = [0.5, 2.0], [0.75 * v1[0] + 0.25 * 1.0, 0.75 * v1[1] + 0.25 * 9.0]
    _close(t2, [e1[i] + 0.1 * m2[i] / (math.sqrt(v2[i]) + 0.5) for i in range(2)])


def test_fedadam_defaults_derive_tau_and_eta_so_round_1_is_fedavgs_step_hand_computed():
    """tau = the median |Δ̄| over the coordinates that moved; eta so the first step has FedAvg's norm ‖Δ̄‖.
    The former defaults (tau 1e-6, eta 1e-3, m from 0) made the step eta · sign(Δ̄): every coordinate the
    same size, the smallest amplified |Δ̄_max| / |Δ̄_min| = 80 times relative to the largest."""
    d = [4e-3, 1e-4, -2e-4, 3e-4, 0.0, -5e-5]  # one coordinate no client moved
    s = FedAdam()
    new, _ = s.aggregate(1, {"a": torch.zeros(6)}, [client(0, 1, a=d)])
    # the moved |Δ̄|, sorted: 5e-5, 1e-4, 2e-4, 3e-4, 4e-3 -> median 2e-4 (with the 0 it would be 1e-4)
    tau = 2e-4
    assert s.derived()["tau"] == pytest.approx(tau, rel=1e-6)
    # m = Δ̄ (warm start); v = 0.99 · tau² + 0.01 · Δ̄²; u = m / (√v + tau)
    u = [x / (math.sqrt(0.99 * tau ** 2 + 0.01 * x * x) + tau) for x in d]
    fedavg_norm = math.sqrt(sum(x * x for x in d))
    eta = fedavg_norm / math.sqrt(sum(x * x for x in u))
    assert s.derived()["eta"] == pytest.approx(eta, rel=1e-6)
    _close(new["a"].double(), [eta * x for x in u])
    assert new["a"].double().norm().item() == pytest.approx(fedavg_norm, rel=1e-6)  # FedAvg's step, in norm
    # per-coordinate gain |step| / |Δ̄|: the smallest coordinate gets 1.6 times the largest's, not 80 times
    gain = [abs(new["a"][i].item() / d[i]) for i in (0, 5)]
    assert 1.5 < gain[1] / gain[0] < 1.7  # (√(0.99 tau² + 0.01 · 16e-6) + tau) / (√(0.99 tau² + 0.01 · 25e-10) + tau)
    old = FedAdam(opts(FedAdam, eta=1e-3, tau=1e-6, warm_start=False))
    sign, _ = old.aggregate(1, {"a": torch.zeros(6)}, [client(0, 1, a=d)])
    moved = [i for i in range(6) if d[i]]
    assert all(0.8e-3 < abs(sign["a"][i].item()) <= 1e-3 for i in moved)  # about eta · sign(Δ̄)
    assert abs(sign["a"][5].item() / d[5]) > 50 * abs(sign["a"][0].item() / d[0])
    # the derived values are part of the state: a resumed strategy takes the same next step
    b = FedAdam()
    b.load_state_dict({k: v.clone() for k, v in s.state_dict().items()})
    assert b.derived() == s.derived()
    u2 = client(0, 1, a=[x + 1e-4 for x in new["a"].tolist()])
    assert torch.equal(s.aggregate(2, new, [u2])[0]["a"], b.aggregate(2, new, [u2])[0]["a"])


def test_derived_tau_waits_for_a_round_in_which_something_moved():
    s = FedYogi()
    g = {"a": T(1.0, 2.0)}
    new, used = s.aggregate(1, g, [client(0, 3, a=[1.0, 2.0])])  # Δ̄ = 0: nothing to measure
    assert used == 1 and torch.equal(new["a"], g["a"]) and s.derived() == {} and s.state_dict() == {}
    new, _ = s.aggregate(2, g, [client(0, 3, a=[1.5, 2.0])])  # Δ̄ = [0.5, 0]: tau = 0.5, the one that moved
    assert s.derived()["tau"] == 0.5 and torch.allclose(new["a"], T(1.5, 2.0))  # one coordinate: FedAvg's step


def test_adaptive_state_round_trips():
    for cls in (FedAdam, FedYogi, FedAdagrad, FedAvgM, Scaffold):
        a = cls(num_clients=4)
        g = {"a": T(1.0, 0.0)}
        extra = {"control_delta": {"a": [0.5, 0.5]}} if cls is Scaffold else {}
        for r in (1, 2):
            a.configure(r, 0, g, 0)
            g, _ = a.aggregate(r, g, [upd(0, 2, adapter={"a": [g["a"][0].item() + 0.1, -0.2]}, **extra)])
        b = cls(num_clients=4)
        b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
        ins_a, ins_b = a.configure(3, 0, g, 2), b.configure(3, 0, g, 2)
        assert all(torch.equal(ins_a.arrays[k]["a"], ins_b.arrays[k]["a"]) for k in ins_a.arrays), cls.name
        u = upd(0, 2, adapter={"a": [0.3, 0.4]}, **extra)
        assert torch.equal(a.aggregate(3, g, [u])[0]["a"], b.aggregate(3, g, [u])[0]["a"]), cls.name


# ---------------------------------------------------------------- fedprox

def test_fedprox_gradient_equals_autograd_of_the_proximal_term():
    torch.manual_seed(0)
    start = {"w": torch.randn(4, 3), "b": torch.randn(5)}
    params = {k: torch.nn.Parameter(v + 0.1 * torch.randn_like(v)) for k, v in start.items()}
    raw = {k: torch.randn_like(v) for k, v in start.items()}
    mu = 0.37
    # autograd of (mu / 2) · ‖θ − θ_global‖², added to the loss's own gradient
    ref = {k: torch.nn.Parameter(p.detach().clone()) for k, p in params.items()}
    prox = sum((ref[k] - start[k]).pow(2).sum() for k in ref) * (mu / 2)
    prox.backward()
    for k, p in params.items():
        p.grad = raw[k].clone()
    s = FedProx(opts(FedProx, proximal_mu=mu))
    ins = s.configure(1, 0, start, 0)
    assert ins.config["proximal_mu"] == mu
    algo = ProxClient(ins, None)
    algo.on_grads(params)
    for k in params:
        assert torch.allclose(params[k].grad, raw[k] + ref[k].grad, atol=1e-6), k
    # the metric: ‖μ(θ − θ_global)‖ / ‖g‖ over the whole adapter, g the loss gradient before the term
    pull = mu * math.sqrt(sum(float((params[k].detach() - start[k]).pow(2).sum()) for k in params))
    grad = math.sqrt(sum(float(raw[k].pow(2).sum()) for k in params))
    assert algo.metrics()["prox_ratio"] == pytest.approx(pull / grad, rel=1e-5)


# ---------------------------------------------------------------- scaffold

def test_scaffold_client_corrects_gradients_and_keeps_the_mean_gradient():
    c = {"w": T(1.0, -1.0)}
    ins = FitIns(2, 0, {"global": {"w": T(0.0, 0.0)}, "control": c}, {"state_round": 1})
    algo = ScaffoldClient(ins, {"w": T(0.5, 0.5)})  # c_k from the client's last round
    p = torch.nn.Parameter(T(0.0, 0.0))
    seen = []
    for g in ([2.0, 4.0], [0.0, -2.0]):
        p.grad = T(*g)
        algo.on_grads({"w": p})
        seen.append(p.grad.clone())
    # corrected gradient = g + (c − c_k) = g + [0.5, −1.5]
    assert torch.equal(seen[0], T(2.5, 2.5)) and torch.equal(seen[1], T(0.5, -3.5))
    arrays, state = algo.finish({"w": p})
    # c_k⁺ = mean raw gradient = [1, 1]; Δc_k = c_k⁺ − c_k = [0.5, 0.5]
    assert torch.equal(state["w"], T(1.0, 1.0))
    assert torch.equal(arrays["control_delta"]["w"], T(0.5, 0.5))


def test_scaffold_server_hand_computed():
    s = Scaffold(num_clients=4)
    g = {"a": T(0.0, 0.0)}
    ins = s.configure(1, 0, g, 0)
    assert torch.equal(ins.arrays["control"]["a"], T(0.0, 0.0))  # c starts at zero
    new, _ = s.aggregate(1, g, [upd(0, 1, adapter={"a": [1.0, 0.0]}, control_delta={"a": [2.0, 4.0]}),
                                upd(1, 3, adapter={"a": [0.0, 1.0]}, control_delta={"a": [2.0, 0.0]})])
    # θ: example-weighted mean change [0.25, 0.75]; c = 0 + (1/N = 1/4) · ([2, 4] + [2, 0]) = [1, 1]
    assert torch.equal(new["a"], T(0.25, 0.75))
    assert torch.equal(s.configure(2, 3, new, 0).arrays["control"]["a"], T(1.0, 1.0))


def test_scaffold_local_sgd_takes_plain_sgd_steps_on_the_corrected_gradient_hand_computed():
    s = Scaffold(opts(Scaffold, local_optimizer="sgd", local_lr=0.1), num_clients=4)
    ins = s.configure(1, 0, {"w": T(1.0, -2.0)}, 0)
    assert (ins.config["local_optimizer"], ins.config["local_lr"]) == ("sgd", 0.1)
    assert "local_optimizer" not in Scaffold(num_clients=4).configure(1, 0, {"w": T(0.0, 0.0)}, 0).config
    ins = FitIns(2, 0, {"global": {"w": T(1.0, -2.0)}, "control": {"w": T(1.0, -1.0)}}, ins.config)
    algo = ScaffoldClient(ins, {"w": T(0.5, 0.5)})
    p = torch.nn.Parameter(T(1.0, -2.0))
    train = SimpleNamespace(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)  # AdamW's settings: not used by SGD
    opt = algo.make_optimizer([p], train)
    assert type(opt) is torch.optim.SGD
    p.grad = T(2.0, 4.0)
    algo.on_grads({"w": p})
    opt.step()
    # corrected gradient g + c − c_k = [2, 4] + [0.5, −1.5] = [2.5, 2.5]; θ = [1, −2] − 0.1 · [2.5, 2.5]
    assert torch.allclose(p.detach(), T(0.75, -2.25), rtol=0, atol=1e-7)
    # local_lr = 0: train.lr · √d / train.max_grad_norm, d = 16 coordinates: 1e-3 · 4 / 0.5 = 8e-3
    derived = ScaffoldClient(FitIns(1, 0, {"global": {}, "control": {}}, {"local_optimizer": "sgd", "local_lr": 0.0}),
                             None)
    q = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(13))]
    opt = derived.make_optimizer(q, SimpleNamespace(lr=1e-3, weight_decay=0.0, max_grad_norm=0.5))
    assert opt.param_groups[0]["lr"] == pytest.approx(8e-3)
    with pytest.raises(FeditError, match="set train.max_grad_norm > 0 or strategy.local_lr"):
        derived.make_optimizer(q, SimpleNamespace(lr=1e-3, weight_decay=0.0, max_grad_norm=0.0))
    # the default is AdamW, as for every strategy
    assert type(ScaffoldClient(FitIns(1, 0, {"global": {}, "control": {}}), None).make_optimizer(q, train)) \
        is torch.optim.AdamW


def test_scaffold_local_sgd_runs_in_the_client_loop(tiny_model_dir, partition_dir):
    """One step of the real client loop with local SGD at rate 0.5 and c = c_k = 0: the adapter moves by
    exactly −0.5 · g, g the step's gradient (which the client keeps as its c_k⁺); AdamW would move each
    weight by ±lr instead."""
    from fedit import client, runner
    from conftest import tiny_config

    cfg = tiny_config(tiny_model_dir, partition_dir, partition_dir / "unused",
                      train={"max_steps": 1, "max_grad_norm": 0.0})
    prep = runner.prepare(cfg)
    start = prep.loaded.initial_adapter
    control = {k: torch.zeros_like(v) for k, v in start.items()}
    ins = FitIns(1, 0, {"global": start, "control": control}, {"state_round": 0, "local_optimizer": "sgd",
                                                                 "local_lr": 0.5})
    update, state = client.train(prep.loaded, ins, prep.clients.examples(0), cfg.train, 5, ScaffoldClient, None)
    for k in start:
        assert torch.allclose(update.adapter[k], start[k] - 0.5 * state[k], rtol=1e-6, atol=1e-9), k
    assert any(state[k].abs().max() > 0 for k in start)


# ---------------------------------------------------------------- degenerate settings == fedavg, end to end

def _run(tmp_path, tiny_model_dir, partition_dir, name, strategy, rounds=3, **options):
    from fedit import runner
    from conftest import tiny_config

    cfg = tiny_config(tiny_model_dir, partition_dir, tmp_path / name,
                      federation={"rounds": rounds, "clients_per_round": 2, "strategy": strategy}, strategy=options)
    runner.run(cfg)
    from fedit.adapter import load_adapter_file

    return [load_adapter_file(tmp_path / name / "rounds" / f"round_{r:04d}") for r in range(rounds + 1)]


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_degenerate_settings_are_fedavg_bit_for_bit(tmp_path, tiny_model_dir, partition_dir):
    ref = _run(tmp_path, tiny_model_dir, partition_dir, "fedavg", "fedavg")
    assert not _equal(ref[1], ref[0])  # training moved the adapter: the comparisons below can fail
    prox = _run(tmp_path, tiny_model_dir, partition_dir, "prox0", "fedprox", proximal_mu=0.0)
    mom = _run(tmp_path, tiny_model_dir, partition_dir, "mom0", "fedavgm", server_momentum=0.0, server_learning_rate=1.0)
    scaf = _run(tmp_path, tiny_model_dir, partition_dir, "scaffold", "scaffold")
    for r in range(4):
        assert _equal(prox[r], ref[r]) and _equal(mom[r], ref[r]), r
    # SCAFFOLD: every control variate is zero in round 1, so that round is FedAvg's; after it, c moves
    assert _equal(scaf[1], ref[1]) and not _equal(scaf[3], ref[3])
    # and the settings that should differ do
    prox = _run(tmp_path, tiny_model_dir, partition_dir, "prox1", "fedprox", rounds=1, proximal_mu=10.0)
    assert not _equal(prox[1], ref[1])


def test_extra_loss_hook_equals_the_same_term_as_a_gradient(tiny_model_dir, partition_dir):
    """The extra-loss hook adds its term's gradient once per optimizer step (not per micro-batch)."""
    from fedit import client, runner
    from fedit.protocol import ClientAlgorithm
    from conftest import tiny_config

    class AsLoss(ClientAlgorithm):  # (1/2)·Σ θ² as a loss term ...
        def extra_loss(self, params):
            return sum(p.pow(2).sum() for p in params.values()) * 0.5

    class AsGrad(ClientAlgorithm):  # ... and its gradient θ, added by hand
        def on_grads(self, params):
            for p in params.values():
                p.grad.add_(p.detach())

    cfg = tiny_config(tiny_model_dir, partition_dir, partition_dir / "unused", train={"max_steps": 2})
    prep = runner.prepare(cfg)
    ins = FitIns(1, 0, {"global": prep.loaded.initial_adapter})
    exs = prep.clients.examples(0)
    plain, _ = client.train(prep.loaded, ins, exs, cfg.train, 5)
    a, _ = client.train(prep.loaded, ins, exs, cfg.train, 5, AsLoss)
    b, _ = client.train(prep.loaded, ins, exs, cfg.train, 5, AsGrad)
    assert _equal(a.adapter, b.adapter) and not _equal(a.adapter, plain.adapter)


def test_scaffold_correction_reaches_the_gradient_before_adamw(tiny_model_dir, partition_dir):
    """With a huge correction c − c_k = +1000 on every weight, AdamW's first step moves every weight by
    exactly −lr (Adam's first step is lr · sign of its gradient). Were the correction applied to the
    parameters after the step, the weights would move by the sign of their own gradients instead."""
    from fedit import client, runner
    from conftest import tiny_config

    cfg = tiny_config(tiny_model_dir, partition_dir, partition_dir / "unused",
                      train={"max_steps": 1, "max_grad_norm": 0.0, "lr": 1e-3})
    prep = runner.prepare(cfg)
    start = prep.loaded.initial_adapter
    control = {k: torch.full_like(v, 1000.0) for k, v in start.items()}
    ins = FitIns(1, 0, {"global": start, "control": control}, {"state_round": 0})
    update, state = client.train(prep.loaded, ins, prep.clients.examples(0), cfg.train, 5, ScaffoldClient, None)
    for k in start:
        moved = update.adapter[k].double() - start[k].double()
        assert torch.allclose(moved, torch.full_like(moved, -1e-3), rtol=1e-3, atol=1e-6), k
    # c_k⁺ is the raw gradient (one step), which is small: the correction is not in it
    assert max(v.abs().max().item() for v in state.values()) < 100
    assert any(v.abs().max() > 0 for v in state.values())


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedprox"])
def test_every_strategy_trains_and_lowers_the_heldout_loss(tmp_path, tiny_model_dir, partition_dir, name):
    from fedit import server

    _run(tmp_path, tiny_model_dir, partition_dir, name, name, rounds=2)  # each at its default options
    losses = [r["eval"]["loss"] for r in server.RunDir(tmp_path / name).events("round")]
    assert losses[2] < losses[0], losses
