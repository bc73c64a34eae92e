"""`fedit compare`: the same split, init, selection and budget for every strategy, and its statistics."""

from __future__ import annotations

import hashlib
import json

import pytest

from fedit import compare, server
from fedit.errors import FeditError


def test_bootstrap_gap_hand_computed():
    ref = [[2.0, 1], [6.0, 3], [9.0, 3]]  # token-mean loss 17 / 7
    same = compare.bootstrap_gap(ref, ref)
    assert same == (0.0, 0.0, 0.0)
    # every record's loss sum 10% higher: the gap is +10% on every resample, so the interval is a point
    gap, lo, hi = compare.bootstrap_gap([[s * 1.1, n] for s, n in ref], ref)
    assert gap == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    # one record much worse: the point gap is (2 + 6 + 18) / 17 − 1, and the interval straddles it
    gap, lo, hi = compare.bootstrap_gap([[2.0, 1], [6.0, 3], [18.0, 3]], ref)
    assert gap == pytest.approx(26 / 17 - 1) and lo < gap < hi
    # records without scored tokens carry no information and are left out
    assert compare.bootstrap_gap(ref + [[0.0, 0]], ref + [[0.0, 0]])[0] == 0.0


def test_per_strategy_settings_are_parsed_and_checked():
    assert compare.parse_sets(["fedprox:strategy.proximal_mu=0.1"], ["fedavg", "fedprox"]) == {
        "fedavg": [], "fedprox": ["strategy.proximal_mu=0.1"]}
    with pytest.raises(FeditError, match="not among --strategies"):
        compare.parse_sets(["fedadam:strategy.eta=1"], ["fedavg"])
    with pytest.raises(FeditError, match="must look like STRATEGY:section.key=value"):
        compare.parse_sets(["strategy.eta=1"], ["fedavg"])
    scale = compare.SCALES["smoke"]
    with pytest.raises(FeditError, match="unknown fedadgrad; choose from"):
        compare.strategy_configs(scale, ["fedavg", "fedadgrad"], None, [], [])
    # an option the strategy does not have names the strategy and the options it has
    with pytest.raises(FeditError, match="unknown key strategy.eta; known keys: proximal_mu"):
        compare.strategy_configs(scale, ["fedprox"], None, [], ["fedprox:strategy.eta=1"])
    # one strategy as several labelled variants, each with its own overrides
    assert compare.parse_entries(["fedavg", "mixed=fedavg", "prox-1=fedprox"]) == {
        "fedavg": "fedavg", "mixed": "fedavg", "prox-1": "fedprox"}
    _, configs = compare.strategy_configs(scale, ["fedavg", "mixed=fedavg"], None, [],
                                          ["mixed:lora.client_ranks=[2,4]"])
    assert configs["mixed"].federation.strategy == "fedavg" and configs["mixed"].lora.client_ranks == (2, 4)
    assert configs["fedavg"].lora.client_ranks == ()
    with pytest.raises(FeditError, match="names 'fedavg' twice"):
        compare.parse_entries(["fedavg", "fedavg=fedavg"])
    with pytest.raises(FeditError, match="not a usable name"):
        compare.parse_entries(["../x=fedavg"])
    with pytest.raises(FeditError, match="unknown fedavgg"):
        compare.strategy_configs(scale, ["mixed=fedavgg"], None, [], [])


def test_smoke_comparison(tmp_path, tiny_model_dir, records_file):
    out = tmp_path / "cmp"
    args = dict(data=str(records_file), out=str(out), sets=["fedprox:strategy.proximal_mu=0.5",
                                                            "mixed:lora.client_ranks=[2,4]"],
                overrides=[f"model.name={tiny_model_dir}", "model.dtype=fp32", "model.device=cpu", "lora.r=4",
                           "run.progress=false"])
    compare.compare("smoke", ["fedavg", "fedprox", "scaffold", "mixed=fedavg"], **args)
    res = json.loads((out / "compare.json").read_text())
    runs = out / "runs"
    # the same selection and the same init for every strategy; only the algorithm differs
    selections = {n: [r["clients"] for r in server.RunDir(runs / n).events("round")] for n in res["strategies"]}
    assert len({json.dumps(s) for s in selections.values()}) == 1
    base = {n: server.RunDir(runs / n).events("round")[0]["eval"]["loss"] for n in [*res["strategies"], "centralized"]}
    assert len(set(base.values())) == 1 and res["base"]["loss"] == base["fedavg"]
    for name, r in res["strategies"].items():
        last = server.RunDir(runs / name).events("round")[-1]["eval"]
        assert r["loss"] == last["loss"] and r["gap_low"] <= r["gap"] <= r["gap_high"]
        assert r["gap"] == pytest.approx(last["loss"] / res["centralized"]["loss"] - 1)
        assert [x for x, _ in r["curve"]] == [0, 1, 2]
    assert res["strategies"]["fedprox"]["options"] == {"proximal_mu": 0.5, "server_learning_rate": 1.0}
    # each strategy against FedAvg, paired on the same records; FedAvg has no row against itself
    fedavg_last = server.RunDir(runs / "fedavg").events("round")[-1]["eval"]
    assert res["strategies"]["fedavg"]["vs_fedavg"] is None
    for name in ("fedprox", "scaffold"):
        gap, lo, hi = res["strategies"][name]["vs_fedavg"]
        # (the per-record sums are rounded to 1e-6, so a gap near zero matches to 1e-6, not relatively)
        assert gap == pytest.approx(res["strategies"][name]["loss"] / fedavg_last["loss"] - 1, abs=1e-6)
        assert lo <= gap <= hi
        by = res["strategies"][name]["vs_fedavg_by_category"]  # [gap, low, high] on that category's records
        assert by["open_qa"][0] == pytest.approx(res["strategies"][name]["by_category"]["open_qa"]
                                                 / fedavg_last["by_category"]["open_qa"] - 1, abs=1e-6)
        assert by["open_qa"][1] <= by["open_qa"][0] <= by["open_qa"][2]
    # SCAFFOLD's control variates double the bytes of a round; a rank-2 client of the mixed variant
    # moves half the bytes of a rank-4 one, and those are fedavg's
    assert res["strategies"]["scaffold"]["bytes_per_round"] == 2 * res["strategies"]["fedavg"]["bytes_per_round"]
    tiers = res["strategies"]["mixed"]["bytes_per_client_by_rank"]
    assert tiers["2"] * 2 == tiers["4"] == res["strategies"]["fedavg"]["bytes_per_round"] / 2  # 2 clients a round
    assert res["strategies"]["mixed"]["strategy"] == "fedavg" and "mixed (fedavg)" in (out / "compare.md").read_text()
    # the held-out records are scored at the evaluation cutoff (256), not the training one (128)
    from transformers import AutoTokenizer

    from fedit.data.batches import tokenize
    from fedit.data.records import load_records

    test = load_records(out / "data" / "fedit" / "test.jsonl").records
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    scored = lambda cutoff: sum(e.trained_tokens for e in tokenize(test, tok, cutoff))  # noqa: E731
    assert server.RunDir(runs / "fedavg").events("round")[0]["eval"]["tokens"] == scored(256) > scored(128)
    md = (out / "compare.md").read_text()
    assert all(f"| {n} |" in md for n in ["fedavg", "fedprox", "scaffold", "centralized"])
    assert "proximal_mu = 0.5" in md and (out / "compare.png").stat().st_size > 10_000
    # a rerun reuses every finished run: nothing is trained again
    stamp = {n: (runs / n / "state.json").stat().st_mtime_ns for n in res["strategies"]}
    lines = []

    class Say:
        def print(self, text, **kw):
            lines.append(str(text))

    compare.compare("smoke", ["fedavg", "fedprox", "scaffold", "mixed=fedavg"], console=Say(), **args)
    assert stamp == {n: (runs / n / "state.json").stat().st_mtime_ns for n in res["strategies"]}
    assert sum("reusing the finished run" in line for line in lines) == 5


def test_grids_multiply_into_candidates_and_bad_grids_say_why():
    from fedit import selection

    got = selection.parse_grids(["fedprox:strategy.proximal_mu=0.01,0.1", "fedprox:train.lr=1e-3,1e-2",
                                 "mixed:lora.client_ranks=[2,4],[4,8]"], ["fedavg", "fedprox", "mixed"])
    assert got["fedavg"] == [[]]
    assert got["fedprox"] == [["strategy.proximal_mu=0.01", "train.lr=1e-3"], ["strategy.proximal_mu=0.01", "train.lr=1e-2"],
                              ["strategy.proximal_mu=0.1", "train.lr=1e-3"], ["strategy.proximal_mu=0.1", "train.lr=1e-2"]]
    assert got["mixed"] == [["lora.client_ranks=[2,4]"], ["lora.client_ranks=[4,8]"]]
    assert selection.candidate_name("fedprox", got["fedprox"][1]) == "fedprox__proximal_mu=0.01__lr=1e-2"
    for bad, why in [("fedprox:proximal_mu=0.1", "must look like"), ("fedadam:strategy.eta=1", "not among"),
                     ("fedprox:strategy.proximal_mu=0.1,0.1", "distinct"),
                     ("fedprox:strategy.proximal_mu=", "must look like")]:
        with pytest.raises(FeditError, match=why):
            selection.parse_grids([bad], ["fedavg", "fedprox"])
    with pytest.raises(FeditError, match="twice"):
        selection.parse_grids(["fedprox:strategy.proximal_mu=1,2", "fedprox:strategy.proximal_mu=3"], ["fedprox"])


def test_centralized_is_labelled_by_the_steps_it_took():
    from fedit.compare import central_label

    assert central_label({"config": {"train": {"max_steps": 0}}}) == "1 epoch"
    assert central_label({"config": {"train": {"max_steps": 17}}}) == "1 epoch, at most 17 steps"


def test_kendall_tau_by_hand():
    from fedit import selection

    assert selection.kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert selection.kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    # pairs (1,2) concordant, (1,3) concordant, (2,3) discordant: (2 - 1) / 3
    assert selection.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert selection.kendall_tau([1], [1]) is None


def test_select_chooses_on_validation_and_reads_the_test_split_only_afterwards(tmp_path, tiny_model_dir,
                                                                               records_file, monkeypatch):
    import builtins
    import io

    events: list[str] = []
    real_open = io.open

    def watching_open(file, mode="r", *a, **k):
        name = str(file)
        if name.endswith("test.jsonl") and "r" in mode:
            events.append("read test")
        if "selection.json" in name and ("w" in mode or "a" in mode):
            events.append("wrote selection")
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(io, "open", watching_open)
    monkeypatch.setattr(builtins, "open", watching_open)
    out = tmp_path / "sel"
    compare.compare("smoke", ["fedavg", "fedprox"], data=str(records_file), out=str(out), select=True,
                    grids=["fedavg:strategy.server_learning_rate=0.5,1.5", "fedprox:strategy.proximal_mu=0.1,3"],
                    overrides=[f"model.name={tiny_model_dir}", "model.dtype=fp32", "model.device=cpu", "lora.r=4",
                               "run.progress=false", "data.client_validation=0.2"])
    assert "wrote selection" in events
    assert "read test" in events and events.index("read test") > events.index("wrote selection"), events
    chosen = json.loads((out / "selection.json").read_text())["strategies"]
    runs = out / "runs"
    for label, names in {"fedavg": ["fedavg__server_learning_rate=0.5", "fedavg__server_learning_rate=1.5"],
                         "fedprox": ["fedprox__proximal_mu=0.1", "fedprox__proximal_mu=3"]}.items():
        val = {}
        for n in names:
            rows = server.RunDir(runs / n).events("round")
            assert all("eval" not in r for r in rows)  # no candidate was scored on the test split while training
            val[n] = rows[-1]["validation"]["loss"]
        assert chosen[label]["validation"] == val
        assert chosen[label]["selected"] == min(val, key=val.get)
    res = json.loads((out / "compare.json").read_text())
    for label, r in res["strategies"].items():
        assert r["selected"] == chosen[label]["selected"]
        assert [x for x, _ in r["curve"]] == [x for x, _ in r["validation_curve"]] == [0, 1, 2]
        assert r["candidates"][r["selected"]]["test"] == r["loss"]
    assert res["strategies"]["fedavg"]["options"]["server_learning_rate"] in (0.5, 1.5)
    # Centralized trained on the clients' training splits only: no validation record in its data
    central = (out / "data/centralized-train/client_000.jsonl").read_text().splitlines()
    assert len(central) == sum(c["train"] for c in json.loads(
        (runs / chosen["fedavg"]["selected"] / "run.json").read_text())["client_splits"].values())
    md = (out / "compare.md").read_text()
    assert "chosen" in md and "read" in md and chosen["fedprox"]["selected"].split("__")[1] in md.replace(" ", "")


def test_per_category_gaps_take_only_that_categorys_records():
    # records of "a": ours 10% above the reference on each; of "b": equal
    ref = [[2.0, 1], [4.0, 2], [3.0, 1], [5.0, 5]]
    ours = [[2.2, 1], [4.4, 2], [3.0, 1], [5.0, 5]]
    got = compare.by_category_gaps(ours, ref, ["a", "a", "b", "b"])
    assert got["a"] == pytest.approx([0.1, 0.1, 0.1]) and got["b"] == pytest.approx([0.0, 0.0, 0.0])


def test_spread_over_seeds_by_hand():
    per_seed = {}
    for seed, (loss, gap, vs, vs_lo, vs_hi) in {1: (2.0, 0.02, -0.01, -0.02, -0.005),
                                                 2: (2.2, 0.04, -0.02, -0.03, 0.001),
                                                 3: (2.1, 0.03, 0.0, -0.01, 0.01)}.items():
        per_seed[seed] = {"scale": "smoke", "data": "d", "test_records": 10,
                          "base": {"loss": 3.0}, "centralized": {"loss": 1.9},
                          "strategies": {"fedavg": {"loss": 2.0, "gap": 0.0, "gap_low": 0, "gap_high": 0,
                                                    "vs_fedavg": None},
                                         "fedprox": {"loss": loss, "gap": gap, "gap_low": gap - 0.01,
                                                     "gap_high": gap + 0.01, "vs_fedavg": [vs, vs_lo, vs_hi],
                                                     "vs_fedavg_by_category": {"qa": [vs, vs_lo, vs_hi]}}}}
    res = compare.over_seeds(per_seed)
    p = res["strategies"]["fedprox"]
    assert p["loss"]["mean"] == pytest.approx(2.1) and p["loss"]["sd"] == pytest.approx(0.1)  # sample sd of 2, 2.2, 2.1
    assert p["gap"]["min"] == pytest.approx(0.02) and p["gap"]["max"] == pytest.approx(0.04)
    assert (p["vs_fedavg_below"], p["vs_fedavg_above"]) == (1, 0)  # only seed 1's interval lies below zero
    assert p["vs_fedavg"]["mean"] == pytest.approx(-0.01)
    assert "vs_fedavg" not in res["strategies"]["fedavg"]
    md = compare.markdown_seeds(res)
    assert "below in 1, above in 0 of 3" in md and "- none" in md  # no category every seed separates from zero


def test_seeds_rerun_the_comparison_with_each_seed(tmp_path, tiny_model_dir, records_file):
    out = tmp_path / "cmp"
    compare.compare("smoke", ["fedavg", "fedprox"], data=str(records_file), out=str(out), seeds=[3, 4],
                    overrides=[f"model.name={tiny_model_dir}", "model.dtype=fp32", "model.device=cpu", "lora.r=4",
                               "run.progress=false"])
    res = json.loads((out / "compare-seeds.json").read_text())
    assert res["seeds"] == [3, 4]
    for seed in (3, 4):
        rows = server.RunDir(out / f"seed-{seed}/runs/fedavg").events("round")
        cfg = (out / f"seed-{seed}/runs/fedavg/config.toml").read_text()
        assert f"seed = {seed}" in cfg and len(rows) == 3
    # different seeds, different splits
    assert (out / "seed-3/data/fedit/client_000.jsonl").read_text() != (out / "seed-4/data/fedit/client_000.jsonl").read_text()
    losses = [json.loads((out / f"seed-{s}/compare.json").read_text())["strategies"]["fedprox"]["loss"] for s in (3, 4)]
    assert res["strategies"]["fedprox"]["loss"]["values"] == losses


def test_select_over_seeds_chooses_per_seed_and_spreads_per_category(tmp_path, tiny_model_dir, records_file):
    # each seed chooses on its own validation; the spread over seeds reads the per-category intervals
    out = tmp_path / "sel-seeds"
    compare.compare("smoke", ["fedavg", "fedprox"], data=str(records_file), out=str(out), select=True, seeds=[3, 4],
                    grids=["fedprox:strategy.proximal_mu=0.1,3"], test_rounds="last",
                    overrides=[f"model.name={tiny_model_dir}", "model.dtype=fp32", "model.device=cpu", "lora.r=4",
                               "run.progress=false", "data.client_validation=0.2", "federation.rounds=1"])
    res = json.loads((out / "compare-seeds.json").read_text())
    chosen = [json.loads((out / f"seed-{s}/selection.json").read_text())["strategies"]["fedprox"]["selected"]
              for s in (3, 4)]
    assert res["strategies"]["fedprox"]["selected"] == chosen
    per_seed = [json.loads((out / f"seed-{s}/compare.json").read_text())["strategies"]["fedprox"] for s in (3, 4)]
    for c, spread in res["strategies"]["fedprox"]["vs_fedavg_by_category"].items():
        gaps = [r["vs_fedavg_by_category"][c][0] for r in per_seed]
        assert spread["mean"] == pytest.approx(sum(gaps) / 2)
        assert spread["below"] == sum(r["vs_fedavg_by_category"][c][2] < 0 for r in per_seed)
    # --test-rounds last: one test pass per final adapter (base, Centralized, the candidates), none per round
    # (with every round, round 0's adapter would be scored too)
    for s in (3, 4):
        runs = out / f"seed-{s}/runs"
        finals = {hashlib.sha256((d / "adapter/adapter_model.safetensors").read_bytes()).hexdigest()
                  for d in runs.iterdir()}
        assert set(json.loads((out / f"seed-{s}/test_scores.json").read_text())) == {"test_sha256", "base", *finals}
        assert [x for x, _ in json.loads((out / f"seed-{s}/compare.json").read_text())["strategies"]["fedavg"]
                ["curve"]] == [1]
    md = (out / "compare-seeds.md").read_text()
    assert "option chosen on validation, per seed" in md
    assert ", ".join(x.split("__")[1] for x in chosen) in md


def test_test_rounds_is_checked_before_anything_runs(tmp_path):
    with pytest.raises(FeditError, match="is for --select"):
        compare.compare("smoke", ["fedavg"], data=str(tmp_path / "none.jsonl"), out=str(tmp_path / "o"),
                        test_rounds="last")
    with pytest.raises(FeditError, match="choose all or last"):
        compare.compare("smoke", ["fedavg"], data=str(tmp_path / "none.jsonl"), select=True, test_rounds="first")
    assert not (tmp_path / "o").exists()
