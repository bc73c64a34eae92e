"""The throughput benchmark on the tiny model: every side trains the same examples and the report adds up."""

import json

import pytest

from benchmarks import bench, throughput

from conftest import DOLLY


def test_throughput_measures_packed_padded_and_naive_on_the_same_tokens(tiny_model_dir):
    r = throughput.run(str(tiny_model_dir), n_clients=1, per_client=4, cutoff=128, batch_size=4, micro=2, repeats=1,
                       data=DOLLY)
    real = r["workload"]["real_tokens"]
    assert r["packed"] and r["attention"] == "fedit_cpu_causal"
    # Each side trained every real token once; the naive loop also computed its padding.
    assert r["fedit"]["tokens"] == r["fedit_padded"]["tokens"] == r["naive"]["tokens"] == real
    assert r["workload"]["padded_tokens_naive"] >= real
    assert r["packing_speedup"] == r["fedit"]["tokens_per_s"] / r["fedit_padded"]["tokens_per_s"]
    assert r["speedup"] == r["fedit"]["tokens_per_s"] / r["naive"]["tokens_per_s"]
    assert 0 < r["fedit"]["mfu_bf16"] < 1 and r["peak_flops"]["bf16"] > 0
    # one repetition: one MFU, against the peak measured right after it
    assert r["fedit"]["all_mfu_bf16"] == [r["fedit"]["mfu_bf16"]]
    assert r["peak_flops"]["bf16_all"] == [r["peak_flops"]["bf16"]]
    row = next(line for line in bench.table({"machine": "m", "model": "tiny", "started": "now", "throughput": r,
                                             **_rest()}).splitlines() if "padded micro-batches instead" in line)
    assert f"{r['packing_speedup']:.2f}x" in row


def _throughput() -> dict:
    """The throughput part of a report, fedit's side only (measured elsewhere)."""
    return {"fedit": {"tokens_per_s": 300.0, "mfu_bf16": 0.2, "all_mfu_bf16": [0.2]}, "fedit_dtype": "bf16",
            "peak_flops": {"bf16": 6.9e11, "bf16_all": [6.9e11], "fp32": 1.4e11},
            "workload": {"clients": 1, "examples_per_client": 4, "cutoff": 128, "batch_size": 4,
                         "micro_batch_size": 2, "real_tokens": 100, "padded_tokens_naive": 120}}


def _rest() -> dict:
    """The round-level parts of a report, as `fedit bench` writes them (measured elsewhere)."""
    return {"round_overhead": {"clients_per_round": 5, "steps_per_client": 1, "overhead_share": 0.01},
            "evaluation": {"eval_seconds": 1.0},
            "aggregation": {"clients": 100, "adapter_mb": 9.3, "seconds": 0.5, "peak_rss_increase_mb": 20},
            "memory": {"peak_rss_mb": {"10": 6000, "1000": 6100}, "ratio": 1.02},
            "communication": {"bytes_down": 1, "bytes_up": 9, "adapter_params": 1}}


def test_protocol_rounds_project_the_whole_protocol_and_run_again_in_the_same_place(tmp_path, tiny_model_dir):
    from benchmarks import rounds
    from conftest import make_records, write_jsonl

    data = write_jsonl(tmp_path / "records.jsonl", make_records(20))
    for _ in range(2):  # a second bench over the same work directory replaces the first's run
        p = rounds.protocol(tmp_path / "work", rounds=2, model=str(tiny_model_dir), data=str(data), clients=10)
    assert (p["rounds"], p["of_rounds"], p["clients_per_round"]) == (2, 20, 5)
    assert p["records"] == 40  # 4 categories x 20, less 10 held out per category
    # what the 2 rounds trained: the records of the clients each round selected, by the partition's manifest
    manifest = json.loads((tmp_path / "work" / "dolly-10-dirichlet" / "manifest.json").read_text())
    size = {c["id"]: c["examples"] for c in manifest["clients"]}
    rows = [json.loads(line) for line in (tmp_path / "work" / "protocol-run" / "metrics.jsonl").open()]
    selected = [c for r in rows if r["event"] == "round" and r["round"] > 0 for c in r["clients"]]
    assert len(selected) == 10 and p["records_trained"] == sum(size[c] for c in selected)
    # training scales with the records (all 40 in expectation), the rest of a round with the 20 rounds
    assert p["train_seconds"] > 0 and p["projected_hours"] * 3600 == pytest.approx(
        p["train_seconds"] * 40 / p["records_trained"] + p["rest_seconds"] * 20 / 2)
    assert p["peak_rss_mb"] > 0
    row = next(line for line in bench.table({"machine": "m", "model": "tiny", "started": "now",
                                             "throughput": _throughput(), **_rest(), "protocol": p}).splitlines()
               if "protocol" in line)
    assert "5 of 10 Dirichlet clients" in row and "2 of 20 rounds" in row
    assert f"whole protocol projected {p['projected_hours']:.1f} h" in row


def test_protocol_with_and_without_the_token_budget(tmp_path, tiny_model_dir):
    """The memory row compares the same round with the default budget and with none, on the same clients."""
    from benchmarks import rounds
    from conftest import make_records, write_jsonl

    data = write_jsonl(tmp_path / "records.jsonl", make_records(20))
    kw = dict(rounds=1, model=str(tiny_model_dir), data=str(data), clients=10)
    p = rounds.protocol(tmp_path / "work", **kw, overrides=["train.micro_batch_tokens=16"])
    q = rounds.protocol(tmp_path / "work", **kw, overrides=["train.micro_batch_tokens=0"], name="no-budget")
    assert (p["micro_batch_tokens"], q["micro_batch_tokens"]) == (16, 0)
    assert p["records_trained"] == q["records_trained"] > 0  # the same clients and examples
    run = lambda name: [json.loads(line) for line in (tmp_path / "work" / name / "metrics.jsonl").open()]  # noqa: E731
    tokens = lambda rows: sum(c["metrics"]["trained_tokens"] for c in rows if c["event"] == "client")  # noqa: E731
    secs = lambda rows: sum(c["metrics"]["seconds"] for c in rows if c["event"] == "client")  # noqa: E731
    a, b = run("protocol-run"), run("no-budget")
    assert tokens(a) == tokens(b) and p["tokens_per_s"] == pytest.approx(tokens(a) / secs(a))
    row = next(line for line in bench.table({"machine": "m", "model": "tiny", "started": "now",
                                             "throughput": _throughput(), **_rest(), "protocol": p,
                                             "protocol_no_budget": q}).splitlines() if "bounded by" in line)
    assert f"peak RSS {p['peak_rss_mb']:,.0f} vs {q['peak_rss_mb']:,.0f} MB" in row
    assert f"({100 * (p['tokens_per_s'] / q['tokens_per_s'] - 1):+.1f}%)" in row
