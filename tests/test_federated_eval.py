"""Federated evaluation: each client's validation split, the server's figures from the clients' sums,
choices made on them (keep_best, early stopping), replies checked at the trust boundary, and a run
whose server holds no test set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedit import runner, server
from fedit.adapter import load_adapter_file
from fedit.config import from_dict
from fedit.data import partition
from fedit.data.clients import ClientFiles
from fedit.data.records import load_records
from fedit.errors import FeditError
from fedit.evaluation import federated
from fedit.protocol import Evaluation, Failure, Update

from conftest import make_records, tiny_config, write_jsonl


# ---------------------------------------------------------------- the validation split

def test_validation_split_sizes_by_hand():
    # a fraction rounds up (every client of 2 or more records spares one), a count is a count,
    # and a client always keeps at least one record to train on
    sizes = {(n, a): len(partition.split_validation(n, a, 42, 0)[1])
             for n, a in [(10, 0.1), (10, 0.25), (4, 0.1), (2, 0.1), (1, 0.5), (10, 3), (3, 5), (7, 0)]}
    assert sizes == {(10, 0.1): 1, (10, 0.25): 3, (4, 0.1): 1, (2, 0.1): 1, (1, 0.5): 0, (10, 3): 3, (3, 5): 2,
                     (7, 0): 0}


def test_validation_split_is_deterministic_disjoint_and_per_client():
    train, val = partition.split_validation(50, 0.2, 42, 3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == list(range(50)) and not set(train) & set(val)
    assert partition.split_validation(50, 0.2, 42, 3) == (train, val)  # every round, resume and runtime alike
    others = {tuple(partition.split_validation(50, 0.2, 42, c)[1]) for c in range(8)}
    assert len(others) == 8  # drawn per client: the clients do not all hold back the same positions
    assert partition.split_validation(50, 0.2, 43, 3)[1] != val  # and per seed


def test_partition_manifest_counts_train_and_validation(tmp_path):
    loaded = load_records(write_jsonl(tmp_path / "r.jsonl", make_records()))
    sp = partition.Split(test=[], clients=[list(range(0, 20)), list(range(20, 21)), list(range(21, 48))])
    m = partition.write(tmp_path / "p", loaded, sp, scheme="iid", seed=1, alpha=0.5, test_per_category=0,
                        validation=0.1)
    assert [(c["examples"], c["train"], c["validation"]) for c in m["clients"]] == [(20, 18, 2), (1, 1, 0),
                                                                                    (27, 24, 3)]
    line = partition.validation_line(0.1, [20, 1, 27])
    assert "5 records" in line and "1 client(s) too small to spare one" in line


# ---------------------------------------------------------------- the server's figures, by hand

def test_token_weighted_figures_from_three_unequal_clients():
    evals = [Evaluation(0, {"qa": [30.0, 10, 2], "math": [8.0, 4, 1]}, 3),  # client 0: 38 / 14
             Evaluation(1, {"qa": [4.0, 2, 1]}, 1),                          # client 1: 4 / 2 = 2.0
             Evaluation(2, {"math": [90.0, 30, 5]}, 5)]                      # client 2: 90 / 30 = 3.0
    f = federated.combine(evals)
    assert f["loss"] == pytest.approx(132 / 46)  # (30 + 8 + 4 + 90) / (10 + 4 + 2 + 30), not a mean of means
    assert f["by_category"] == pytest.approx({"math": 98 / 34, "qa": 34 / 12})
    assert (f["tokens"], f["examples"], f["clients"]) == (46, 9, 3)
    assert f["spread"] == pytest.approx({"min": 2.0, "median": 38 / 14, "max": 3.0, "worst_tenth": 3.0})
    assert f["per_client"]["0"] == {"loss": pytest.approx(38 / 14), "tokens": 14, "examples": 3}


def test_the_worst_tenth_is_the_mean_of_the_highest_tenth_rounded_up():
    # eleven clients with losses 1..11: the worst tenth is ⌈11/10⌉ = 2 clients, (10 + 11) / 2
    evals = [Evaluation(c, {"x": [float(c + 1) * 5, 5, 1]}, 1) for c in range(11)]
    s = federated.combine(evals)["spread"]
    assert s == pytest.approx({"min": 1.0, "median": 6.0, "max": 11.0, "worst_tenth": 10.5})
    # a client that scored no token (every response cut away) counts toward no figure
    assert federated.combine([Evaluation(0, {"x": [0.0, 0, 1]}, 1)]) is None


def test_evaluation_clients_are_all_or_a_seeded_draw():
    ids = list(range(20))
    assert federated.select(ids, "all", 7, 3) == ids
    a = federated.select(ids, 0.25, 7, 3)
    assert len(a) == 5 and a == federated.select(ids, 0.25, 7, 3) and set(a) <= set(ids)
    assert federated.select(ids, 0.25, 7, 4) != a  # a new draw each round
    assert len(federated.select(ids, 6, 7, 3)) == 6 and federated.select(ids, 40, 7, 3) == ids


@pytest.mark.parametrize("reply, reason", [
    (Evaluation(0, {"qa": [-1.0, 10, 2]}, 2), "not a finite number >= 0"),
    (Evaluation(0, {"qa": [float("nan"), 10, 2]}, 2), "not a finite number >= 0"),
    (Evaluation(0, {"qa": [float("inf"), 10, 2]}, 2), "not a finite number >= 0"),
    (Evaluation(0, {"qa": [5.0, 10, 2]}, 4), "more than this client's validation split holds (3)"),
    (Evaluation(0, {"qa": [5.0, 1000, 2]}, 2), "1000 tokens from 2 examples of at most 256 tokens"),
    (Evaluation(0, {"qa": [5.0, 10, 1]}, 2), "the categories count 1 examples, the reply 2"),
    (Evaluation(0, {"qa": [5.0, 10.5, 2]}, 2), "must be whole numbers"),
    (Evaluation(0, {"qa": [5.0, True, 2]}, 2), "must be whole numbers"),
    (Evaluation(0, {"qa": [5.0, 10]}, 2), "expected [loss sum, tokens, examples]"),
    (Evaluation(0, {"qa": [5.0, 0, 2]}, 2), "a loss sum of 5 over no tokens"),
    (Evaluation(0, {7: [5.0, 10, 2]}, 2), "is not a name"),
    (Evaluation(0, {f"c{i}": [0.0, 0, 0] for i in range(1001)}, 0), "at most 1000 categories"),
    (Evaluation(0, "qa", 2), "not a table"),
    (Evaluation(0, {}, -1), "expected a whole number >= 0"),
])
def test_a_bad_evaluation_reply_gets_a_reason(reply, reason):
    assert reason in (federated.check(reply, max_examples=3, max_tokens_per_example=256) or "")


def test_a_good_evaluation_reply_passes():
    assert federated.check(Evaluation(0, {"qa": [5.0, 10, 2], "x": [0.0, 0, 1]}, 3), 3, 256) is None


# ---------------------------------------------------------------- the round loop, with a scripted runtime

class Scripted:
    """Clients that train by adding 0.01 · round to the adapter and report scripted validation losses."""

    secure = False

    def __init__(self, losses: dict[int, float], bad: dict | None = None, crash_in: int | None = None):
        self.losses, self.bad, self.crash_in = losses, bad or {}, crash_in

    def fit(self, r, instructions):
        if r == self.crash_in:
            raise RuntimeError("the machine died")
        for ins in instructions:
            yield Update(ins.client_id, {"adapter": {k: v + 0.01 * r for k, v in ins.global_adapter.items()}}, 4)

    def evaluate(self, r, instructions):
        for ins in instructions:
            bad = self.bad.get((r, ins.client_id))
            if bad is not None:
                yield bad
            else:  # 10 tokens at the round's loss; client 2 is served worse by 1.0
                loss = self.losses[r] + (1.0 if ins.client_id == 2 else 0.0)
                yield Evaluation(ins.client_id, {"qa": [loss * 10, 10, 2]}, 2)


def _save(adapter, path: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, path / "adapter_model.safetensors")


def _cfg(tmp_path, **sections):
    base = {"data": {"client_validation": 0.2}, "federation": {"rounds": 6, "clients_per_round": 2, "seed": 3},
            "run": {"out": str(tmp_path / "run"), "report_to": [], "progress": False}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return from_dict(base)


def _serve(cfg, runtime, run_dir, resume=False):
    init = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    return server.run(cfg, runtime, run_dir, client_ids=[0, 1, 2], initial_adapter=init, save_adapter=_save,
                      resume=resume, validation_sizes={0: 2, 1: 2, 2: 2})


# client 2's loss is the round's + 1: the federated loss is the round's + 1/3
LOSSES = {0: 3.0, 1: 2.5, 2: 2.7, 3: 2.4, 4: 2.6, 5: 2.65, 6: 2.3}


def test_cover_selection_draws_every_client_before_any_twice(tmp_path):
    cfg = _cfg(tmp_path, federation={"clients_per_round": 1, "selection": "cover"})
    _serve(cfg, Scripted(LOSSES), tmp_path / "run")
    drawn = [r["clients"] for r in server.RunDir(tmp_path / "run").events("round")][1:]
    assert sorted(c for d in drawn[:3] for c in d) == [0, 1, 2] and sorted(c for d in drawn[3:] for c in d) == [0, 1, 2]


def test_keep_best_keeps_the_round_of_the_lowest_validation_loss(tmp_path):
    cfg = _cfg(tmp_path, run={"keep_best": True})
    _serve(cfg, Scripted(LOSSES), tmp_path / "run")
    rd = server.RunDir(tmp_path / "run")
    rows = rd.events("round")
    assert [round(r["validation"]["loss"], 6) for r in rows] == [round(v + 1 / 3, 6) for v in LOSSES.values()]
    assert [r["validation"]["spread"]["max"] for r in rows] == pytest.approx([v + 1 for v in LOSSES.values()])
    # lowest: round 6 (2.3); the best moved at rounds 0, 1, 3 and 6
    assert rd.read_state()["best"] == {"round": 6, "loss": pytest.approx(2.3 + 1 / 3), "since": 0}
    best, six = load_adapter_file(tmp_path / "run/best"), load_adapter_file(rd.round_dir(6))
    assert all(torch.equal(best[k], six[k]) for k in best)


def test_early_stop_after_patience_evaluations_without_improvement_and_its_resume(tmp_path):
    cfg = _cfg(tmp_path, run={"keep_best": True}, federation={"early_stop_patience": 2})
    _serve(cfg, Scripted(LOSSES), tmp_path / "run")
    rd = server.RunDir(tmp_path / "run")
    # best at round 3 (2.4); rounds 4 and 5 do not improve: stop before round 6
    assert [r["round"] for r in rd.events("round")] == [0, 1, 2, 3, 4, 5]
    (stop,) = rd.events("stop")
    assert stop["round"] == 5 and "2 evaluations without a lower validation loss than round 3" in stop["reason"]
    best, three = load_adapter_file(tmp_path / "run/best"), load_adapter_file(rd.round_dir(3))
    assert all(torch.equal(best[k], three[k]) for k in best)

    # the same run killed in round 5 and resumed stops at the same place with the same files
    cut = _cfg(tmp_path, run={"keep_best": True, "out": str(tmp_path / "cut")}, federation={"early_stop_patience": 2})
    with pytest.raises(RuntimeError):
        _serve(cut, Scripted(LOSSES, crash_in=5), tmp_path / "cut")
    assert server.RunDir(tmp_path / "cut").read_state()["best"] == {"round": 3, "loss": pytest.approx(2.4 + 1 / 3),
                                                                   "since": 1}
    _serve(cut, Scripted(LOSSES), tmp_path / "cut", resume=True)
    untimed = lambda d: {k: untimed(v) if isinstance(v, dict) else v for k, v in d.items()  # noqa: E731
                         if not k.endswith("seconds")}
    assert [untimed(e) for e in server.RunDir(tmp_path / "cut").events()] == [untimed(e) for e in rd.events()]
    # and a resume of a run that already stopped stops again, before training anything
    _serve(cut, Scripted(LOSSES, crash_in=6), tmp_path / "cut", resume=True)


def test_bad_evaluation_replies_are_left_out_with_a_reason_and_the_run_goes_on(tmp_path):
    bad = {(1, 0): Evaluation(0, {"qa": [-5.0, 10, 2]}, 2),
           (1, 1): Evaluation(1, {"qa": [float("nan"), 10, 2]}, 2),
           (2, 0): Evaluation(0, {"qa": [5.0, 10, 3]}, 3),  # more examples than its split of 2
           (2, 1): Evaluation(5, {"qa": [5.0, 10, 2]}, 2),  # a client that was not asked
           (3, 0): Failure(0, "no reply within federation.round_timeout = 5 s")}
    cfg = _cfg(tmp_path, federation={"rounds": 3})
    _serve(cfg, Scripted(LOSSES, bad), tmp_path / "run")
    rows = server.RunDir(tmp_path / "run").events("round")
    v1, v2, v3 = (rows[r]["validation"] for r in (1, 2, 3))
    assert v1["clients"] == 1 and v1["loss"] == pytest.approx(LOSSES[1] + 1)  # only client 2 was kept
    assert [x["client"] for x in v1["left_out"]] == [0, 1]
    assert "loss sum -5.0 is not a finite number >= 0" in v1["left_out"][0]["reason"]
    assert "loss sum nan is not a finite number >= 0" in v1["left_out"][1]["reason"]
    assert "more than this client's validation split holds (2)" in v2["left_out"][0]["reason"]
    assert "was not asked" in v2["left_out"][1]["reason"]
    assert v3["left_out"] == [{"client": 0, "reason": "no reply within federation.round_timeout = 5 s"}]
    assert v3["loss"] == pytest.approx(LOSSES[3] + 0.5)  # clients 1 and 2, 10 tokens each


def test_choices_on_validation_need_a_validation_split(tmp_path):
    for key in ({"run": {"keep_best": True}}, {"federation": {"early_stop_patience": 3}}):
        with pytest.raises(FeditError, match="set data.client_validation"):
            _cfg(tmp_path, data={"client_validation": 0}, **key)


@pytest.mark.parametrize("value, ok", [(0.1, True), (5, True), (0, True), (1.5, False), (-0.1, False),
                                       (float("nan"), False), ("half", False), (True, False)])
def test_client_validation_takes_a_fraction_or_a_count(tmp_path, value, ok):
    if ok:
        assert _cfg(tmp_path, data={"client_validation": value}).data.client_validation == value
    else:
        with pytest.raises(FeditError, match="expected a fraction between 0 and 1"):
            _cfg(tmp_path, data={"client_validation": value})


# ---------------------------------------------------------------- real runs on the tiny model

@pytest.fixture()
def no_test_partition(tmp_path) -> Path:
    """Three IID clients and no held-out set: the server holds no data."""
    loaded = load_records(write_jsonl(tmp_path / "records.jsonl", make_records()))
    sp = partition.split(loaded.records, 3, "iid", seed=1, test_per_category=0)
    out = tmp_path / "parts"
    partition.write(out, loaded, sp, scheme="iid", seed=1, alpha=0.5, test_per_category=0, validation=0.2)
    return out


def test_a_run_whose_server_holds_no_test_set_completes_and_resumes(tmp_path, tiny_model_dir, no_test_partition):
    from fedit.runtime import simulation

    trained: list[tuple] = []
    real_train = simulation.client.train

    def recording_train(loaded, ins, examples, *a, **k):  # what each client trained on
        trained.extend((ins.client_id, tuple(e.input_ids)) for e in examples)
        return real_train(loaded, ins, examples, *a, **k)

    cfg = tiny_config(tiny_model_dir, no_test_partition, tmp_path / "run", data={"client_validation": 0.2},
                      federation={"rounds": 3}, run={"keep_best": True})
    prep = runner.prepare(cfg)
    assert prep.test is None
    simulation.client.train = recording_train
    real_fit = simulation.Simulation.fit

    def crashing_fit(self, r, instructions):
        if r == 3:
            raise RuntimeError("the machine died")
        yield from real_fit(self, r, instructions)

    simulation.Simulation.fit = crashing_fit
    try:
        with pytest.raises(RuntimeError):
            runner.run(cfg, loaded=prep.loaded)
    finally:
        simulation.Simulation.fit = real_fit
    try:
        runner.run(None, resume=str(tmp_path / "run"), loaded=prep.loaded)
    finally:
        simulation.client.train = real_train
    rd = server.RunDir(tmp_path / "run")
    rows = rd.events("round")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all("eval" not in r and r["validation"]["clients"] == 3 for r in rows)
    assert rows[-1]["validation"]["loss"] < rows[0]["validation"]["loss"]
    assert (tmp_path / "run/loss.png").stat().st_size > 0 and (tmp_path / "run/best").is_dir()
    summary = runner.summary(tmp_path / "run")
    assert "validation loss (federated, 3 clients)" in summary and "test loss" not in summary
    # never trained on a validation record, in any round, before or after the resume
    clients = ClientFiles(no_test_partition, prep.loaded.tokenizer, 256, False, "alpaca", validation=0.2, seed=42)
    for cid in clients.ids:
        held = {tuple(e.input_ids) for e in clients.validation_examples(cid)}
        assert held and not held & {ids for c, ids in trained if c == cid}
    assert {c for c, _ in trained} <= set(clients.ids) and trained
    assert json.loads((tmp_path / "run/run.json").read_text())["client_splits"]["0"] == {"train": 12, "validation": 4}  # ⌈0.2 · 16⌉


def test_a_server_with_no_test_set_and_no_validation_says_what_to_set(tmp_path, tiny_model_dir, no_test_partition):
    cfg = tiny_config(tiny_model_dir, no_test_partition, tmp_path / "run")
    with pytest.raises(FeditError, match="nothing would measure the run. Set data.client_validation"):
        runner.prepare(cfg)


def test_simulation_evaluation_equals_scoring_the_union_of_the_splits(tmp_path, tiny_model_dir, partition_dir):
    """The federated figure is exactly the loss of one model scored on all the clients' validation records."""
    from fedit.evaluation.heldout import heldout_loss

    cfg = tiny_config(tiny_model_dir, partition_dir, tmp_path / "run", data={"client_validation": 0.25},
                      federation={"rounds": 1})
    prep = runner.prepare(cfg)
    runner.run(cfg, loaded=prep.loaded)
    row = server.RunDir(tmp_path / "run").events("round")[-1]
    union = [e for cid in prep.clients.ids for e in prep.clients.validation_examples(cid)]
    direct = heldout_loss(prep.loaded, union, load_adapter_file(tmp_path / "run/rounds/round_0001"), 4)
    assert row["validation"]["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert row["validation"]["by_category"] == pytest.approx(direct["by_category"], rel=1e-6)
    assert row["validation"]["tokens"] == direct["tokens"] and row["eval"]["loss"] != row["validation"]["loss"]
    assert not math.isnan(row["eval"]["loss"])  # the server's test set is still scored beside it


# ---------------------------------------------------------------- personalization

def test_personalize_measures_three_adapters_per_client_and_saves_peft_directories(tmp_path, tiny_model_dir,
                                                                                   no_test_partition):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedit.evaluation.heldout import heldout_loss
    from fedit.personalize import personalize

    cfg = tiny_config(tiny_model_dir, no_test_partition, tmp_path / "run", data={"client_validation": 0.2},
                      federation={"rounds": 2})
    prep = runner.prepare(cfg)
    runner.run(cfg, loaded=prep.loaded)
    personalize(tmp_path / "run", ["personalize.steps=3", "personalize.clients=2"], loaded=prep.loaded)
    res = json.loads((tmp_path / "run/personalize.json").read_text())
    rows = res["clients"]
    assert len(rows) == 2 and res["measured"] == 2
    final = load_adapter_file(tmp_path / "run/adapter")
    for r in rows:
        val = prep.clients.validation_examples(r["client"])
        assert (r["train"], r["validation"]) == (12, 4)
        # global: the run's final adapter on the client's own validation split, scored directly here
        assert r["global"] == pytest.approx(heldout_loss(prep.loaded, val, final, 4)["loss"], rel=1e-9)
        assert r["base"] == pytest.approx(heldout_loss(prep.loaded, val, prep.loaded.initial_adapter, 4)["loss"])
        mine = load_adapter_file(tmp_path / f"run/personalized/client_{r['client']:05d}")
        assert r["personalized"] == pytest.approx(heldout_loss(prep.loaded, val, mine, 4)["loss"], rel=1e-9)
        assert any(not torch.equal(mine[k], final[k]) for k in final)  # three steps moved it
        # at lr 1e-2 on the client's own data every adapter improves on the untuned model
        assert max(r["local_only"], r["global"], r["personalized"]) < r["base"]
    assert res["global_beats_local"] == sum(r["global"] < r["local_only"] for r in rows)
    # a personalized adapter is a PEFT directory
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      tmp_path / f"run/personalized/client_{rows[0]['client']:05d}")
    assert model.peft_config["default"].r == 4
    assert (tmp_path / "run/personalize.png").stat().st_size and "local-only" in (
        tmp_path / "run/personalize.md").read_text()


def test_personalize_refuses_a_run_without_validation_splits_and_settings_of_the_run(tmp_path, tiny_model_dir,
                                                                                    partition_dir):
    from fedit.personalize import personalize

    cfg = tiny_config(tiny_model_dir, partition_dir, tmp_path / "run", federation={"rounds": 1})
    runner.run(cfg)
    with pytest.raises(FeditError, match="held back no validation split"):
        personalize(tmp_path / "run")
    with pytest.raises(FeditError, match="only \\[personalize\\] keys"):
        personalize(tmp_path / "run", ["train.lr=1"])


def test_client_drift_is_the_mean_cosine_between_the_rounds_changes(tmp_path):
    """Three changes (1, 0), (0, 1), (1, 1) from a zero adapter: cosines 0, 1/√2, 1/√2, mean √2 / 3; norms 1, 1, √2."""

    class Three(Scripted):
        def fit(self, r, instructions):
            steps = {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [1.0, 1.0]}
            for ins in instructions:
                g = ins.global_adapter
                yield Update(ins.client_id, {"adapter": {"m.w": g["m.w"] + torch.tensor(steps[ins.client_id])}}, 4)

    cfg = from_dict({"federation": {"rounds": 1, "clients_per_round": 3},
                     "run": {"out": str(tmp_path / "run"), "report_to": [], "progress": False}, "eval": {"every": 0}})
    server.run(cfg, Three(LOSSES), tmp_path / "run", client_ids=[0, 1, 2], initial_adapter={"m.w": torch.zeros(2)},
               save_adapter=_save)
    d = server.RunDir(tmp_path / "run").events("round")[1]["drift"]
    assert d == {"mean_cosine": pytest.approx(2 ** 0.5 / 3), "clients": 3, "norm_min": pytest.approx(1.0),
                 "norm_median": pytest.approx(1.0), "norm_max": pytest.approx(2 ** 0.5)}
    # identical changes point the same way: 1
    drift = server.Drift()
    for _ in range(3):
        drift.add({"w": torch.tensor([2.0, -1.0])}, {"w": torch.zeros(2)})
    assert drift.figures([{"accepted": True, "update_norm": 5 ** 0.5}] * 3)["mean_cosine"] == pytest.approx(1.0)
    # changes of different shapes (clients at their own ranks, each measured from what it was sent) have no
    # cosine: the round logs no drift, and no reply is refused for it
    drift = server.Drift()
    drift.add({"w": torch.ones(2)}, {"w": torch.zeros(2)})
    drift.add({"w": torch.ones(3)}, {"w": torch.zeros(3)})
    assert drift.figures([{"accepted": True, "update_norm": 1.0}] * 2) is None


def test_each_round_picks_among_the_sites_connected_at_its_start(tmp_path):
    """A deployment runtime says which sites are connected; the round draws among those (all of them when there
    are no more than it needs), records them, and goes back to every client once they are back."""

    class Coming(Scripted):
        def available(self, r, wanted):
            return [1, 4] if r == 1 else list(range(6))

    cfg = _cfg(tmp_path, data={"client_validation": 0}, eval={"every": 0}, federation={"rounds": 2})
    server.run(cfg, Coming(LOSSES), tmp_path / "run", client_ids=list(range(6)),
               initial_adapter={"m.w": torch.zeros(2)}, save_adapter=_save)
    rows = server.RunDir(tmp_path / "run").events("round")
    assert rows[1]["clients"] == [1, 4] and rows[1]["available"] == [1, 4]
    assert "available" not in rows[2] and len(rows[2]["clients"]) == 2


def test_without_a_known_split_size_an_evaluation_reply_is_capped_by_max_examples(tmp_path):
    """A server with no manifest does not know a site's split; federation.max_examples caps what a reply may claim,
    so one site cannot outweigh the others in the figure every choice is made on."""
    bad = {(1, 0): Evaluation(0, {"qa": [1.0, 600, 6]}, 6)}
    cfg = _cfg(tmp_path, federation={"rounds": 1, "max_examples": 5})
    init = {"m.w": torch.zeros(2)}
    server.run(cfg, Scripted(LOSSES, bad), tmp_path / "run", client_ids=[0, 1, 2], initial_adapter=init,
               save_adapter=_save)
    v = server.RunDir(tmp_path / "run").events("round")[1]["validation"]
    assert v["clients"] == 2 and "more than this client's validation split holds (5)" in v["left_out"][0]["reason"]


def test_a_server_told_not_to_read_its_test_set_and_without_validation_says_what_to_set(tmp_path, tiny_model_dir,
                                                                                       partition_dir):
    cfg = tiny_config(tiny_model_dir, partition_dir, tmp_path / "run", eval={"test": False})
    with pytest.raises(FeditError, match=r"no test set \(eval.test = false\).*Set data.client_validation"):
        runner.prepare(cfg)


def test_a_resume_restores_best_from_the_round_state_json_names(tmp_path):
    """best/ is written before state.json: after a crash between them it may hold another round; the resume
    writes it again from the round state.json names."""
    cfg = _cfg(tmp_path, run={"keep_best": True}, federation={"rounds": 4})
    with pytest.raises(RuntimeError):
        _serve(cfg, Scripted(LOSSES, crash_in=4), tmp_path / "run")
    rd = server.RunDir(tmp_path / "run")
    assert rd.read_state()["best"]["round"] == 3
    _save(load_adapter_file(rd.round_dir(2)), tmp_path / "run" / "best")  # as if round 4 had half-finished
    _serve(cfg, Scripted({**LOSSES, 4: 9.0}), tmp_path / "run", resume=True)
    best, three = load_adapter_file(tmp_path / "run/best"), load_adapter_file(rd.round_dir(3))
    assert all(torch.equal(best[k], three[k]) for k in best)
