"""Conversations: the two formats, validation, the chat template's assistant-only labels, fitting
to cutoff_len, natural clients (--by), and a run on conversation data end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fedit import runner, server
from fedit.data import partition
from fedit.data.batches import IGNORE, tokenize
from fedit.data.records import Record, load_records
from fedit.errors import FeditError

from conftest import make_records, tiny_config, write_jsonl

# Two chat templates of different shapes, as their models ship them (ChatML: SmolLM2, Qwen; Llama 3).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# A template made of the tiny model's own special tokens, so that the tiny model can train on it.
TINY = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

CONV = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "And 4 plus 4?"}, {"role": "assistant", "content": "The answer is 8."}]


def tokenizer_with(tiny_model_dir, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = template
    return tok


def labelled_runs(tok, ex) -> list[str]:
    """The labelled tokens of an example, decoded run by run."""
    runs, cur = [], []
    for t, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            assert label == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_both_formats_load_alike_and_bad_conversations_are_reported(tmp_path):
    sharegpt = [{"conversations": [{"from": "system", "value": "Answer briefly."},
                                   {"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "It is 5."},
                                   {"from": "human", "value": "And 4 plus 4?"},
                                   {"from": "gpt", "value": "The answer is 8."}], "user": "ann"}]
    (tmp_path / "chats.json").write_text(json.dumps(sharegpt))
    bad = [{"messages": CONV, "user": "ann"},
           {"messages": [{"role": "user", "content": "Hi"}]},                                   # 2
           {"messages": [{"role": "bot", "content": "Hi"}]},                                    # 3
           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},  # 4
           {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]},  # 5
           {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},        # 6
           {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "system", "content": "c"}, {"role": "assistant", "content": "d"}]},  # 7
           {"messages": "hello"},                                                                # 8
           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": 3}]},   # 9
           {"messages": CONV + [{"role": "user", "content": "Thanks!"}]}]                        # 10: unanswered
    jl = load_records(write_jsonl(tmp_path / "chats.jsonl", bad), keep=("user",))
    js = load_records(tmp_path / "chats.json", keep=("user",))
    turns = (("system", "Answer briefly."), ("user", "What is 2 plus 3?"), ("assistant", "It is 5."),
             ("user", "And 4 plus 4?"), ("assistant", "The answer is 8."))
    assert js.records == [Record("And 4 plus 4?", "", "The answer is 8.", "uncategorized", turns, (("user", "ann"),))]
    assert jl.records[0] == js.records[0]
    assert jl.records[1].messages == turns  # the unanswered last question is dropped, the rest kept
    assert [n for n, _ in jl.skipped] == [2, 3, 4, 5, 6, 7, 8, 9]
    reasons = dict(jl.skipped)
    assert reasons[2] == "no assistant turn"
    assert "unknown role 'bot'" in reasons[3] and "empty content" in reasons[4]
    assert "an assistant turn where a user turn belongs" in reasons[5]
    assert "a user turn where an assistant turn belongs" in reasons[6]
    assert "a system turn after the first turn" in reasons[7] and "not a non-empty list" in reasons[8]
    assert "non-text value" in reasons[9]
    # the partition files keep the conversation: written and read back, the same record
    write_jsonl(tmp_path / "back.jsonl", [js.records[0].to_json()])
    assert load_records(tmp_path / "back.jsonl", keep=("user",)).records == js.records
    with pytest.raises(FeditError, match="no usable records"):
        load_records(write_jsonl(tmp_path / "none.jsonl", bad[1:3]))


@pytest.mark.parametrize("template,end", [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")])
def test_chat_template_labels_every_assistant_turn_and_nothing_else(tiny_model_dir, template, end):
    tok = tokenizer_with(tiny_model_dir, template)
    rec = load_records_from_rows([{"messages": CONV}])[0]
    ex = tokenize([rec], tok, 512, template="chat")[0]
    # the whole conversation as the template renders it, tokenized as one text
    assert ex.input_ids == tok(tok.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"]
    # labelled: each answer and its end-of-turn marker; headers, system and user turns never
    assert labelled_runs(tok, ex) == ["It is 5." + end, "The answer is 8." + end]
    assert not ex.dropped_turns and not ex.cut
    # everything labelled with train_on_inputs
    assert tokenize([rec], tok, 512, train_on_inputs=True, template="chat")[0].labels == ex.input_ids


def load_records_from_rows(rows):
    from fedit.data.records import _to_record

    return [_to_record(r, {}) for r in rows]


def test_an_instruction_row_under_the_chat_template_is_one_exchange(tiny_model_dir):
    tok = tokenizer_with(tiny_model_dir, CHATML)
    ex = tokenize([Record("Name a colour.", "Pick one.", "Blue.", "open_qa")], tok, 512, template="chat")[0]
    text = "<|im_start|>user\nName a colour.\n\nPick one.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
    assert ex.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert labelled_runs(tok, ex) == ["Blue.<|im_end|>"]


def test_alpaca_tokenizes_prompt_and_response_as_one_text(tiny_model_dir):
    from transformers import AutoTokenizer

    from fedit.data.prompts import ALPACA_NO_INPUT

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    r = Record("Name a colour.", "", "Blue.", "open_qa")
    prompt = ALPACA_NO_INPUT.format(instruction="Name a colour.")
    full = tok(prompt + "Blue.")["input_ids"] + [tok.eos_token_id]
    n = len(tok(prompt)["input_ids"])
    ex = tokenize([r], tok, 512)[0]
    assert ex.input_ids == full and ex.labels == [IGNORE] * n + full[n:]
    with pytest.raises(FeditError, match='data.template = "chat"'):
        tokenize(load_records_from_rows([{"messages": CONV}]), tok, 512)
    with pytest.raises(FeditError, match="has none"):  # no chat template on this tokenizer
        tokenize([r], tok, 512, template="chat")


def test_a_long_conversation_loses_its_oldest_exchanges_first_and_keeps_the_system_turn(tiny_model_dir):
    tok = tokenizer_with(tiny_model_dir, CHATML)
    turns = [("user", "What is 2 plus 3?"), ("assistant", "It is 5."), ("user", "And 4 plus 4?"),
             ("assistant", "The answer is 8."), ("user", "And 9 plus 1?"), ("assistant", "Ten, which is 10.")]
    conv = [{"role": "system", "content": "Answer briefly."}] + [{"role": r, "content": c} for r, c in turns]
    rec = load_records_from_rows([{"messages": conv}])[0]

    def chatml(msgs):  # the rendering written out by hand
        return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in msgs)

    system = [("system", "Answer briefly.")]
    last_two = tok(chatml(system + turns[2:]), add_special_tokens=False)["input_ids"]
    everything = tok(chatml(system + turns), add_special_tokens=False)["input_ids"]
    assert len(last_two) < len(everything)
    ex = tokenize([rec], tok, len(last_two), template="chat")[0]
    assert ex.input_ids == last_two and ex.dropped_turns == 2 and not ex.cut
    assert labelled_runs(tok, ex) == ["The answer is 8.<|im_end|>", "Ten, which is 10.<|im_end|>"]
    # one token short of the last two exchanges: only the last one is left
    last = tok(chatml(system + turns[4:]), add_special_tokens=False)["input_ids"]
    ex = tokenize([rec], tok, len(last_two) - 1, template="chat")[0]
    assert ex.input_ids == last and ex.dropped_turns == 4
    # shorter than the last exchange itself: that one is cut at the end, its header kept
    ex = tokenize([rec], tok, len(last) - 3, template="chat")[0]
    assert ex.input_ids == last[:-3] and ex.cut and ex.dropped_turns == 4
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    # fitting everything: nothing dropped
    assert tokenize([rec], tok, len(everything), template="chat")[0].input_ids == everything


def test_natural_clients_one_per_user_with_small_ones_left_out(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q {u} {i}"}, {"role": "assistant", "content": f"a {i}"}],
             "user": u, "category": "chat"}
            for u, n in (("bob", 3), ("ann", 6), ("cy", 1)) for i in range(n)]
    rows.append({"messages": [{"role": "user", "content": "anonymous"}, {"role": "assistant", "content": "a"}],
                 "category": "chat"})
    src = write_jsonl(tmp_path / "chats.jsonl", rows)
    m, loaded = partition.make(str(src), tmp_path / "parts", by="user", min_size=2, test_per_category=1, seed=3)
    test = load_records(tmp_path / "parts" / "test.jsonl", keep=("user",)).records
    assert len(test) == 1
    held = test[0].field("user")
    sizes = {"ann": 6, "bob": 3, "cy": 1, None: 1}
    sizes[held] -= 1
    # clients in sorted order of the value, each holding exactly that user's other conversations
    expect = [u for u in ("ann", "bob") if sizes[u] >= 2]
    assert m["by"] == "user" and [c["value"] for c in m["clients"]] == expect
    for c in m["clients"]:
        recs = load_records(tmp_path / "parts" / c["file"], keep=("user",)).records
        assert {r.field("user") for r in recs} == {c["value"]} and len(recs) == c["examples"] == sizes[c["value"]]
    small = [u for u in ("ann", "bob", "cy") if 0 < sizes[u] < 2]
    assert m["left_out"] == {"records_without_field": sizes[None], "clients_below_min_size": len(small),
                             "records_of_those_clients": sum(sizes[u] for u in small)}
    assert any("left out" in line for line in partition.describe(m, loaded))
    with pytest.raises(FeditError, match="no client left"):
        partition.make(str(src), tmp_path / "none", by="user", min_size=50, test_per_category=1)
    # a field named like a manifest key does not replace it
    src_id = write_jsonl(tmp_path / "ids.jsonl", [dict(r, id=r.get("user", "x")) for r in rows])
    m_id, _ = partition.make(str(src_id), tmp_path / "by-id", by="id", test_per_category=1, seed=3)
    assert [c["id"] for c in m_id["clients"]] == list(range(len(m_id["clients"])))


def test_label_makes_another_field_the_category(tmp_path):
    rows = [dict(r, lang=("en" if i % 3 else "fr")) for i, r in enumerate(make_records(6))]
    m, _ = partition.make(str(write_jsonl(tmp_path / "r.jsonl", rows)), tmp_path / "p", clients=2, scheme="iid",
                          label="lang", test_per_category=2, seed=1)
    assert m["categories"] == ["en", "fr"] and m["test"]["categories"] == {"en": 2, "fr": 2}
    assert sum(sum(c["categories"].values()) for c in m["clients"]) == 24 - 4


def test_conversations_partitioned_by_user_train_resume_and_evaluate(tmp_path, tiny_model_dir):
    """JSONL (messages) and JSON (ShareGPT) conversations through `fedit partition --by user` and a run."""
    from fedit import cli

    model = tmp_path / "tiny-chat"
    shutil.copytree(tiny_model_dir, model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = TINY
    tok.save_pretrained(model)
    base = make_records(8)
    convs = []
    for k in range(0, len(base) - 1, 2):
        a, b = base[k], base[k + 1]
        convs.append({"messages": [{"role": "user", "content": a["instruction"]},
                                   {"role": "assistant", "content": a["response"]},
                                   {"role": "user", "content": b["instruction"]},
                                   {"role": "assistant", "content": b["response"]}],
                      "user": f"u{k % 3}", "category": a["category"]})
    for fmt, path in (("jsonl", tmp_path / "chats.jsonl"), ("json", tmp_path / "chats.json")):
        if fmt == "jsonl":
            write_jsonl(path, convs + [{"messages": [{"role": "user", "content": "no answer"}]}])
        else:
            path.write_text(json.dumps([{"conversations": [{"from": {"user": "human", "assistant": "gpt"}[t["role"]],
                                                            "value": t["content"]} for t in c["messages"]],
                                         "user": c["user"], "category": c["category"]} for c in convs]))
        parts = tmp_path / f"parts-{fmt}"
        assert cli.main(["partition", "--data", str(path), "--by", "user", "--test-per-category", "1",
                         "--out", str(parts)]) in (0, None)
        m = json.loads((parts / "manifest.json").read_text())
        assert [c["value"] for c in m["clients"]] == ["u0", "u1", "u2"]
        assert len(m["skipped"]) == (1 if fmt == "jsonl" else 0)
    # the ShareGPT partition trains too (one round), the JSONL one is followed below
    one = runner.run(tiny_config(model, tmp_path / "parts-json", tmp_path / "run-json", data={"template": "chat"},
                                 federation={"rounds": 1, "clients_per_round": 3}))
    assert [r["accepted"] for r in server.RunDir(one).events("round")] == [0, 3]
    cfg = tiny_config(model, tmp_path / "parts-jsonl", tmp_path / "run", data={"template": "chat"},
                      federation={"rounds": 2, "clients_per_round": 3})
    run_dir = runner.run(cfg)
    rounds = server.RunDir(run_dir).events("round")
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["eval"]["loss"] < rounds[0]["eval"]["loss"]
    # resumed one round further, from the saved config
    (run_dir / "config.toml").write_text((run_dir / "config.toml").read_text().replace("rounds = 2", "rounds = 3"))
    runner.run(None, resume=str(run_dir))
    assert [r["round"] for r in server.RunDir(run_dir).events("round")] == [0, 1, 2, 3]
    # evaluation asks each held-out conversation's last question after the turns before it
    from fedit.evaluation.questions import load_questions

    qs = load_questions(tmp_path / "parts-jsonl" / "test.jsonl")
    assert all(len(q.history) == 2 and q.history[0][0] == "user" for q in qs.questions)
    from fedit.data.prompts import record_prompt

    q = qs.questions[0]
    assert record_prompt(q.record(), "chat", tok) == (
        f"<s>user\n{q.history[0][1]}</s>\n<s>assistant\n{q.history[1][1]}</s>\n<s>user\n{q.instruction}</s>\n"
        f"<s>assistant\n")


def test_generation_sees_a_chat_prompt_as_training_does(tiny_model_dir):
    """A chat template that writes its own BOS, on a tokenizer that also adds one: the prompt
    generation is given is tokenized as training tokenizes it, one BOS, not two."""
    from tokenizers import processors

    from fedit.data.prompts import record_prompt
    from fedit.inference import generate
    from fedit.model import Loaded

    tok = tokenizer_with(tiny_model_dir, LLAMA3)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    seen = []

    class Model:  # records what generate is given, answers with EOS
        def generate(self, input_ids, attention_mask, **kw):
            seen.append(input_ids[0].tolist())
            return torch.cat([input_ids, torch.tensor([[tok.eos_token_id]])], dim=1)

    loaded = Loaded(Model(), tok, torch.device("cpu"), torch.float32, "test")
    rec = load_records_from_rows([{"messages": CONV}])[0]
    generate(loaded, [record_prompt(rec, "chat", tok)], add_special_tokens=False)
    trained = tokenize([rec], tok, 512, template="chat")[0].input_ids
    assert seen[0] == trained[:len(seen[0])] and seen[0].count(1) == 1
    generate(loaded, [record_prompt(rec, "chat", tok)])  # the default (alpaca prompts) adds the tokenizer's BOS
    assert seen[1][:2] == [1, 1]
