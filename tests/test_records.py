import json

import pytest

from fedit.data.records import load_records, parse_mapping
from fedit.errors import FeditError

from conftest import write_jsonl


def test_dolly_and_alpaca_schemas_without_options(tmp_path):
    dolly = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Say hi", "context": "", "response": "Hi", "category": "open_qa"}])
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"}]))
    (d,) = load_records(dolly).records
    (a,) = load_records(alpaca).records
    assert (d.instruction, d.response, d.category) == ("Say hi", "Hi", "open_qa")
    assert (a.instruction, a.context, a.response, a.category) == ("Add", "1+1", "2", "uncategorized")


def test_field_mapping(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "Q", "answer": "A", "topic": "t"}])
    (r,) = load_records(f, parse_mapping("instruction=prompt,response=answer,category=topic")).records
    assert (r.instruction, r.response, r.category) == ("Q", "A", "t")
    with pytest.raises(FeditError, match="FIELD=SOURCE_NAME"):
        parse_mapping("question=prompt")


def test_bad_rows_skipped_with_line_and_reason(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "ok", "response": "fine", "category": "c"},       # 1
        {"instruction": "", "response": "x", "category": "c"},           # 2 empty instruction
        {"instruction": "no response", "category": "c"},                 # 3 missing response -> no schema match
        "{not json",                                                      # 4
        "[1, 2]",                                                         # 5 not an object
        {"instruction": "q", "response": 5, "category": "c"},             # 6 wrong type
        {"instruction": "q", "response": "   ", "category": "c"},         # 7 blank response
        {"instruction": "q2", "context": None, "response": "r", "category": None},  # 8 ok, nulls tolerated
    ])
    res = load_records(f)
    assert [r.instruction for r in res.records] == ["ok", "q2"]
    reasons = dict(res.skipped)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7]
    assert "empty instruction" in reasons[2]
    assert "no instruction/response fields" in reasons[3]
    assert "invalid JSON" in reasons[4]
    assert "not a JSON object" in reasons[5]
    assert "expected text" in reasons[6]
    assert "empty response" in reasons[7]
    assert "6 rows skipped" in res.skipped_summary()


def test_unusable_inputs_are_one_clear_error(tmp_path):
    with pytest.raises(FeditError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", ')
    with pytest.raises(FeditError, match="not valid JSON"):
        load_records(broken)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "", "response": ""}])
    with pytest.raises(FeditError, match="no usable records"):
        load_records(empty)
    with pytest.raises(FeditError, match="is a directory"):
        load_records(tmp_path)


def test_hub_dataset_id_goes_through_datasets(monkeypatch):
    import datasets

    seen = {}

    def fake_load(name, split):
        seen["args"] = (name, split)
        return datasets.Dataset.from_list([{"instruction": "q", "input": "", "output": "a"},
                                           {"instruction": "", "input": "", "output": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    res = load_records("someone/alpaca-like", split="train[:10]")
    assert seen["args"] == ("someone/alpaca-like", "train[:10]")
    assert [r.response for r in res.records] == ["a"] and res.skipped == [(2, "empty instruction (field 'instruction')")]


def test_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FeditError, match="could not load hub dataset 'nobody/no-such-dataset'"):
        load_records("nobody/no-such-dataset")
