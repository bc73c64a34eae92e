"""Units of local training: tokenization and masking, batching, the loss, one client update."""

import numpy as np
import pytest
import torch

from fedit.config import TrainConfig
from fedit.data.batches import IGNORE, collate, micro_batches, plan_steps, tokenize
from fedit.data.prompts import ALPACA_NO_INPUT, prompt
from fedit.data.records import Record
from fedit.loss import token_losses
from fedit.model import ModelConfig, LoraConfig, attach_lora, get_adapter, load_base, set_adapter


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_base(ModelConfig(name=str(tiny_model_dir), dtype="fp32", device="cpu"))
    attach_lora(loaded, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    return loaded


RECS = [Record("Name a colour.", "", "Blue.", "open_qa"),
        Record("Summarise this.", "A long text about cats and dogs.", "Pets.", "summarization"),
        Record("Is 2 even?", "", "Yes, 2 is even because it divides by two.", "closed_qa")]


def test_prompt_masking_and_eos(tiny):
    tok = tiny.tokenizer
    (ex, *_) = tokenize(RECS, tok, cutoff_len=512)
    p_ids = tok(ALPACA_NO_INPUT.format(instruction="Name a colour."))["input_ids"]
    assert ex.input_ids[:len(p_ids)] == p_ids and ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels[:len(p_ids)] == [IGNORE] * len(p_ids)
    assert ex.labels[len(p_ids):] == ex.input_ids[len(p_ids):]
    (full, *_) = tokenize(RECS, tok, cutoff_len=512, train_on_inputs=True)
    assert full.labels == full.input_ids


def test_cutoff_truncates(tiny):
    exs = tokenize(RECS, tiny.tokenizer, cutoff_len=10)
    assert all(len(e.input_ids) == 10 and len(e.labels) == 10 for e in exs)
    assert all(e.trained_tokens == 0 for e in exs)  # the prompts alone are longer than 10 tokens


def test_prompt_with_context_uses_input_section():
    assert "### Input:\nctx" in prompt("do", "ctx") and "### Input" not in prompt("do", "")


def test_plan_steps_and_micro_batches():
    steps = plan_steps(10, 4, 1.0, 0, np.random.default_rng(0))
    assert [len(s) for s in steps] == [4, 4, 2] and sorted(sum(steps, [])) == list(range(10))
    assert len(plan_steps(10, 4, 2.0, 0, np.random.default_rng(0))) == 5
    assert len(plan_steps(10, 4, 2.0, 3, np.random.default_rng(0))) == 3
    assert sum(len(s) for s in plan_steps(10, 4, 0.5, 0, np.random.default_rng(0))) == 5

    class E:
        def __init__(self, n):
            self.input_ids = [0] * n
    exs = [E(n) for n in [5, 50, 7, 49]]
    assert micro_batches([0, 1, 2, 3], exs, 2) == [[1, 3], [2, 0]]


def test_loss_equals_transformers_loss_on_a_fixed_batch(tiny):
    """Same tokens, same loss as the naive HF path (model(..., labels=...).loss)."""
    exs = tokenize(RECS, tiny.tokenizer, cutoff_len=512)
    batch = collate(exs, tiny.tokenizer.pad_token_id)
    tiny.model.eval()
    with torch.no_grad():
        ours, rows = token_losses(tiny.model, batch)
        hf = tiny.model(**batch).loss
    assert ours.numel() == sum(e.trained_tokens for e in exs)
    assert torch.allclose(ours.mean(), hf, rtol=1e-5)
    assert rows.tolist() == sorted(rows.tolist())


def test_accumulation_equals_one_big_batch(tiny):
    """micro_batch_size only changes memory: the update after one step is the same."""
    from fedit import client

    exs = tokenize(RECS * 2, tiny.tokenizer, cutoff_len=512)
    start = get_adapter(tiny.model)
    cfg = TrainConfig(lr=1e-2, batch_size=6, micro_batch_size=6, max_steps=1, max_grad_norm=0.0)
    big = client.train(tiny, start, exs, cfg, seed=1)
    small = client.train(tiny, start, exs, TrainConfig(**{**cfg.__dict__, "micro_batch_size": 2}), seed=1)
    for k in big.adapter:
        assert torch.allclose(big.adapter[k], small.adapter[k], atol=1e-6), k
    assert big.num_examples == 6 and big.metrics["steps"] == 1
    assert any(not torch.equal(big.adapter[k], start[k]) for k in start)


def test_set_adapter_rejects_wrong_keys(tiny):
    state = get_adapter(tiny.model)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        set_adapter(tiny.model, bad)
    set_adapter(tiny.model, state)  # the right keys load
