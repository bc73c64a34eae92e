"""`fedit export`: the merged model loads without peft and answers like base + adapter."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedit.errors import FeditError
from fedit.export import export
from fedit.inference import ALPACA_STOPS, answer, load_for_inference
from fedit.cli import main

from test_generate import QUESTIONS, make_run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return make_run_dir(tmp_path_factory.mktemp("export") / "run", tiny_model_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run_dir):
    return export(run_dir, tmp_path_factory.mktemp("exported") / "merged")


def logits(model, tok, text):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_merged_model_has_the_logits_of_base_plus_adapter(exported, run_dir, tiny_model_dir):
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(exported)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_logits = logits(base, tok, QUESTIONS[0])
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    want = logits(tuned, tok, QUESTIONS[0])
    got = logits(merged, tok, QUESTIONS[0])
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert (want - base_logits).abs().max() > 0.1  # the adapter is not the identity


def test_merged_model_answers_like_base_plus_adapter(exported, run_dir):
    tuned = load_for_inference(run_dir, dtype="fp32", device="cpu")
    merged = load_for_inference(None, model=str(exported), dtype="fp32", device="cpu")
    for q in QUESTIONS:
        want = answer(tuned, q, max_new_tokens=24, stop=ALPACA_STOPS)
        assert want and answer(merged, q, max_new_tokens=24, stop=ALPACA_STOPS) == want


def test_export_records_where_it_came_from(exported, run_dir, tiny_model_dir):
    meta = json.loads((exported / "fedit_export.json").read_text())
    assert meta["adapter"] == str((run_dir / "adapter").resolve()) and meta["template"] == "alpaca"
    assert meta["base_model"] == str(tiny_model_dir) and meta["dtype"] == "fp32"
    assert json.loads((exported / "config.json").read_text())["use_cache"] is True
    assert not list(exported.parent.glob(".merged.*"))  # no temporary left beside it


def test_export_command_bf16_into_an_empty_dir(tmp_path, run_dir, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["export", "--adapter", str(run_dir / "adapter"), "--out", str(out), "--dtype", "bf16"]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_export_refuses_a_non_empty_dir(tmp_path, run_dir, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--adapter", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty; fedit export never overwrites" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeditError, match="is a file"):
        export(run_dir, tmp_path / "file")


def test_export_missing_adapter_writes_nothing(tmp_path, capsys):
    assert main(["export", "--adapter", str(tmp_path / "no-run"), "--out", str(tmp_path / "out")]) == 2
    assert f"adapter {tmp_path / 'no-run'} does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
