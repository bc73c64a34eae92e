"""The server's trust boundary (fedit/boundary.py, issue 28 items 3, 4 and 7): nothing a reply holds,
in its arrays, its example count or its free-form metrics, crashes the server; what goes on to
metrics.jsonl and the reporters is clean; under DP no per-client figure goes to a reporter.

Each test drives the real round loop (fedit.server.run) with a stand-in runtime on a one-tensor
adapter, so it runs in well under a second, and each names what today's code did with its input."""

from __future__ import annotations

import json
import logging
import random
import re

import pytest
import torch

from fedit import reporting, server
from fedit.errors import FeditError
from fedit.protocol import ADAPTER, Failure, Summed, Update

from conftest import tiny_config

W = torch.ones(3)  # the global adapter: one tensor "w"


class Replies:
    """A runtime that answers each round with what ``make(round, instructions)`` returns."""

    secure = False

    def __init__(self, make, secure: bool = False):
        self.make, self.secure, self.yielded = make, secure, 0

    def fit(self, round_num, instructions):
        for reply in self.make(round_num, instructions):
            self.yielded += 1
            yield reply

    def evaluate(self, round_num, instructions):  # eval.every = 0: never asked
        raise AssertionError("no federated evaluation in these runs")


def honest(ins, metrics=(), n=2):
    return Update(ins.client_id, {ADAPTER: {"w": ins.global_adapter["w"] + 0.01}}, n, {} if metrics == () else metrics)


def config(tmp_path, rounds=2, per_round=2, **sections):
    sections.setdefault("run", {})
    sections["run"] = {"report_to": [], **sections["run"]}
    sections["federation"] = {"rounds": rounds, "clients_per_round": per_round, **sections.get("federation", {})}
    return tiny_config(tmp_path, tmp_path, tmp_path / "run", eval={"every": 0}, **sections)


def run(cfg, runtime, tmp_path, clients=(0, 1), **kw):
    return server.run(cfg, runtime, tmp_path / "run", client_ids=list(clients), initial_adapter={"w": W.clone()},
                      save_adapter=lambda a, p: p.mkdir(parents=True, exist_ok=True), **kw)


def strict_lines(tmp_path):
    """Every line of metrics.jsonl as strict JSON (NaN or Infinity fail the parse)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON {token}")
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


# ---------------------------------------------------------------- item 3: metrics

def test_two_colluding_clients_whose_seconds_sum_to_zero_do_not_stop_the_run(tmp_path):
    """Today: round 1 is committed, then the reporters' arithmetic divides by 1e300 + (−1e300) = 0
    (outside their try, even with run.report_to = []) and round 2 never runs."""
    def make(r, instructions):
        return [honest(ins, {"trained_tokens": 10, "seconds": 1e300 * (1 if i == 0 else -1), "train_loss": 1.0})
                for i, ins in enumerate(instructions)]

    run(config(tmp_path), Replies(make), tmp_path)
    rows = strict_lines(tmp_path)
    assert [r["round"] for r in rows if r["event"] == "round"] == [0, 1, 2]
    clients = [r for r in rows if r["event"] == "client"]
    assert len(clients) == 4 and all(c["accepted"] for c in clients)  # the reply stays; the bad figure goes
    assert all("seconds" not in c["metrics"] and c["metrics"]["trained_tokens"] == 10 for c in clients)
    assert all(any("'seconds'" in why for why in c["metrics_dropped"]) for c in clients)


def test_the_reporters_arithmetic_survives_figures_within_the_bound_that_cancel():
    """±1e15 pass the boundary (finite, within bound): the sum of seconds is still 0. Only positive
    tokens and seconds count towards throughput: client 1 alone, 10 tokens / 1e15 s."""
    row = {"round": 1, "accepted": 2, "rejected": []}
    clients = [{"client": 0, "accepted": True, "metrics": {"trained_tokens": 10, "seconds": 1e15, "train_loss": 2.0}},
               {"client": 1, "accepted": True, "metrics": {"trained_tokens": 10, "seconds": -1e15, "train_loss": 4.0}}]
    s = reporting.scalars(row, clients)
    assert s["train/tokens_per_second"] == 10 / 1e15 and s["train/loss"] == 2.0 and s["train/tokens"] == 10
    assert "client/00001/tokens_per_second" not in s and s["client/00001/seconds"] == -1e15


class SelfHolding(dict):
    pass


def _self_holding():
    d = {"a": 1}
    d["me"] = d
    return d


@pytest.mark.parametrize("metrics, today", [
    (None, "AttributeError in the reporters"),
    ([1, 2, 3], "AttributeError in the reporters"),
    ({"seconds": 10**400}, "OverflowError in the reporters"),
    ({("a", 1): 2.0}, "TypeError in RunDir.append (keys must be str)"),
    (_self_holding(), "ValueError in RunDir.append (circular reference)"),
    ({"note": b"\x00\xff" * 3}, "kept as its repr"),
])
def test_metrics_that_crashed_the_server_are_dropped_with_a_reason(tmp_path, caplog, metrics, today):
    def make(r, instructions):
        return [honest(instructions[0], metrics), honest(instructions[1], {"train_loss": 1.5})]

    with caplog.at_level(logging.WARNING, logger="fedit.server"):
        run(config(tmp_path, rounds=1), Replies(make), tmp_path)
    a, b = [r for r in strict_lines(tmp_path) if r["event"] == "client"]
    assert a["accepted"] and b["accepted"]  # bad metrics do not cost the client its update
    assert a["metrics"] == ({"a": 1} if isinstance(metrics, dict) and "me" in metrics else {})
    assert b["metrics"] == {"train_loss": 1.5} and "metrics_dropped" not in b
    if metrics is not None:  # None is "no metrics", not a problem
        assert a["metrics_dropped"] and "metric" in caplog.text


def test_a_5_mb_metric_string_never_reaches_metrics_jsonl(tmp_path):
    """Today the whole 5 MB string is appended, every round it is sent."""
    def make(r, instructions):
        return [honest(instructions[0], {"note": "x" * 5_000_000, "attack": "none"}), honest(instructions[1])]

    run(config(tmp_path, rounds=1), Replies(make), tmp_path)
    assert (tmp_path / "run/metrics.jsonl").stat().st_size < 20_000
    a = [r for r in strict_lines(tmp_path) if r["event"] == "client"][0]
    assert a["metrics"] == {"attack": "none"} and "5000000 characters" in a["metrics_dropped"][0]


def test_metric_policy_worked_by_hand():
    from fedit.boundary import clean_metrics

    kept, why = clean_metrics({
        "train_loss": 2.5, "steps": 3, "attack": "sign_flip", "flag": True, "num-examples": 10**9, "a/b:c.d": -1e15,
        "big": 1e15 * 1.0000001, "nan": float("nan"), "huge": 10**16, "steps_text": "3", "seconds": "3",
        "": 1, "x" * 65: 1, "bad key": 1, 7: 1, "list": [1], "ctl": "a\nb", "long": "y" * 257, "ok": "y" * 256})
    assert kept == {"train_loss": 2.5, "steps": 3, "attack": "sign_flip", "flag": True, "num-examples": 10**9,
                    "a/b:c.d": -1e15, "steps_text": "3", "ok": "y" * 256}
    assert len(why) == 11  # big, nan, huge, seconds as text, 4 keys, list, control character, 257 characters
    many, why = clean_metrics({f"m{i}": i for i in range(100)})
    assert list(many) == [f"m{i}" for i in range(64)] and why == ["36 entries beyond the first 64 dropped"]


def test_run_dir_append_writes_a_bounded_line_for_what_json_cannot_hold(tmp_path):
    """Today json.dumps raises on each of these and the round's line is lost with the run."""
    rd = server.RunDir(tmp_path)
    loop = {}
    loop["loop"] = loop
    rd.append(event="client", keys={(1, 2): 3}, loop=loop, big=10**5000, raw=b"\x00", text="z" * 2_000_000)
    (row,) = rd.events()
    assert row["keys"] == {"(1, 2)": 3} and row["big"] == "an integer of 16610 bits" and row["raw"] == "b'\\x00'"
    assert len(row["text"]) < 10_100 and (tmp_path / "metrics.jsonl").stat().st_size < 20_000


# ---------------------------------------------------------------- item 4: arrays and counts

REF = {"w": torch.zeros(2, 2)}


@pytest.mark.parametrize("tensor, reason", [
    (lambda: torch.ones(2, 2).to(torch.float8_e4m3fn), "dtype float8_e4m3fn, expected float16, bfloat16"),
    (lambda: torch.ones(2, 2).to(torch.float8_e5m2), "dtype float8_e5m2, expected float16, bfloat16"),
    (lambda: torch.ones(2, 2).to_sparse(), "layout sparse_coo, expected dense"),
    (lambda: torch.ones(2, 2, device="meta"), "device meta, expected cpu"),
])
def test_check_update_rejects_tensors_it_raised_on(tensor, reason):
    """Today: NotImplementedError (isfinite / max of float8, ne of sparse) or RuntimeError (item of meta)."""
    got = server.check_update(Update(0, {ADAPTER: {"w": tensor()}}, 3), REF)
    assert got is not None and reason in got, got


def test_example_counts_without_a_cap_end_at_2_to_the_53():
    ok = Update(0, {ADAPTER: {"w": torch.ones(2, 2)}}, 2**53)
    assert server.check_update(ok, REF) is None
    for n in (2**53 + 1, 10**400, 10**5000):
        got = server.check_update(Update(0, ok.arrays, n), REF)
        assert got is not None and "beyond 2**53" in got, got
    capped = server.check_update(Update(0, ok.arrays, 10**5000), REF, max_examples=7)
    assert "an integer of 16610 bits is more than this client can have trained on (7)" in capped


def test_a_count_of_10_to_the_400_is_a_rejection_not_an_overflow_in_the_mean(tmp_path):
    """Today check_update lets it through (no cap in a deployment without federation.max_examples) and
    Aggregator.add raises converting it to a double: the run dies in round 1."""
    def make(r, instructions):
        return [honest(instructions[0], n=10**400), honest(instructions[1], n=3)]

    final = run(config(tmp_path, rounds=1), Replies(make), tmp_path)
    a, b = [r for r in strict_lines(tmp_path) if r["event"] == "client"]
    assert not a["accepted"] and "beyond 2**53" in a["reason"] and "num_examples" not in a
    assert b["accepted"] and b["num_examples"] == 3
    assert torch.allclose(final["w"], W + 0.01)  # the mean of the one accepted change


def test_accepted_tensors_are_detached_plain_copies(tmp_path):
    """A tensor that requires grad (or a Parameter) is taken as its values: the next global adapter
    carries no autograd graph (safetensors refuses to save one)."""
    def make(r, instructions):
        p = torch.nn.Parameter(instructions[0].global_adapter["w"] + 0.02)
        return [Update(instructions[0].client_id, {ADAPTER: {"w": p}}, 1), honest(instructions[1], n=1)]

    final = run(config(tmp_path, rounds=1), Replies(make), tmp_path)
    assert not final["w"].requires_grad and torch.allclose(final["w"], W + 0.015)


def test_a_secure_sum_that_names_a_client_twice_is_not_used(tmp_path):
    """Today it enters the mean counted as three clients, where two were asked."""
    def make(r, instructions):
        a, b = (ins.client_id for ins in instructions)
        return [Summed([a, a, b], {ADAPTER: {"w": torch.full((3,), 0.03, dtype=torch.float64)}})]

    with pytest.raises(FeditError, match="only 0 valid client update"):
        run(config(tmp_path, rounds=1), Replies(make, secure=True), tmp_path)
    lines = [r for r in strict_lines(tmp_path) if r["event"] == "client"]
    assert len(lines) == 2 and all(not c["accepted"] and "more than once" in c["reason"] for c in lines)


def test_a_secure_sums_unclipped_count_must_be_a_number_within_its_clients():
    from fedit.boundary import screen_summed

    arrays = {ADAPTER: {"w": torch.zeros(2, 2, dtype=torch.float64)}}
    for bad in (float("nan"), -1, 3, "2", True):
        clean, why = screen_summed(Summed([0, 1], arrays, bad), [0, 1], REF)
        assert clean is None and "unclipped" in why, bad
    clean, why = screen_summed(Summed([0, 1], arrays, 2), [0, 1], REF)
    assert why is None and clean.unclipped == 2.0 and clean.clients == [0, 1]


# ---------------------------------------------------------------- item 7: per-client figures under DP

class Recorder:
    logged: list = []

    def __init__(self, run_dir):
        Recorder.logged = []

    def log(self, step, values):
        Recorder.logged.append((step, dict(values)))

    def close(self):
        pass


@pytest.mark.parametrize("private", [False, True])
def test_under_dp_no_per_client_figure_goes_to_a_reporter(tmp_path, monkeypatch, private):
    """Today TensorBoard and W&B get client/<id>/train_loss, seconds, tokens and the unnoised train/loss
    under privacy.enabled too. Now they get the round's own figures and ε; metrics.jsonl (on the
    machine) keeps each client's line. Without DP nothing changes (the control)."""
    monkeypatch.setattr(reporting, "TensorBoard", Recorder)
    dp = {"privacy": {"enabled": True, "clipping_norm": 0.5, "noise_multiplier": 1.0}} if private else {}

    def make(r, instructions):
        return [honest(ins, {"train_loss": 2.0 + ins.client_id, "trained_tokens": 50, "seconds": 1.5})
                for ins in instructions]

    run(config(tmp_path, rounds=1, run={"report_to": ["tensorboard"]}, **dp), Replies(make), tmp_path)
    (_, round0), (_, round1) = Recorder.logged
    per_client = [k for k in round1 if k.startswith(("client/", "train/"))]
    if private:
        assert per_client == [] and round1["round/accepted"] == 2 and "privacy/epsilon" in round1
    else:
        assert round1["client/00000/train_loss"] == 2.0 and round1["train/loss"] == 2.5
    kept = [c["metrics"]["train_loss"] for c in strict_lines(tmp_path) if c["event"] == "client"]
    assert kept == [2.0, 3.0]


def test_private_scalars_worked_by_hand():
    row = {"round": 2, "accepted": 1, "rejected": [], "privacy": {"epsilon": 1.5, "delta": 1e-5},
           "validation": {"loss": 2.0, "clients": 2, "spread": {"min": 1.0, "max": 3.0}, "by_category": {"qa": 2.0}}}
    clients = [{"client": 3, "accepted": True, "bytes_down": 8, "bytes_up": 8,
                "metrics": {"train_loss": 2.0, "trained_tokens": 10, "seconds": 1.0}}]
    assert reporting.scalars(row, clients, private=True) == {
        "validation/loss": 2.0, "validation/clients": 2, "validation_by_category/qa": 2.0, "round/accepted": 1,
        "round/rejected": 0, "privacy/epsilon": 1.5, "privacy/delta": 1e-5, "round/bytes_down": 8, "round/bytes_up": 8}


# ---------------------------------------------------------------- the fuzz test

class Sub(torch.Tensor):
    pass


class Hostile:
    def __repr__(self):
        raise RuntimeError("repr refused")

    def __eq__(self, other):
        raise RuntimeError("eq refused")

    __hash__ = object.__hash__


BIG = "x" * 5_000_000


def junk_value(rng):
    return rng.choice([None, True, 0, -1, 3, 2**53 + 1, 10**400, 10**5000, 1.5, float("nan"), float("inf"), -1e300,
                       1e15, "3", "", "\ud800", "a\nb", BIG, b"\x00", [1.0], (1,), {"n": 1}, Hostile(), object()])


def junk_metrics(rng):
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice([None, [1, 2], "metrics", 7, Hostile()])
    if kind == 1:
        return _self_holding()
    keys = ["train_loss", "seconds", "steps", "trained_tokens", "note", "", "x" * 100, "a b", "é", ("t", 1), 7, None,
            Hostile(), "ok.name"]
    out = {}
    for _ in range(rng.choice([1, 3, 10, 80])):
        out[rng.choice(keys) if rng.random() < 0.9 else f"k{rng.randrange(10**6)}"] = junk_value(rng)
    return out


def junk_tensor(rng, ref):
    shape = ref.shape
    return rng.choice([
        lambda: ref + 0.01,
        lambda: torch.full(shape, rng.choice([float("nan"), float("inf"), 1e30, 1e-45])),
        lambda: torch.ones(shape, dtype=rng.choice([torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn,
                                                    torch.float8_e5m2, torch.float16, torch.bfloat16, torch.float64])),
        lambda: torch.ones(shape).to_sparse(),
        lambda: torch.ones(shape, device="meta"),
        lambda: torch.ones(2, 2, 2),
        lambda: torch.ones(shape).as_subclass(Sub),
        lambda: torch.ones(shape, requires_grad=True),
        lambda: torch.ones(shape).tolist(),
        lambda: junk_value(rng),
    ])()


def junk_reply(rng, instructions, asked):
    ins = rng.choice(instructions)
    cid = rng.choice([ins.client_id] * 12 + [99, -1, True, "0", None, 10**400, [0], Hostile()])
    kind = rng.randrange(10)
    if kind == 0:
        return rng.choice([None, "reply", 42, object(), Hostile(), ins])
    if kind == 1:
        return Failure(cid, rng.choice(["timed out", BIG, Hostile(), None, "\x1b[2Jcleared"]))
    if kind == 2:
        clients = rng.choice([asked, asked + asked[:1], [99], "0,1", None, [True], list(range(10**4))])
        return Summed(clients, {ADAPTER: {"w": junk_tensor(rng, ins.global_adapter["w"].double())}},
                      rng.choice([None, float("nan"), 1.0]), rng.choice([{}, None, {asked[0]: junk_metrics(rng)}]))
    arrays = {ADAPTER: {"w": junk_tensor(rng, ins.global_adapter["w"])}}
    if kind == 3:
        arrays = rng.choice([{}, None, [1], {ADAPTER: None}, {ADAPTER: {"w": ins.global_adapter["w"] + 0.01, "x": W},
                                                             "control": {}}, {Hostile(): 1}])
    n = rng.choice([1, 2, 3]) if kind < 6 else junk_value(rng)
    return Update(cid, arrays, n, junk_metrics(rng) if kind >= 4 else {})


def test_fuzz_hundreds_of_hostile_replies_through_the_round_loop(tmp_path, caplog):
    """Seeded: about 300 generated replies (objects of any type, client ids, tensors of every dtype,
    layout and device, counts up to 10**5000, metrics with odd keys, huge, non-finite and
    self-holding values) over 10 rounds, each with one honest reply among them. No exception
    escapes, every reply gets a line (accepted, or rejected with its reason), every line is
    strict JSON within bounds, every metric kept obeys the policy, and the run ends."""
    rng = random.Random(28)

    def make(r, instructions):
        asked = [ins.client_id for ins in instructions]
        replies = [junk_reply(rng, instructions, asked) for _ in range(29)]
        replies.insert(rng.randrange(30), honest(rng.choice(instructions)))
        return replies

    runtime = Replies(make)
    cfg = config(tmp_path, rounds=10, per_round=3, federation={"max_value": 1e4})
    with caplog.at_level(logging.WARNING, logger="fedit.server"):
        final = run(cfg, runtime, tmp_path, clients=range(6))
    assert runtime.yielded == 300 and torch.isfinite(final["w"]).all()
    rows = strict_lines(tmp_path)
    assert [r["round"] for r in rows if r["event"] == "round"] == list(range(11))
    clients = [r for r in rows if r["event"] == "client"]
    assert len(clients) >= 300
    rejected = [c for c in clients if not c["accepted"]]
    assert len(rejected) > 200 and all(isinstance(c["reason"], str) and c["reason"] for c in rejected)
    # each one by a check that knew what it was looking at, not by the loop's last-resort catch
    assert not any("could not be checked" in c["reason"] for c in rejected)
    logged = caplog.text
    assert all(c["reason"][:60] in logged for c in rejected)  # on the console too, with the same reason
    assert max(len(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()) < 50_000
    plain = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,63}")
    for c in clients:
        m = c.get("metrics", {})  # a Failure, or an object that is no reply, has none
        assert isinstance(m, dict) and len(m) <= 64
        for k, v in m.items():
            assert plain.fullmatch(k), k
            assert (isinstance(v, (int, float)) and abs(v) <= 1e15) or (isinstance(v, str) and len(v) <= 256), (k, v)
    accepted = [c for c in clients if c["accepted"]]
    assert all(isinstance(c["num_examples"], int) and 1 <= c["num_examples"] <= 2**53
               for c in accepted if not c.get("secure"))


def test_flower_metrics_record_is_cleaned_the_same_way():
    """What fedit/runtime/flower.py calls where it reads a reply's ``metrics`` record: a MetricRecord
    holds ints, floats and lists of them; lists, huge and non-finite values and entries past 64 are
    dropped, with one line that says so; something that is no record gives a reason, not an error."""
    import flwr.app as flwr  # a test dependency: present wherever the suite runs
    from fedit.boundary import flower_metrics

    assert flower_metrics(flwr.MetricRecord({"train_loss": 1.5, "steps": 3})) == ({"train_loss": 1.5, "steps": 3}, None)
    record = flwr.MetricRecord({"seconds": 2.0, "spread": [1.0, 2.0], "big": 1e300, "nan": float("nan"),
                                **{f"m{i}": i for i in range(70)}})
    kept, why = flower_metrics(record)
    assert kept == {"seconds": 2.0, **{f"m{i}": i for i in range(60)}}
    assert why.count("metric ") == 3 and "10 entries beyond the first 64 dropped" in why  # 74 entries, 64 read
    assert flower_metrics(None) == ({}, None)
    kept, why = flower_metrics(7)
    assert kept == {} and "could not be read" in why
