"""`fedit eval` on the tiny random Llama: metrics, masking, question sets, errors, judge wiring."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from fedit import config, runner, server
from fedit.data.prompts import prompt as make_prompt
from fedit.data.records import load_records
from fedit.errors import FeditError
from fedit.evaluation.evaluate import clean_answer, mean_by_category, rouge_l
from fedit.evaluation.pipeline import run_eval
from fedit.evaluation.questions import load_questions

from conftest import VICUNA, tiny_config, write_jsonl


def test_rouge_l_hand_computed():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 of 6 tokens each way.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == [pytest.approx(5 / 6)]
    # Tokens are lower-cased and stemmed ("Cats" -> "cat"); punctuation is dropped. P = 2/2, R = 2/4 -> F = 2/3.
    assert rouge_l(["Cats, sleeping!"], ["the cat is sleeping"]) == [pytest.approx(2 / 3)]
    assert rouge_l(["alpha beta"], ["gamma delta"]) == [0.0]


def test_mean_by_category():
    m = mean_by_category([1.0, 0.0, 0.5, 0.25], ["a", "b", "a", "b"])
    assert m == {"mean": pytest.approx(0.4375), "by_category": {"a": 0.75, "b": 0.125}}


def test_clean_answer_cuts_invented_template_sections():
    assert clean_answer(" Paris.\n\n### Instruction:\nName a city.", "alpaca") == "Paris."
    assert clean_answer("### Response: x", "alpaca") == ""
    assert clean_answer("A ### heading stays", "alpaca") == "A ### heading stays"
    assert clean_answer(" text ### Instruction: kept in chat ", "chat") == "text ### Instruction: kept in chat"


def test_vicuna_subset_is_seeded_and_in_file_order():
    # the sample holds Vicuna-80's odd question ids 1, 3, ..., 79: ids are not line numbers
    full = load_questions(VICUNA, limit=0)
    assert full.kind == "vicuna" and len(full.questions) == 40 == full.total and not full.has_references
    assert [int(q.id) for q in full.questions] == list(range(1, 80, 2))
    a, b, c = (load_questions(VICUNA, limit=20, seed=s) for s in (42, 42, 7))
    ids = [int(q.id) for q in a.questions]
    assert len(ids) == 20 == len(set(ids)) and ids == sorted(ids) and a.total == 40
    assert set(ids) <= set(range(1, 80, 2))
    assert [q.id for q in b.questions] == [q.id for q in a.questions]
    assert [q.id for q in c.questions] != [q.id for q in a.questions]
    first = {q.id: q for q in full.questions}["1"]
    assert first.instruction == "How can I improve my time management skills?" and first.category == "generic"


def test_question_file_errors(tmp_path):
    with pytest.raises(FeditError, match="does not exist.*--data"):
        load_questions(tmp_path / "missing.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"foo": 1}', "not json"])
    with pytest.raises(FeditError, match="no usable records"):
        load_questions(bad)


def _manual_losses(model_dir, records, adapter_dir=None):
    """Per-category mean loss of response+EOS tokens, computed from the plain HF logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    sums, counts = {}, {}
    for r in records:
        p = tok(make_prompt(r.instruction, r.context))["input_ids"]
        a = tok(r.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        # token t is predicted at position t-1; only the response and EOS count
        nll = [-logp[len(p) + j - 1, t].item() for j, t in enumerate(a)]
        sums[r.category] = sums.get(r.category, 0.0) + sum(nll)
        counts[r.category] = counts.get(r.category, 0) + len(nll)
    return {c: sums[c] / counts[c] for c in sums}, sum(sums.values()) / sum(counts.values())


@pytest.fixture()
def trained_run(tmp_path, tiny_model_dir, partition_dir):
    cfg = tiny_config(tiny_model_dir, partition_dir, tmp_path / "run", federation={"rounds": 1, "clients_per_round": 3})
    return runner.run(cfg)


def eval_cfg(*extra):
    return config.load(None, ["model.dtype=fp32", "model.device=cpu", "eval.max_new_tokens=8", "eval.batch_size=3",
                              *extra])


def test_eval_run_dir_against_base(tmp_path, tiny_model_dir, partition_dir, trained_run):
    test_file = partition_dir / "test.jsonl"
    out = run_eval(str(trained_run), str(test_file), eval_cfg(), baseline="base", out=str(tmp_path / "ev"))
    res = json.loads((out / "results.json").read_text())
    tuned, base = res["results"]["run"], res["results"]["base model"]
    assert res["model"] == str(tiny_model_dir) and res["questions"] == 8 and res["judge"] is None
    records = load_records(test_file).records
    # Held-out loss = the training loss on unseen records: prompt masked, response + EOS counted.
    # Checked against plain HF logits, and against the run's own evaluation (round 0 = base, round 1 = tuned).
    for r, adapter in ((base, None), (tuned, trained_run / "adapter")):
        by_cat, overall = _manual_losses(tiny_model_dir, records, adapter)
        assert r["loss"]["loss"] == pytest.approx(overall, rel=1e-4)
        assert r["loss"]["by_category"] == pytest.approx(by_cat, rel=1e-4)
        assert r["loss"]["perplexity"] == pytest.approx(math.exp(overall), rel=1e-4)
        assert r["loss"]["perplexity_by_category"] == pytest.approx({c: math.exp(v) for c, v in by_cat.items()}, rel=1e-4)
    run_evals = [row["eval"]["loss"] for row in server.RunDir(trained_run).events("round")]
    assert base["loss"]["loss"] == pytest.approx(run_evals[0], rel=1e-5)
    assert tuned["loss"]["loss"] == pytest.approx(run_evals[1], rel=1e-5)
    assert tuned["loss"]["loss"] != pytest.approx(base["loss"]["loss"], rel=1e-6)  # the adapter is really applied
    # ROUGE-L: one score per answer against its reference; the reported means are their means.
    for r in (tuned, base):
        rows = r["answers"]
        assert [a["reference"] for a in rows] == [rec.response for rec in records]
        assert [a["rouge_l"] for a in rows] == pytest.approx(rouge_l([a["answer"] for a in rows],
                                                                     [a["reference"] for a in rows]))
        assert r["rouge_l"]["mean"] == pytest.approx(sum(a["rouge_l"] for a in rows) / len(rows))
        for cat, v in r["rouge_l"]["by_category"].items():
            vals = [a["rouge_l"] for a in rows if a["category"] == cat]
            assert v == pytest.approx(sum(vals) / len(vals))
    md = (out / "report.md").read_text()
    for cat in ("brainstorming", "classification", "closed_qa", "open_qa"):
        assert f"| {cat} | 2 |" in md
    assert "relative (run / baseline)" in md
    assert f"{tuned['loss']['loss'] / base['loss']['loss']:.3f}" in md


def test_greedy_answers_are_deterministic_and_ignore_train_mode(tmp_path, tiny_model_dir, partition_dir):
    from fedit.evaluation.evaluate import Settings, generate_answers
    from fedit.adapter import set_adapter
    from fedit.model import attach_lora, load_base
    from fedit.config import LoraConfig, ModelConfig

    loaded = load_base(ModelConfig(name=str(tiny_model_dir), dtype="fp32", device="cpu"))
    attach_lora(loaded, LoraConfig(r=4, alpha=8, dropout=0.5), seed=0)
    # a non-zero adapter, so that LoRA dropout (in train mode) would change the answers
    set_adapter(loaded.model, {k: torch.randn_like(v) * 0.5 for k, v in loaded.initial_adapter.items()})
    qset = load_questions(partition_dir / "test.jsonl")
    s = Settings(max_new_tokens=6, batch_size=3)
    loaded.model.eval()
    first = generate_answers(loaded, qset, s)
    loaded.model.train()  # as after training
    second = generate_answers(loaded, qset, s)
    assert first == second and any(first)
    assert loaded.model.training and loaded.tokenizer.padding_side == "right" and not loaded.model.config.use_cache
    # batching and left padding do not change a greedy answer
    one = generate_answers(loaded, replace(qset, questions=qset.questions[:1]), replace(s, batch_size=1))
    assert one == [first[0]]


def test_eval_errors_name_the_input(tmp_path, partition_dir, trained_run):
    with pytest.raises(FeditError, match=r"--adapter .*missing-run does not exist"):
        run_eval(str(tmp_path / "missing-run"), str(partition_dir / "test.jsonl"), eval_cfg())
    with pytest.raises(FeditError, match="neither a PEFT adapter directory"):
        run_eval(str(partition_dir), str(partition_dir / "test.jsonl"), eval_cfg())
    with pytest.raises(FeditError, match="test file .*nope.jsonl does not exist"):
        run_eval(str(trained_run), str(tmp_path / "nope.jsonl"), eval_cfg())
    with pytest.raises(FeditError, match="judge.model"):
        eval_cfg("judge.url=http://127.0.0.1:9/v1")


def test_eval_with_judge_on_vicuna_questions(tmp_path, tiny_model_dir, trained_run):
    from test_judge import ScriptedJudge

    qfile = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": i, "category": "generic" if i % 2 else "knowledge", "turns": [f"Tell me about topic {i}."]}
        for i in range(1, 7)])
    # Always "9 3": the judge prefers whichever answer comes first; both orders cancel it.
    with ScriptedJudge([("reply", "9 3")] * 16) as srv:
        cfg = eval_cfg(f"judge.url={srv.url}", "judge.model=m", "judge.samples=2", "judge.questions=4",
                       "judge.backoff=0")
        out = run_eval(str(trained_run), str(qfile), cfg, out=str(tmp_path / "ev"))
        served = len(srv.requests)
    res = json.loads((out / "results.json").read_text())
    j = res["judge"]
    assert served == 16 == j["calls"]["planned"] == j["calls"]["parsed"]  # 4 questions x 2 orders x 2 samples
    assert j["baseline"] == "base model" and j["relative"] == 1.0 and j["candidate_total"] == 4 * 6.0
    assert res["questions"] == 4 and "loss" not in res["results"]["run"]
    assert "LLM judge" in (out / "report.md").read_text()
