"""Secure aggregation without a network: the maths of a secure sum in the strategies and the DP
mechanism, what a client sends, how the runtime and the round loop treat a sum, and what is refused.
The SecAgg+ protocol itself runs on real SuperNodes in tests/test_flower.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedit import config, runner, server
from fedit.config import PrivacyConfig
from fedit.errors import FeditError
from fedit.protocol import ADAPTER, CLIP, Failure, FitIns, Summed, Update
from fedit.strategies import FedAdam, FedAvg

from conftest import tiny_config


def l2(arrays) -> float:
    return math.sqrt(sum(float(np.square(np.asarray(a, dtype=np.float64)).sum()) for a in arrays))


def test_fedavg_on_a_secure_sum_steps_by_the_sum_over_its_clients():
    theta = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([[0.5]])}
    total = {"w": torch.tensor([0.3, -0.6], dtype=torch.float64), "v": torch.tensor([[0.9]], dtype=torch.float64)}
    new, used = FedAvg().aggregate(1, theta, iter([Summed([4, 7, 9], {ADAPTER: total})]))
    assert used == 3
    assert torch.allclose(new["w"], torch.tensor([1.1, 1.8])) and torch.allclose(new["v"], torch.tensor([[0.8]]))
    assert new["w"].dtype == torch.float32


@pytest.mark.parametrize("strategy", [FedAvg, FedAdam])
def test_a_secure_sum_is_bit_identical_to_its_changes_sent_one_by_one_with_one_example_each(strategy):
    g = torch.Generator().manual_seed(0)
    theta = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    changes = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.01 for k, v in theta.items()}
               for _ in range(3)]
    plain = [Update(i, {ADAPTER: {k: (theta[k].double() + d[k]).float() for k in theta}}, 1) for i, d in
             enumerate(changes)]
    # the sum of exactly what the plain path sees, θ_k − θ in float64, in the same order
    seen = [{k: u.adapter[k].double() - theta[k].double() for k in theta} for u in plain]
    total = {k: torch.zeros_like(theta[k], dtype=torch.float64).add_(seen[0][k]).add_(seen[1][k]).add_(seen[2][k])
             for k in theta}
    a, b = strategy(), strategy()
    new_plain, n_plain = a.aggregate(1, theta, iter(plain))
    new_secure, n_secure = b.aggregate(1, theta, iter([Summed([0, 1, 2], {ADAPTER: total})]))
    assert n_plain == n_secure == 3
    assert all(torch.equal(new_plain[k], new_secure[k]) for k in theta)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_dp_on_a_secure_sum_is_bit_identical_to_dp_on_the_clipped_changes():
    """The DP mechanism given the clients' (already clipped) changes one by one, or their sum and their
    count of unclipped ones: the same noised mean and the same next clipping bound."""
    from fedit import privacy

    def mechanism():
        dp = privacy.ClientDP(PrivacyConfig(enabled=True, clipping_norm=1.0, noise_multiplier=1.0, adaptive=True,
                                            count_noise=1.0), 4, 20, 10)
        dp.generator.manual_seed(3)
        return dp

    changes = [{"w": torch.tensor([0.6, 0.8], dtype=torch.float64)},  # on the bound: counted unclipped
               {"w": torch.tensor([0.1, 0.0], dtype=torch.float64)},
               {"w": torch.tensor([0.0, -0.5], dtype=torch.float64)}]
    one_by_one, summed = mechanism(), mechanism()
    mean = one_by_one.combiner({"w": torch.zeros(2)})
    for d in changes:
        mean.add(d, 1)
    expected = mean.result()
    mean = summed.combiner({"w": torch.zeros(2)})
    total = torch.zeros(2, dtype=torch.float64).add_(changes[0]["w"]).add_(changes[1]["w"]).add_(changes[2]["w"])
    mean.add_sum({"w": total}, 3, 3.0)
    got = mean.result()
    assert torch.equal(got["w"], expected["w"])
    assert summed.clip == one_by_one.clip != 1.0 and summed.rounds_done == 1


def _update(glob, new):
    return FitIns(1, 0, {"global": glob}, {}), Update(0, {ADAPTER: new}, 5)


def test_a_client_sends_its_change_not_its_adapter_in_name_order():
    from fedit.runtime.flower import secure_change

    glob = {"b": torch.tensor([1.0]), "a": torch.tensor([[0.0, 2.0]])}
    ins, up = _update(glob, {"a": torch.tensor([[3.0, 2.0]]), "b": torch.tensor([-3.0])})
    arrays, clipped = secure_change(ins, up, {"clipping-range": 3.5, "quantization-range": 1024})
    # sorted by name: a, then b; Δ, not the adapter; no DP value; one value (−4) beyond ±3.5
    assert [a.tolist() for a in arrays] == [[[3.0, 0.0]], [-4.0]] and clipped == 1
    assert all(a.dtype == np.float64 for a in arrays)


def test_under_dp_a_client_clips_so_that_its_quantised_change_stays_within_c():
    """Worked by hand: Δ = (3, 4), C = 1, Q = 1024, d = 2: the clip is to 1 − 2√2/1024, and the last
    value is 0 (clipped). Then the direction that matters: Flower's own stochastic quantisation of a
    change clipped to exactly C leaves the ball in most draws; of one clipped to fedit's bound, never."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from fedit.runtime.flower import secure_change

    glob = {"a": torch.tensor([0.0, 0.0])}
    ins, up = _update(glob, {"a": torch.tensor([3.0, 4.0])})
    ins = FitIns(1, 0, ins.arrays, {CLIP: 1.0})
    arrays, _ = secure_change(ins, up, {"clipping-range": 1.0, "quantization-range": 1024})
    inner = 1 - 2 * math.sqrt(2) / 1024
    assert np.allclose(arrays[0], [0.6 * inner, 0.8 * inner], rtol=0, atol=1e-15) and arrays[1].tolist() == [0.0]
    small = {"a": torch.tensor([0.03, 0.0])}
    arrays, _ = secure_change(ins, Update(0, {ADAPTER: small}, 5), {"clipping-range": 1.0, "quantization-range": 1024})
    assert arrays[1].tolist() == [1.0]  # not clipped: C·1

    d, q, c = 1000, 2 ** 10, 1.0
    rng = np.random.default_rng(0)
    glob = {"a": torch.zeros(d)}
    ins = FitIns(1, 0, {"global": glob}, {CLIP: c})
    outside_at_c, outside_ours = 0, 0
    np.random.seed(0)  # Flower's rounding draws from numpy's global generator
    for _ in range(50):
        v = rng.normal(size=d)
        at_c = v / np.linalg.norm(v) * c
        ours, _ = secure_change(ins, Update(0, {ADAPTER: {"a": torch.from_numpy(v)}}, 1),
                                {"clipping-range": c, "quantization-range": q})
        for arr, counter in ((at_c, "at_c"), (ours[0], "ours")):
            back = dequantize(quantize([arr], c, q), c, q)[0]
            if l2([back]) > c:
                if counter == "at_c":
                    outside_at_c += 1
                else:
                    outside_ours += 1
    assert outside_at_c > 25 and outside_ours == 0


class SecureRuntime:
    """A runtime that hands the round loop a sum, as FlowerRuntime does under SecAgg+."""

    secure = True

    def __init__(self, total, drop=(2,)):
        self.total, self.drop, self.seen = total, drop, []

    def fit(self, round_num, instructions):
        self.seen.append(instructions)
        ids = [i.client_id for i in instructions]
        for c in ids:
            if c in self.drop:
                yield Failure(c, "left the round during secure aggregation")
        kept = [c for c in ids if c not in self.drop]
        yield Summed(kept, {ADAPTER: self.total}, 2.0 if CLIP in instructions[0].config else None,
                     {c: {"seconds": 1.0, "num_examples": -5} for c in kept})


def _loop(tmp_path, runtime, **sections):
    cfg = tiny_config(tmp_path, tmp_path, tmp_path / "run", federation={"rounds": 1, "clients_per_round": 4},
                      eval={"every": 0}, secagg={"enabled": True}, **sections)
    theta = {"x.lora_A.weight": torch.tensor([[1.0, 2.0]]), "x.lora_B.weight": torch.tensor([[0.5]])}
    final = server.run(cfg, runtime, tmp_path / "run", client_ids=[0, 1, 2, 3], initial_adapter=theta,
                       save_adapter=lambda a, p: p.mkdir(parents=True, exist_ok=True))
    return theta, final, server.RunDir(tmp_path / "run")


def test_the_round_loop_steps_on_a_secure_sum_and_logs_each_of_its_clients(tmp_path):
    total = {"x.lora_A.weight": torch.tensor([[0.2, -0.4]], dtype=torch.float64),
             "x.lora_B.weight": torch.tensor([[0.1]], dtype=torch.float64)}
    theta, final, rd = _loop(tmp_path, SecureRuntime(total))
    # θ + Σ/3: clients 0, 1 and 3 (client 2 left)
    assert torch.allclose(final["x.lora_A.weight"], torch.tensor([[1.0 + 0.2 / 3, 2.0 - 0.4 / 3]]))
    assert torch.allclose(final["x.lora_B.weight"], torch.tensor([[0.5 + 0.1 / 3]]))
    rows = {c["client"]: c for c in rd.events("client")}
    assert rows[0]["accepted"] and rows[0]["secure"] and "num_examples" not in rows[0]
    assert rows[0]["metrics"] == {"seconds": 1.0, "num_examples": -5}  # a metric, never the server's field
    assert not rows[2]["accepted"] and "secure aggregation" in rows[2]["reason"]
    assert rd.events("round")[1]["accepted"] == 3


def test_under_dp_the_loop_sends_each_client_the_bound_to_clip_to(tmp_path):
    total = {"x.lora_A.weight": torch.zeros(1, 2, dtype=torch.float64),
             "x.lora_B.weight": torch.zeros(1, 1, dtype=torch.float64)}
    rt = SecureRuntime(total)
    _loop(tmp_path, rt, privacy={"enabled": True, "clipping_norm": 0.25})
    assert [i.config[CLIP] for i in rt.seen[0]] == [0.25] * 4
    assert not runner.Simulation.secure  # the in-process runtime hands the loop single updates


def test_a_sum_of_the_wrong_shape_is_rejected_whole_and_the_run_stops(tmp_path):
    total = {"x.lora_A.weight": torch.zeros(2, 2, dtype=torch.float64),
             "x.lora_B.weight": torch.zeros(1, 1, dtype=torch.float64)}
    with pytest.raises(FeditError, match="fewer than federation.min_replies"):
        _loop(tmp_path, SecureRuntime(total))
    rows = server.RunDir(tmp_path / "run").events("client")
    assert [r["accepted"] for r in rows] == [False] * 4
    assert all("shape" in r["reason"] for r in rows if r["client"] != 2)


class FakeNodes:
    def __init__(self, by_client):
        self.by_client, self.node_wait = by_client, 1.0

    def refresh(self, wait=None):
        pass


class SecAggGrid:
    """A Grid whose nodes answer with Flower's real client mod (secaggplus_mod) in-process: node n
    sends ``vectors[n]`` as its change; ``leave[n] = stage`` makes it fail from that stage on
    (0 key setup, 1 key sharing, 2 training and masking, 3 unmasking); ``tamper`` may edit a reply."""

    def __init__(self, vectors, leave=None, tamper=None):
        from types import SimpleNamespace

        from flwr.app import Context, RecordDict

        self.run = SimpleNamespace(run_id=1)
        self.vectors, self.leave, self.tamper, self.stage = vectors, leave or {}, tamper, 0
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in vectors}

    def send_and_receive(self, messages, timeout=None):
        import copy

        from flwr.app import Error, Message

        from fedit.runtime.flower_secagg import secagg_if_configured, secure_reply

        out = []
        for m in messages:
            m, n = copy.deepcopy(m), m.metadata.dst_node_id
            if self.leave.get(n, 99) <= self.stage:
                out.append(Message(Error(5, f"node {n} left"), reply_to=m))
                continue
            reply = secagg_if_configured(m, self.contexts[n], lambda msg, ctx, n=n: Message(
                secure_reply([np.asarray(a, dtype=np.float64) for a in self.vectors[n]], {"fedit.client-id": n - 10}),
                reply_to=msg))
            out.append(self.tamper(self.stage, n, reply) if self.tamper else reply)
        self.stage += 1
        return out


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _secure_round(vectors, leave=None, tamper=None, threshold=0.67):
    from fedit.runtime import flower

    cfg = tiny_config("m", "c", "o", secagg={"enabled": True, "reconstruction_threshold": threshold},
                      federation={"clients_per_round": 5})
    theta = {"b": torch.zeros(1, dtype=torch.float64), "a": torch.zeros(2, dtype=torch.float64)}
    nodes = FakeNodes({n - 10: n for n in vectors})
    rt = flower.FlowerRuntime(grid=SecAggGrid(vectors, leave, tamper), cfg=cfg, nodes=nodes)
    ins = [FitIns(1, n - 10, {"global": theta}, {}) for n in sorted(vectors)]
    return list(rt.fit(1, ins))


# node n: its change to "a" (2 values) then to "b" (1 value), sorted by name as clients send them
VECTORS = {10: [[0.1, -0.2], [0.3]], 11: [[0.3, 0.5], [-0.1]], 12: [[-0.7, 0.05], [0.0]], 13: [[0.2, 0.2], [0.9]],
           14: [[0.0, 1.0], [-0.5]]}


def test_flowers_secagg_plus_in_process_gives_the_sum_of_the_clients_that_stayed(task_identity):
    """Flower's own client mod and workflow, without a network: the unmasked sum of five clients equals
    the plain sum within n·2c/Q; a client that leaves at any stage is left out of it, with the stage."""
    from fedit.runtime.flower_secagg import error_bound

    def expect(out, gone):
        *failures, s = out
        kept = [n for n in sorted(VECTORS) if n not in gone]
        assert [f.client_id for f in failures] == [n - 10 for n in sorted(gone)] and isinstance(s, Summed)
        assert s.clients == [n - 10 for n in kept]
        for i, key in enumerate(("a", "b")):
            plain = np.sum([VECTORS[n][i] for n in kept], axis=0)
            assert np.abs(s.adapter[key].numpy() - plain).max() <= error_bound(len(kept), 1.0, 2 ** 22)
        return failures

    expect(_secure_round(VECTORS), set())
    for stage, words in enumerate(("key setup", "key sharing", "training and masking")):
        # (flwr 1.41 alone halts the round when a client leaves at stage 0 or 1)
        failures = expect(_secure_round(VECTORS, leave={12: stage}), {12})
        assert f"failed in SecAgg+ {words}" in failures[0].reason and "node 12 left" in failures[0].reason
    expect(_secure_round(VECTORS, leave={12: 1, 13: 2}), {12, 13})
    expect(_secure_round(VECTORS, leave={12: 3}), set())  # gone after its masked change arrived: still in it


def test_secagg_below_the_threshold_or_under_three_clients_unmasks_nothing(task_identity):
    out = _secure_round(VECTORS, leave={12: 2, 13: 2, 14: 2})  # 2 of 5 left: fewer than 3, the floor
    assert len(out) == 5 and all(isinstance(f, Failure) and "halted" in f.reason for f in out)
    out = _secure_round(VECTORS, leave={12: 2}, threshold=1.0)
    assert all(isinstance(f, Failure) and "halted" in f.reason for f in out)
    out = _secure_round({n: VECTORS[n] for n in (10, 11)})
    assert len(out) == 2 and all("at least three clients" in f.reason for f in out)


def test_a_client_that_tampers_with_its_masked_weight_gets_the_sum_rejected(task_identity):
    """A client can change the weight factor inside its masked vector: the unmasked 'sum' is then finite,
    well-shaped and huge. The runtime rejects any sum beyond what n clipped clients can add up to."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    def tamper(stage, n, reply):
        if stage == 2 and n == 11:
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            arrays = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
            arrays[0] = (arrays[0] - (5 * 2 ** 22 - 1)) % 2 ** 32  # the total weight becomes 1 instead of 5Q
            record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in arrays]
        return reply

    out = _secure_round(VECTORS, tamper=tamper)
    assert len(out) == 5 and all(isinstance(f, Failure) and "out of range" in f.reason for f in out)


def test_secure_aggregation_refuses_what_needs_single_updates(tmp_path):
    for sections, words in [({"federation": {"aggregator": "median"}}, "cannot take a median"),
                            ({"federation": {"max_update_norm": 1.0}}, "max_update_norm = 0"),
                            ({"federation": {"strategy": "scaffold"}}, "strategy scaffold sends more"),
                            ({"lora": {"client_ranks": [2, 4]}}, "sums changes of one shape"),
                            ({"federation": {"clients_per_round": 2}}, "clients_per_round >= 3"),
                            ({"secagg": {"modulus_range": 3 * 2**22}}, "must be a power of 2")]:
        with pytest.raises(FeditError, match=words):
            tiny_config(tmp_path, tmp_path, tmp_path / "o", secagg={"enabled": True, **sections.pop("secagg", {})},
                        **sections)
    with pytest.raises(FeditError, match="fedit flower run --secure-aggregation"):
        runner.run(tiny_config(tmp_path, tmp_path, tmp_path / "o", secagg={"enabled": True},
                               federation={"clients_per_round": 3}))
    assert not (tmp_path / "o").exists()
    assert config.from_dict({"secagg": {"enabled": True}}).secagg.enabled  # the defaults pass


def test_a_supernode_that_requires_secure_aggregation_refuses_a_plain_round(tmp_path, monkeypatch):
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedit.runtime import flower

    for name, value in (("_run_id", 1), ("_node_id", 5), ("_task_id", 1)):  # as inside a ClientApp process
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = tiny_config(tmp_path, tmp_path, tmp_path / "o")
    content = flower.fitins_to_content(FitIns(1, 0, {"global": {"a": torch.zeros(2)}}, {}), flower.config_to_text(cfg))
    context = Context(run_id=1, node_id=5, node_config={"client-id": 0, "data-path": str(tmp_path / "x.jsonl"),
                                                        "secure-aggregation": True}, state=RecordDict(), run_config={})
    with pytest.raises(FeditError, match="only through secure aggregation"):
        flower._train(Message(content, dst_node_id=5, message_type="train"), context)


def test_under_dp_a_sum_longer_than_its_clients_clipped_changes_can_make_is_rejected():
    """Each value within n·c passes the per-value check, but under DP each honest change has norm at most C,
    so the sum's norm is at most n·C: a client that skipped its clip is caught (issue 28, item 5)."""
    from fedit.runtime.flower import check_sum

    ref = {"a": torch.zeros(100)}
    bound, q, n = 0.5, 2**22, 3
    honest = [np.full(100, 0.04), np.array([bound * 2])]  # three changes of norm ≤ 0.5 each: 1.2 / 1.5 and 2 bits
    total, bits, problem = check_sum(honest, ref, n, bound, bound, q)
    assert problem is None and bits == 2.0 and torch.allclose(total["a"], torch.full((100,), 0.04, dtype=torch.float64))
    # one client sends every value at +c instead of its clipped change: each value 0.5 + 2·0.04 < 3·0.5, but
    # the norm is about 0.58·√100 = 5.8 > 1.5
    skipped = [np.full(100, 0.5 + 0.08), np.array([bound * 3])]
    _, _, problem = check_sum(skipped, ref, n, bound, bound, q)
    assert problem and "skipped its clip" in problem
    # without DP only the per-value range holds: the same sum passes (docs/boundary.md states the weaker bound)
    assert check_sum(skipped[:1], ref, n, bound, 0.0, q)[2] is None


def test_the_bits_count_rounds_half_up_so_one_honest_bit_moves_it_by_one():
    """A tampered masked bit value can put the others' sum at k + 0.5; rounding half to even would then let an
    honest bit move the count by 0 or by 2, rounding half up always by 1 (sensitivity 1/2 after centring)."""
    from fedit.runtime.flower import check_sum

    ref, bound = {"a": torch.zeros(2)}, 0.5
    counts = [check_sum([np.zeros(2), np.array([bound * v])], ref, 5, bound, bound, 2**22)[1]
              for v in (1.5, 2.5, 2.49, 3.5)]
    assert counts == [2.0, 3.0, 2.0, 4.0]  # round() would give 2, 2, 2, 4
