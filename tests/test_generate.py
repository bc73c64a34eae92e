"""`fedit generate` and the inference helpers under it, on the tiny random Llama.

The adapter is random and far from zero, so base + adapter answers differently from
the base; greedy decoding makes every answer reproducible.
"""

import json
import shutil

import pytest
import torch

from fedit import config
from fedit.checkpoint import atomic_write
from fedit.data.prompts import prompt
from fedit.errors import FeditError
from fedit.inference import (ALPACA_STOPS, _stop_prefix_len, answer, cut_at_stop, describe_adapter, generate,
                             load_for_inference, resolve_adapter, stream)
from fedit.adapter import get_adapter, save_adapter
from fedit.model import attach_lora, load_base
from fedit.cli import main
from fedit.use_cli import read_prompts

from conftest import tiny_config, write_jsonl

QUESTIONS = ["Question 3 about closed_qa: what is 3 plus 2?", "hello there", "What is the answer for open_qa?"]


def make_run_dir(root, model_dir, template="alpaca", seed=0, scale=0.3):
    """A run directory as `fedit run` leaves it (config.toml + adapter/), with random non-zero LoRA weights."""
    cfg = tiny_config(model_dir, root / "no-clients", root, data={"template": template})
    loaded = load_base(cfg.model)
    attach_lora(loaded, cfg.lora, seed)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * scale for k, v in get_adapter(loaded.model).items()}
    root.mkdir(parents=True, exist_ok=True)
    save_adapter(loaded.model, state, root / "adapter")
    atomic_write(root / "config.toml", config.to_toml(cfg))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return make_run_dir(tmp_path_factory.mktemp("gen") / "run", tiny_model_dir)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_for_inference(run_dir, dtype="fp32", device="cpu")


# ---------------------------------------------------------------- finding the adapter

def test_describe_adapter_from_run_adapter_round_and_bare_dirs(tmp_path, run_dir, tiny_model_dir):
    info = describe_adapter(run_dir)
    assert info.adapter_dir == run_dir / "adapter" and info.run_dir == run_dir
    assert info.model == str(tiny_model_dir) and info.template == "alpaca" and info.cutoff_len == 256
    assert describe_adapter(run_dir / "adapter") == info
    assert resolve_adapter(run_dir) == (run_dir / "adapter", str(tiny_model_dir))

    # an unfinished run: no adapter/ yet, the last completed round named by state.json
    part = tmp_path / "part"
    shutil.copytree(run_dir / "adapter", part / "rounds" / "round_0003")
    shutil.copy(run_dir / "config.toml", part / "config.toml")
    (part / "state.json").write_text(json.dumps({"round": 3, "adapter": "rounds/round_0003"}))
    info = describe_adapter(part)
    assert info.adapter_dir == part / "rounds" / "round_0003" and info.run_dir == part
    assert describe_adapter(part / "rounds" / "round_0003").run_dir == part

    # an adapter copied out of its run: the base model peft recorded, the alpaca template
    bare = shutil.copytree(run_dir / "adapter", tmp_path / "bare")
    info = describe_adapter(bare)
    assert info.run_dir is None and info.model == str(tiny_model_dir) and info.template == "alpaca"


def test_adapter_user_errors(tmp_path):
    with pytest.raises(FeditError, match=r"does not exist; pass a fedit run directory"):
        describe_adapter(tmp_path / "missing")
    with pytest.raises(FeditError, match=r"neither a PEFT adapter directory .* pass RUN_DIR or RUN_DIR/adapter"):
        describe_adapter(tmp_path)
    (tmp_path / "config.toml").write_text("[data]\n")
    with pytest.raises(FeditError, match=r"has no adapter yet"):
        describe_adapter(tmp_path)


# ---------------------------------------------------------------- generation and streaming

def test_the_adapter_changes_the_answers(run_dir, loaded, tiny_model_dir):
    base = load_for_inference(None, model=str(tiny_model_dir), dtype="fp32", device="cpu")
    prompts = [prompt(q) for q in QUESTIONS]
    assert generate(base, prompts, max_new_tokens=24) != generate(loaded, prompts, max_new_tokens=24)


def test_stream_pieces_join_to_the_generated_answer(loaded):
    pieces_per_answer = []
    for q in QUESTIONS:
        p = prompt(q)
        whole = generate(loaded, [p], max_new_tokens=40, stop=ALPACA_STOPS)[0]
        pieces = list(stream(loaded, p, max_new_tokens=40, stop=ALPACA_STOPS))
        assert "".join(pieces) == whole and whole
        assert all(pieces)
        pieces_per_answer.append(len(pieces))
    assert max(pieces_per_answer) > 1  # it does stream, not only hand over the whole answer


def test_stop_strings_end_the_answer_in_generate_and_stream(loaded):
    p = prompt(QUESTIONS[0])
    full = generate(loaded, [p], max_new_tokens=40)[0]
    assert len(full) > 24
    stop = full[12:20]  # pretend the model began a new section there
    expected = full[:full.find(stop)].strip()
    assert generate(loaded, [p], max_new_tokens=40, stop=[stop])[0] == expected
    assert "".join(stream(loaded, p, max_new_tokens=40, stop=[stop])) == expected


def test_stream_stops_the_model_when_closed_early(loaded):
    it = stream(loaded, prompt(QUESTIONS[0]), max_new_tokens=400)
    first = next(it)
    it.close()  # returns only once the generation thread has ended
    assert first and not any(t.name == "fedit-generate" for t in __import__("threading").enumerate())


def test_cut_at_stop_and_held_back_prefix():
    assert cut_at_stop("an answer\n\n### Instruction:\nmore", ALPACA_STOPS) == "an answer\n"
    assert cut_at_stop("Paris.\n### Explanation:\nbecause", ALPACA_STOPS) == "Paris."
    assert cut_at_stop("no stop here, not even ###", ALPACA_STOPS) == "no stop here, not even ###"
    # eval, generate and chat cut at the same place (one list of stops)
    from fedit.evaluation.evaluate import clean_answer

    for text in ("Paris.\n### Explanation:\nbecause", "### Response: x", " Paris.\n\n### Instruction:\nName"):
        assert clean_answer(text, "alpaca") == cut_at_stop(text, ALPACA_STOPS).strip()
    assert clean_answer("Paris.\n### Explanation:\nbecause", "alpaca") == "Paris."
    assert cut_at_stop("ab<stop>cd<end>", ["<end>", "<stop>"]) == "ab"  # the first one in the text wins
    assert _stop_prefix_len("an answer\n##", ALPACA_STOPS) == 3
    assert _stop_prefix_len("an answer\n", ALPACA_STOPS) == 1
    assert _stop_prefix_len("an answer #", ALPACA_STOPS) == 1  # could begin "### Response:"
    assert _stop_prefix_len("an answer", ALPACA_STOPS) == 0


# ---------------------------------------------------------------- the command

def _cli(*args):
    return main(["generate", *map(str, args), "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "24"])


def test_generate_one_prompt_prints_the_answer(run_dir, loaded, capsys):
    assert _cli("--adapter", run_dir, "--prompt", QUESTIONS[0]) == 0
    out = capsys.readouterr().out
    expected = answer(loaded, QUESTIONS[0], max_new_tokens=24, stop=ALPACA_STOPS)
    assert expected and out.endswith(expected + "\n")

    assert _cli("--adapter", run_dir, "--prompt", QUESTIONS[0], "--context", "Some context for closed_qa.") == 0
    with_ctx = answer(loaded, QUESTIONS[0], "Some context for closed_qa.", max_new_tokens=24, stop=ALPACA_STOPS)
    assert capsys.readouterr().out.endswith(with_ctx + "\n")


def test_generate_file_of_prompts_to_jsonl(tmp_path, run_dir, loaded):
    rows = [{"instruction": QUESTIONS[0], "context": "Some context."}, {"instruction": QUESTIONS[1]},
            {"instruction": QUESTIONS[2], "input": "alpaca-style input"}]
    f = write_jsonl(tmp_path / "prompts.jsonl", rows[:1] + [""] + rows[1:])  # blank lines are skipped
    out = tmp_path / "answers" / "out.jsonl"
    assert _cli("--adapter", run_dir / "adapter", "--file", f, "--out", out, "--batch-size", "1") == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    ctx = ["Some context.", "", "alpaca-style input"]
    assert [g["instruction"] for g in got] == QUESTIONS and [g["context"] for g in got] == ctx
    assert [g["response"] for g in got] == [answer(loaded, q, c, max_new_tokens=24, stop=ALPACA_STOPS)
                                            for q, c in zip(QUESTIONS, ctx)]


def test_read_prompts_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first question\n\n  second question  \n")
    assert read_prompts(tmp_path / "p.txt") == [("first question", ""), ("second question", "")]
    write_jsonl(tmp_path / "p.jsonl", [{"instruction": "q", "context": "c"}, '"just a string"'])
    assert read_prompts(tmp_path / "p.jsonl") == [("q", "c"), ("just a string", "")]


def test_generate_user_errors_name_the_input(tmp_path, run_dir, capsys):
    assert _cli("--adapter", tmp_path / "nope", "--prompt", "hi") == 2
    err = capsys.readouterr().err
    assert f"adapter {tmp_path / 'nope'} does not exist" in err and "Traceback" not in err

    assert _cli("--adapter", run_dir, "--file", tmp_path / "missing.jsonl") == 2
    assert f"prompt file {tmp_path / 'missing.jsonl'} does not exist; pass --file" in capsys.readouterr().err

    write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok"}, "{not json", {"instruction": "x"}])
    assert _cli("--adapter", run_dir, "--file", tmp_path / "bad.jsonl") == 2
    assert "bad.jsonl line 2: not JSON" in capsys.readouterr().err

    write_jsonl(tmp_path / "noinst.jsonl", [{"question": "where is the instruction?"}])
    assert _cli("--adapter", run_dir, "--file", tmp_path / "noinst.jsonl") == 2
    assert "noinst.jsonl line 1: no non-empty string 'instruction'" in capsys.readouterr().err

    (tmp_path / "empty.txt").write_text("\n\n")
    assert _cli("--adapter", run_dir, "--file", tmp_path / "empty.txt") == 2
    assert "has no prompts" in capsys.readouterr().err

    assert _cli("--adapter", run_dir, "--file", tmp_path / "empty.txt", "--context", "c") == 2
    assert "--context goes with --prompt" in capsys.readouterr().err


def test_generate_uses_the_runs_template(tmp_path, tiny_model_dir, capsys):
    """A run trained with the 'chat' template is prompted with it (the tiny tokenizer has none: a clear error)."""
    chat_run = make_run_dir(tmp_path / "chat-run", tiny_model_dir, template="chat")
    assert describe_adapter(chat_run).template == "chat"
    assert _cli("--adapter", chat_run, "--prompt", "hi") == 2
    assert "no chat template; use --template alpaca" in capsys.readouterr().err
    assert _cli("--adapter", chat_run, "--prompt", "hi", "--template", "alpaca") == 0
