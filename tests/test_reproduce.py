"""`fedit reproduce`: the baselines' data, the scale settings, and a smoke run on the tiny model."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fedit import config, reproduce, server
from fedit.data.records import load_records
from fedit.errors import FeditError

from conftest import write_jsonl


def test_baseline_datasets(tmp_path, records_file):
    # 48 records, 12 per category; 2 per category held out -> 40 training records, 10 per category.
    scale = reproduce.SCALES["smoke"]
    ds = reproduce.build_data(load_records(records_file), scale, seed=3, out=tmp_path)
    s = ds.sizes
    assert s["fedit"]["examples"] == 40 and s["fedit"]["clients"] == 4 and sum(s["fedit"]["client_sizes"]) == 40
    assert s["fedit"]["typical_client"] == 10  # 40 training records / 4 clients
    assert s["local-1"]["categories"] == {"brainstorming": 10}
    assert s["local-2"]["categories"] == {"closed_qa": 10}
    assert s["local-3"]["categories"] == {"brainstorming": 5, "classification": 5}
    assert s["centralized"]["categories"] == {c: 10 for c in ("brainstorming", "classification", "closed_qa", "open_qa")}
    test = load_records(ds.test_file).records
    assert Counter(r.category for r in test) == {c: 2 for c in s["centralized"]["categories"]}
    train = {json.dumps(r.__dict__) for p in (tmp_path / "data/fedit").glob("client_*.jsonl") for r in load_records(p).records}
    for name in ("local-1", "local-2", "local-3", "centralized"):
        d = tmp_path / "data" / name
        files = sorted(d.glob("client_*.jsonl"))
        assert len(files) == 1 and (d / "test.jsonl").read_text() == ds.test_file.read_text()
        own = {json.dumps(r.__dict__) for r in load_records(files[0]).records}
        assert own <= train and not own & {json.dumps(r.__dict__) for r in test}
    central = {json.dumps(r.__dict__) for r in load_records(tmp_path / "data/centralized/client_000.jsonl").records}
    assert central == train


def test_an_iid_split_keeps_the_test_records_and_deals_the_rest_evenly(tmp_path):
    rows = [{"instruction": f"q{i} {c}", "response": f"a{i}", "category": c}
            for c in ("brainstorming", "closed_qa", "classification", "open_qa") for i in range(40)]
    data = load_records(write_jsonl(tmp_path / "r.jsonl", rows))
    scale = reproduce.Scale("t", "test", records=0, test_per_category=2, clients=8, min_client_size=2)
    dirichlet = reproduce.build_data(data, scale, seed=0, out=tmp_path / "d")
    iid = reproduce.build_data(data, scale, seed=0, out=tmp_path / "i", scheme="iid")
    assert iid.test_file.read_text() == dirichlet.test_file.read_text()  # drawn before the clients
    # 160 records - 8 held out = 152 over 8 clients: 19 each; the Dirichlet split is uneven
    assert iid.sizes["fedit"]["client_sizes"] == [19] * 8 != dirichlet.sizes["fedit"]["client_sizes"]
    manifest = json.loads((tmp_path / "i/data/fedit/manifest.json").read_text())
    assert manifest["scheme"] == "iid"


def test_locals_are_disjoint_when_the_category_has_enough(tmp_path):
    rows = [{"instruction": f"q{i} {c}", "response": f"a{i}", "category": c}
            for c in ("brainstorming", "closed_qa", "classification", "open_qa") for i in range(40)]
    data = write_jsonl(tmp_path / "r.jsonl", rows)
    scale = reproduce.Scale("t", "test", records=0, test_per_category=2, clients=8, min_client_size=2)
    ds = reproduce.build_data(load_records(data), scale, seed=0, out=tmp_path / "o")
    typical = round(152 / 8)
    assert ds.sizes["local-1"]["examples"] == typical == 19
    # 19 split as evenly as possible, the odd one to the first-named category (classification)
    assert ds.sizes["local-3"]["categories"] == {"brainstorming": 9, "classification": 10}
    read = lambda n: {r.instruction for r in load_records(tmp_path / "o/data" / n / "client_000.jsonl").records}
    assert not read("local-1") & read("local-3")


def test_scale_settings_and_precedence(tmp_path):
    small = reproduce.resolve_config(reproduce.SCALES["small"], None, [])
    assert (small.federation.rounds, small.federation.clients_per_round) == (5, 4)
    assert (small.train.batch_size, small.train.lr, small.train.cutoff_len) == (16, 5e-4, 256)
    paper = reproduce.resolve_config(reproduce.SCALES["paper"], None, [])
    assert paper.federation.rounds == 20 and paper.train.batch_size == 32 and paper.train.lr == 1.5e-4
    assert paper.train.cutoff_len == 512 and paper.lora.r == 8 and reproduce.SCALES["paper"].clients == 100
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 2e-4\ncutoff_len = 64\n")
    cfg = reproduce.resolve_config(reproduce.SCALES["small"], str(f), ["train.lr=3e-4"])
    assert cfg.train.lr == 3e-4 and cfg.train.cutoff_len == 64 and cfg.train.batch_size == 16  # file, then overrides
    with pytest.raises(FeditError) as e:
        reproduce.resolve_config(reproduce.SCALES["smoke"], None, ["train.lr=-1", "nope"])
    assert str(e.value).startswith("2 problem(s)")
    text = reproduce.describe(reproduce.SCALES["small"], small)
    assert "5 rounds x 4 clients" in text and "batch 16" in text and "2040 records" in text


def test_smoke_reproduction_with_judge(tmp_path, tiny_model_dir, records_file):
    from test_judge import ScriptedJudge

    qfile = write_jsonl(tmp_path / "vicuna.jsonl", [
        {"question_id": i, "category": ["generic", "knowledge"][i % 2], "turns": [f"Explain topic {i}."]}
        for i in range(1, 6)])
    overrides = [f"model.name={tiny_model_dir}", "model.dtype=fp32", "model.device=cpu", "lora.r=4",
                 "run.progress=false", "eval.max_new_tokens=12", "judge.model=m", "judge.samples=1",
                 "judge.questions=3", "judge.backoff=0"]
    out = tmp_path / "rep"
    # "7 2" for every review: the judge always prefers the first answer; both orders cancel that exactly.
    with ScriptedJudge([("reply", "7 2")] * 30) as srv:
        reproduce.reproduce("smoke", data=str(records_file), out=str(out), questions=str(qfile),
                            overrides=overrides + [f"judge.url={srv.url}"])
        served = len(srv.requests)
    assert served == 30  # 5 baselines x 3 questions x 2 orders x 1 sample
    for name in ("report.md", "report.png", "table3.md", "results.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert set(res["judge"]) == {"base", "local-1", "local-2", "local-3", "centralized"}
    for j in res["judge"].values():
        assert j["calls"]["planned"] == j["calls"]["parsed"] == j["calls"]["http_requests"] == 6
        assert j["relative"] == 1.0 and j["candidate_total"] == 3 * 4.5

    # Each baseline is one client, one round, one epoch over its own records; FedIT is the federated run.
    runs = out / "runs"
    from transformers import AutoTokenizer

    from fedit.data.batches import tokenize
    from fedit.data.records import load_records

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, n in (("local-1", 10), ("local-2", 10), ("local-3", 10), ("centralized", 40)):
        rounds = server.RunDir(runs / name).events("round")
        (client,) = server.RunDir(runs / name).events("client")
        # the examples it learnt from: those whose response survives the smoke scale's cutoff of 128 tokens
        exs = tokenize(load_records(out / "data" / name / "client_000.jsonl").records, tok, 128)
        assert len(exs) == n and 0 < client["num_examples"] == sum(1 for e in exs if e.trained_tokens) <= n
        assert [r["round"] for r in rounds] == [0, 1]
        assert client["metrics"]["steps"] == -(-n // 8)  # one epoch at batch 8
        assert res["runs"][name]["trained_examples"] == client["num_examples"]
    fed = server.RunDir(runs / "fedit").events("round")
    assert [r["round"] for r in fed] == [0, 1, 2] and all(len(r["clients"]) == 2 for r in fed[1:])
    assert config.load(runs / "fedit" / "config.toml").train.lr == 1e-3  # the smoke scale's settings

    # The evaluation agrees with the runs' own held-out evaluation: base = round 0, fedit = its last round.
    m = res["metrics"]
    assert m["base"]["loss"] == pytest.approx(fed[0]["eval"]["loss"], rel=1e-5)
    assert m["fedit"]["loss"] == pytest.approx(fed[-1]["eval"]["loss"], rel=1e-5)
    assert m["centralized"]["loss"] == pytest.approx(server.RunDir(runs / "centralized").events("round")[1]["eval"]["loss"], rel=1e-5)
    md = (out / "report.md").read_text()
    for name in ("base", "local-1", "local-2", "local-3", "centralized"):
        assert f"| {name} | {m[name]['rouge_l']:.4f} | {m['fedit']['rouge_l']:.4f} |" in md
        assert f"| {name} | {m[name]['loss']:.4f} | {m['fedit']['loss']:.4f} | {m['fedit']['loss'] / m[name]['loss']:.3f} |" in md
    assert "| base | 13.50 | 13.50 | 1.000 | 3/3 | 6 | 6 | 0 | 0 | 0 |" in md
    t3 = (out / "table3.md").read_text()
    # one question of each of two categories (the smoke scale shows 2), every model's answer beside the others
    assert t3.count("## Question") == 2 and t3.count("| **fedit** |") == 2 and t3.count("| **local-3** |") == 2

    # A second call reuses the finished runs and evaluations; other settings in the same --out are refused.
    before = {p: p.read_bytes() for p in list(runs.rglob("metrics.jsonl")) + list((out / "eval").glob("*.json"))}
    reproduce.reproduce("smoke", data=str(records_file), out=str(out), overrides=overrides)
    assert all(p.read_bytes() == b for p, b in before.items())
    with pytest.raises(FeditError, match="other settings"):
        reproduce.reproduce("smoke", data=str(records_file), out=str(out), overrides=overrides + ["train.lr=5e-4"])
    # Other data into the same --out: the finished runs were trained on the old data, so none is reused.
    from conftest import make_records

    other = write_jsonl(tmp_path / "other.jsonl", [dict(r, response=r["response"] + " Indeed.")
                                                   for r in make_records()])
    with pytest.raises(FeditError, match="trained on other data than --data gives now"):
        reproduce.reproduce("smoke", data=str(other), out=str(out), overrides=overrides)
