"""Any causal LM: fedit's loss equals the model's own for several families (random tiny weights
built from their configs), the fast paths step aside where they would differ, and a short run
trains, resumes and leaves an adapter PEFT opens."""

from __future__ import annotations

import pytest
import torch

from fedit import compat, runner, server, token_loss
from fedit.config import ModelConfig
from fedit.data.batches import IGNORE, make_batch, tokenize
from fedit.data.records import load_records
from fedit.model import load_base

from conftest import tiny_config

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
# family: (config class, its own settings, fedit's CPU attention used?)
FAMILIES = {
    "llama": ("LlamaConfig", {}, True),
    "qwen2": ("Qwen2Config", {}, True),
    # a sliding window shorter than the examples: fedit's attention would ignore it
    "mistral": ("MistralConfig", {"sliding_window": 8}, False),
    # softcapped attention scores and final logits, sliding layers: the model's own attention, fedit's head
    "gemma2": ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 0.5, "attn_logit_softcapping": 5.0,
                                "sliding_window": 8, "query_pre_attn_scalar": 16}, False),
    "granite": ("GraniteConfig", {"logits_scaling": 0.25}, True),  # logits / 0.25
    "cohere": ("CohereConfig", {"logit_scale": 4.0}, True),  # logits * 4
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_model_dir):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = {}
    for name, (cls, own, _) in FAMILIES.items():
        d = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        cfg = getattr(transformers, cls)(vocab_size=len(tok), **{**COMMON, **own})
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # larger logits than the default init, so that capping and scaling matter
            model.get_output_embeddings().weight.mul_(40.0)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out


def own_loss(model, ex) -> float:
    ids = torch.tensor([ex.input_ids])
    with torch.no_grad():
        return model(input_ids=ids, labels=torch.tensor([ex.labels]), use_cache=False).loss.item()


def fedit_loss_per_example(loaded, exs) -> list[float]:
    batch = make_batch(exs, loaded.tokenizer.pad_token_id, loaded.packed, loaded.device)
    with torch.no_grad():
        losses, rows = token_loss.token_losses(loaded.model, batch, loaded.own_logits)
    return [losses[rows == i].mean().item() for i in range(len(exs))]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fedit_loss_is_the_models_own(family, family_dirs, records_file):
    loaded = load_base(ModelConfig(name=str(family_dirs[family]), dtype="fp32", device="cpu"))
    fast_attention = FAMILIES[family][2]
    assert (loaded.model.config._attn_implementation == "fedit_cpu_causal") == fast_attention
    assert loaded.packed == fast_attention and not loaded.own_logits  # fedit's head knows these families
    # real examples, prompts masked, lengths 20-60 tokens (past every sliding window here)
    exs = tokenize(load_records(records_file).records[:6], loaded.tokenizer, 256)
    assert min(len(e.input_ids) for e in exs) > 8 and any(lab == IGNORE for lab in exs[0].labels)
    theirs = [own_loss(loaded.model, e) for e in exs]
    assert fedit_loss_per_example(loaded, exs) == pytest.approx(theirs, rel=1e-5)


def test_an_unknown_logit_post_processing_falls_back_to_the_models_forward(family_dirs, records_file, monkeypatch,
                                                                             caplog):
    # as if fedit did not know Gemma-2's final softcapping: the load check must notice and fall back
    monkeypatch.setattr(token_loss, "head_logits", lambda base, hidden: base.get_output_embeddings()(hidden).float())
    loaded = load_base(ModelConfig(name=str(family_dirs["gemma2"]), dtype="fp32", device="cpu"))
    assert loaded.own_logits and "full forward" in caplog.text
    exs = tokenize(load_records(records_file).records[:4], loaded.tokenizer, 256)
    assert fedit_loss_per_example(loaded, exs) == pytest.approx([own_loss(loaded.model, e) for e in exs], rel=1e-5)


def test_an_attention_fedit_cannot_compute_is_left_to_the_model(family_dirs, records_file, monkeypatch, caplog):
    # as if the config rule missed Mistral's window: the load check must drop fedit's attention
    monkeypatch.setattr(compat, "windowed_or_capped", lambda config: False)
    loaded = load_base(ModelConfig(name=str(family_dirs["mistral"]), dtype="fp32", device="cpu"))
    assert loaded.model.config._attn_implementation == "sdpa" and not loaded.packed and not loaded.own_logits
    assert "using the model's own attention" in caplog.text
    exs = tokenize(load_records(records_file).records[:4], loaded.tokenizer, 256)
    assert fedit_loss_per_example(loaded, exs) == pytest.approx([own_loss(loaded.model, e) for e in exs], rel=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])  # the families off the Llama path
def test_a_short_run_trains_resumes_and_opens_in_peft(family, family_dirs, partition_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedit.adapter import load_adapter_file

    cfg = tiny_config(family_dirs[family], partition_dir, tmp_path / "run", federation={"rounds": 1})
    run_dir = runner.run(cfg)
    (run_dir / "config.toml").write_text((run_dir / "config.toml").read_text().replace("rounds = 1", "rounds = 2"))
    runner.run(None, resume=str(run_dir))
    rounds = server.RunDir(run_dir).events("round")
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["eval"]["loss"] < rounds[0]["eval"]["loss"]
    base = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, run_dir / "adapter")
    saved = load_adapter_file(run_dir / "adapter")
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved) > 0
    assert all(torch.equal(state[k].float(), saved[k.replace(".default", "")].float()) for k in state
               if k.replace(".default", "") in saved)
    assert sum(1 for k in state if k.replace(".default", "") in saved) == len(saved)
