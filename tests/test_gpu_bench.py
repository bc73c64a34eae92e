"""The GPU benchmark's parts that need no GPU: model shapes, the kit, the bookkeeping, packing on
transformers' own attention (what CUDA runs), deterministic kernels as an option."""

import json
import os
import time
from dataclasses import replace

import pytest
import torch

from benchmarks import gpu, gpu_prepare, shapes, throughput
from conftest import make_records, write_jsonl


# ---------------------------------------------------------------- shapes

def test_smollm2_shape_has_its_parameter_count_and_the_7b_shape_llama2s_without_building_weights():
    # SmolLM2-135M: 134,515,008 parameters (embeddings tied to the LM head)
    small = shapes.llama_config("smollm2-135m")
    assert shapes.param_count(small) == 134_515_008
    assert abs(shapes.param_count(small) / 135e6 - 1) < 0.01
    # Llama-2-7B by hand: per layer q, k, v, o (4096 x 4096 each), gate/up/down (4096 x 11008), two norms;
    # then the final norm, the embeddings and an untied LM head (32,000 x 4096 each).
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    by_hand = 32 * per_layer + 4096 + 2 * 32000 * 4096
    assert by_hand == 6_738_415_616
    assert shapes.param_count(shapes.llama_config("llama2-7b")) == by_hand
    # the model transformers builds has exactly those parameters: on the meta device, no memory at all
    for name, expected in (("smollm2-135m", 134_515_008), ("llama2-7b", by_hand)):
        model = shapes.build(name, "meta", torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == expected
        assert next(model.parameters()).device.type == "meta"


def test_smollm2_shape_matches_the_real_models_config():
    from fedit.config import DEFAULT_MODEL
    from fedit.weights import resolve_source

    from transformers import AutoConfig

    # a local copy, or a hub id transformers fetches: as the real-model test gets the model
    real = AutoConfig.from_pretrained(resolve_source(DEFAULT_MODEL)).to_dict()
    for key, value in shapes.SHAPES["smollm2-135m"].items():
        if key in real:
            assert real[key] == value, key


def test_tiny_shape_builds_and_trains():
    torch.manual_seed(0)
    model = shapes.build("tiny")
    ids = torch.randint(0, 512, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad is not None


def test_token_ids_fold_into_a_smaller_vocabulary_with_the_same_work():
    from fedit.data.batches import IGNORE, Example

    exs = [Example([5, 40000, 700], [IGNORE, 40000, 33000], "x"), Example([1, 2], [IGNORE, 2], "y")]
    folded = gpu.for_vocab(exs, 32000)
    assert folded[0].input_ids == [5, 8000, 700] and folded[0].labels == [IGNORE, 8000, 1000]
    assert [e.trained_tokens for e in folded] == [e.trained_tokens for e in exs]
    assert gpu.for_vocab(exs[1:], 32000) is not None and gpu.for_vocab(exs[1:], 32000)[0] is exs[1]


# ---------------------------------------------------------------- bookkeeping

def test_mfu_is_model_flops_over_time_over_the_measured_peak():
    cfg = shapes.llama_config("tiny")  # hidden 64, 2 layers, 4 heads / 2 kv heads of 16, MLP 128, vocab 512
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    flops = 4 * per_layer * 2 * 1000 + 4 * 512 * 64 * 400  # 1,000 tokens, 400 of them labelled
    r = gpu.account(cfg, tokens=1000, labelled=400, seconds=2.0, peak_flops=1e12)
    assert r["model_flops"] == flops
    assert r["tokens_per_s"] == 500.0
    assert r["mfu"] == pytest.approx(flops / 2.0 / 1e12)
    # against a higher peak measured later, the MFU of the same measurement falls in proportion
    assert gpu.account_again(r, 2e12)["mfu"] == pytest.approx(r["mfu"] / 2)
    # the projection: tokens / throughput, in hours
    assert gpu.project(2_732_396, 500.0) == pytest.approx(2_732_396 / 500 / 3600)


def test_summary_pairs_cases_that_differ_in_one_option_and_projects_the_protocol():
    def row(tps, **kw):
        c = {"shape": "llama2-7b", "loop": "fedit", "micro": 8, "packed": False, "checkpointing": False,
             "micro_tokens": 1024, "deterministic": False, "lean_lora": False, "quantize": "none", **kw}
        return {**c, "case": gpu.Case(**c).name, "status": "ok", "tokens_per_s": tps}

    cases = [row(1000.0), row(800.0, checkpointing=True), row(1300.0, packed=True), row(200.0, loop="naive",
                                                                                        checkpointing=True),
             row(900.0, deterministic=True), row(1100.0, lean_lora=True),
             {**row(0.0, micro=32), "status": "oom", "tokens_per_s": None}]
    s = gpu.summarize(cases, {"expected_tokens": 2.7e6}, "llama2-7b")
    effects = {e["effect"]: e["ratio"] for e in s["effects"]}
    assert effects == {"checkpointing": 0.8, "packed": 1.3, "deterministic": 0.9, "lean_lora": 1.1}
    (naive,) = s["fedit_over_naive"]
    assert naive["best"]["ratio"] == 1300 / 200 and naive["same_checkpointing_and_micro"]["ratio"] == 800 / 200
    p = s["projection"]
    assert p["fedit_hours"] == pytest.approx(2.7e6 / 1300 / 3600) and p["naive_hours"] == pytest.approx(2.7e6 / 200 / 3600)
    assert (p["paper_hours"], p["users_a100_hours"]) == (2.0, 13.5)


# ---------------------------------------------------------------- the kit and the run, end to end

@pytest.fixture()
def kit(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "records.jsonl", make_records(20))  # 80 records, 4 categories
    gpu_prepare.prepare(tmp_path / "kit", tokenizer_dir=tiny_model_dir, data=data, n=16, protocol_clients=4)
    return tmp_path / "kit"


def test_kit_holds_the_tokenizer_a_seeded_sample_and_the_protocols_tokens(kit, tiny_model_dir):
    from transformers import AutoTokenizer

    from fedit.data import partition
    from fedit.data.batches import tokenize
    from fedit.data.records import load_records
    from fedit.strategies.base import Strategy

    meta = json.loads((kit / "kit.json").read_text())
    assert meta["records"] == 16 and len((kit / "dolly.jsonl").read_text().splitlines()) == 16
    assert not list(kit.rglob("*.safetensors"))  # no weights travel
    tok = AutoTokenizer.from_pretrained(kit / "tokenizer")
    assert tok("hello world")["input_ids"] == AutoTokenizer.from_pretrained(tiny_model_dir)("hello world")["input_ids"]
    # the protocol: 20 rounds x 4 of 4 clients -> every client 20 times; tokens of the training records by hand
    records = load_records(str(kit.parent / "records.jsonl")).records
    split = partition.split(records, 4, "dirichlet", alpha=0.5, seed=42, test_per_category=10)
    exs = tokenize(records, tok, 512)
    train_tokens = sum(len(exs[i].input_ids) for c in split.clients for i in c)
    p = meta["protocol"]
    assert p["training_records"] == 80 - 4 * 10 and p["draws_per_client"] == 20.0
    assert p["expected_tokens"] == 20 * train_tokens
    drawn = [c for r in range(1, 21) for c in Strategy().select(r, [0, 1, 2, 3], 5, 42)]
    assert p["fedit_draw"]["tokens"] == sum(len(exs[i].input_ids) for c in drawn for i in split.clients[c])


def test_smoke_run_counts_real_tokens_and_computes_mfu_against_the_measured_peak(kit, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from fedit.data.batches import tokenize
    from fedit.data.records import load_records

    monkeypatch.setattr(gpu, "matmul_peak", lambda device, n: 1e11)  # the "measured" peak, fixed
    # imported an hour before the run (as in a long test session): the budget counts from main(), not the import
    monkeypatch.setattr(gpu, "STARTED", time.time() - 3600)
    out = tmp_path / "out"
    r = gpu.main(["--smoke", "--kit", str(kit), "--out", str(out)])
    assert json.loads((out / "gpu.json").read_text()) == json.loads(json.dumps(r))
    md = (out / "gpu.md").read_text()
    rows = {c["case"]: c for c in r["cases"]}
    assert set(rows) == {c.name for c in gpu.smoke_plan()} and all(name in md for name in rows)

    # what each case trained, tokenized here independently: 2 clients x 4 examples
    tok = AutoTokenizer.from_pretrained(kit / "tokenizer")
    exs = tokenize(load_records(str(kit / "dolly.jsonl")).records, tok, 512)[:8]
    real = sum(len(e.input_ids) for e in exs)  # non-padding input tokens
    labelled = sum(e.trained_tokens for e in exs)
    cfg = shapes.llama_config("tiny")
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    flops = 4 * per_layer * 2 * real + 4 * 512 * 64 * labelled
    assert r["peak_flops"]["used"] == 1e11
    measured = [c for c in r["cases"] if "tokens_per_s" in c]
    assert {c["loop"] for c in measured} == {"naive", "fedit"} and len(measured) == 6
    for c in measured:
        assert c["status"] == "ok" and (c["tokens"], c["labelled_tokens"]) == (real, labelled), c["case"]
        assert c["model_flops"] == flops == throughput.train_flops(cfg, real, labelled)
        assert c["tokens_per_s"] == pytest.approx(real / c["train_seconds"])
        assert c["mfu"] == pytest.approx(flops / c["train_seconds"] / 1e11)
    # a CPU trains the same client to the same bits twice, with or without deterministic kernels
    ex = rows["tiny, exactness"]
    assert ex["default"]["bit_identical"] and ex["deterministic"]["bit_identical"]
    assert not torch.are_deterministic_algorithms_enabled()  # switched back off after its cases
    assert rows[gpu.Case("tiny", micro=2, quantize="4bit").name]["status"] == "not available"
    # the projection from the measured throughput of the projected shape (tiny here)
    p = r["summary"]["projection"]
    fastest = max((c for c in measured if c["loop"] == "fedit" and not c["deterministic"]),
                  key=lambda c: c["tokens_per_s"])
    assert p["fedit_case"] == fastest["case"]
    assert p["fedit_hours"] == pytest.approx(json.loads((kit / "kit.json").read_text())["protocol"]["expected_tokens"]
                                             / fastest["tokens_per_s"] / 3600)
    assert "2 hours" in md and "13.5 hours" in md


def test_a_failing_case_is_recorded_and_the_run_goes_on_and_the_budget_stops_cases(kit, tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(gpu, "matmul_peak", lambda device, n: 1e11)
    calls = []

    def fake(self, case):
        calls.append(case.name)
        if case.packed:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if case.checkpointing:
            time.sleep(30)  # runs past the budget: stopped by the alarm
        if case.loop == "naive":
            raise RuntimeError("something else broke")
        return {"tokens": 1}

    monkeypatch.setattr(gpu.Bench, "throughput", fake)
    monkeypatch.setattr(gpu.Bench, "estimate", lambda self, case: 0.0)
    monkeypatch.setattr(gpu, "STARTED", time.time())
    r = gpu.main(["--smoke", "--kit", str(kit), "--out", str(tmp_path / "out"), "--time-budget", "3"])
    rows = {c["case"]: c for c in r["cases"]}

    def row(loop="fedit", **kw):
        return rows[gpu.Case("tiny", loop, micro=2, **kw).name]

    assert row("naive")["status"] == "error" and "something else broke" in row("naive")["why"]
    assert row()["status"] == "ok" and row(micro_tokens=0)["status"] == "ok"
    assert row(packed=True)["status"] == "oom"
    stopped = row(checkpointing=True)
    assert stopped["status"] == "error" and "time budget" in stopped["why"] and stopped["wall_s"] < 10
    # after the budget: nothing else starts
    assert row(deterministic=True)["status"] == "skipped"
    assert len(calls) == 5


# ---------------------------------------------------------------- packing on transformers' attention (CUDA's path)

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_micro_batch_gives_each_examples_own_loss_on_transformers_attention(tiny_model_dir, attention):
    """Position ids restarting at 0 are all transformers needs to keep packed examples apart
    (a block-diagonal causal mask): the packed row's token losses are those of each example alone."""
    from transformers import AutoModelForCausalLM

    from fedit.data.batches import IGNORE, Example, make_batch, pack
    from fedit.token_loss import token_losses

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    assert model.config.use_cache  # token_losses turns the cache off itself (with one, packing would leak)
    g = torch.Generator().manual_seed(1)
    exs = []
    for n, prompt in ((9, 3), (17, 5), (4, 1)):
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
        exs.append(Example(ids, [IGNORE] * prompt + ids[prompt:], "x"))
    packed = pack(exs)
    assert packed["position_ids"][0].tolist() == list(range(9)) + list(range(17)) + list(range(4))
    with torch.no_grad():
        losses, rows = token_losses(model, make_batch(exs, 0, True, torch.device("cpu")))
        alone = [token_losses(model, make_batch([e], 0, False, torch.device("cpu")))[0] for e in exs]
    assert rows.tolist() == [i for i, e in enumerate(exs) for _ in range(e.trained_tokens)]
    torch.testing.assert_close(losses, torch.cat(alone), rtol=1e-5, atol=1e-5)
    # without the restarting position ids the examples would see each other: the test can tell
    leaky = {k: v for k, v in packed.items() if k not in ("position_ids", "cu_seq_lens")}
    with torch.no_grad():
        mixed, _ = token_losses(model, leaky)
    assert not torch.allclose(mixed, torch.cat(alone), atol=1e-3)


def test_packing_is_an_option_of_the_model_config(tiny_model_dir):
    from fedit.config import ModelConfig
    from fedit.model import load_base

    def packed(**kw):
        return load_base(ModelConfig(name=str(tiny_model_dir), dtype="fp32", device="cpu", **kw)).packed

    assert packed() and packed(packing="packed") and not packed(packing="padded")


# ---------------------------------------------------------------- deterministic kernels

def test_deterministic_option_sets_cublas_workspace_and_torchs_flag_and_back(monkeypatch):
    from fedit.model import use_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        use_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        use_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_option_leaves_cpu_training_alone(tiny_model_dir):
    from fedit.config import ModelConfig
    from fedit.model import load_base

    load_base(ModelConfig(name=str(tiny_model_dir), dtype="fp32", device="cpu", deterministic=True))
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_gpu_plan_runs_through_on_a_cpu_with_its_shapes_made_tiny(kit, tmp_path, monkeypatch):
    """Every case of the GPU run, and every ratio its summary promises, with tiny stand-ins for the
    135M and 7B shapes: what can fail without a GPU fails here first."""
    monkeypatch.setitem(shapes.SHAPES, "smollm2-135m", shapes.SHAPES["tiny"])
    monkeypatch.setitem(shapes.SHAPES, "llama2-7b", {**shapes.SHAPES["tiny"], "vocab_size": 256})
    monkeypatch.setattr(gpu, "matmul_peak", lambda device, n: 1e11)
    plan = gpu.cuda_plan()
    assert len({c.name for c in plan}) == len(plan)
    # one client each, and no naive loop (the smoke test runs it): the options are what is checked here
    naive = [c for c in plan if c.loop == "naive"]
    assert {(c.shape, c.checkpointing) for c in naive} == {("smollm2-135m", False), ("llama2-7b", True)}
    plan = [replace(c, clients=1) for c in plan if c.loop != "naive"]
    monkeypatch.setattr(gpu, "STARTED", time.time() - 3600)  # imported an hour before: the budget is the bench's own
    bench = gpu.Bench(kit, tmp_path / "out", "cpu", False, 600, batch_size=8, per_client=4, peak_n=64)
    r = bench.run(plan)
    status = {c["case"]: c["status"] for c in r["cases"]}
    assert status.pop(gpu.Case("llama2-7b", quantize="4bit", checkpointing=True).name) == "not available"
    assert set(status.values()) == {"ok"}, status
    s = r["summary"]
    assert {e["effect"] for e in s["effects"]} == {"packed", "checkpointing", "deterministic", "lean_lora", "micro",
                                                  "micro_tokens"}
    # each naive case has a fedit case with its checkpointing and micro-batch to compare with
    names = {c.name for c in gpu.cuda_plan()}
    assert all(gpu.Case(c.shape, micro=c.micro, checkpointing=c.checkpointing).name in names for c in naive)
    assert s["projection"]["shape"] == "llama2-7b" and s["projection"]["fedit_hours"] > 0
    # the 7B stand-in's vocabulary is smaller than the tokenizer's: ids folded, the same tokens counted
    seven = next(c for c in r["cases"] if c["case"] == gpu.Case("llama2-7b").name)
    small = next(c for c in r["cases"] if c["case"] == gpu.Case("smollm2-135m").name)
    assert seven["tokens"] == small["tokens"] == sum(len(e.input_ids) for e in bench.examples[:4])
    assert max(bench.examples[0].input_ids) >= 256  # so the 7B stand-in's run did fold ids
