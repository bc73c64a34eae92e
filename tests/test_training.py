"""Units of local training: tokenization and masking, batching, the loss, one client update."""

import numpy as np
import pytest
import torch

from fedit.config import TrainConfig
from fedit.data.batches import IGNORE, collate, micro_batches, pack, plan_steps, tokenize
from fedit.data.prompts import ALPACA_NO_INPUT, prompt
from fedit.data.records import Record
from fedit.token_loss import token_losses
from fedit.adapter import get_adapter, set_adapter
from fedit.config import ModelConfig, LoraConfig
from fedit.model import attach_lora, load_base


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
    # A token budget, worked by hand (lengths 50, 49, 7, 5 longest first):
    # packed, 100 tokens: 50 + 49 = 99 fits, + 7 would not; then 7 + 5 = 12
    assert micro_batches([0, 1, 2, 3], exs, 4, max_tokens=100) == [[1, 3], [2, 0]]
    assert micro_batches([0, 1, 2, 3], exs, 4, max_tokens=105) == [[1, 3], [2, 0]]
    assert micro_batches([0, 1, 2, 3], exs, 4, max_tokens=106) == [[1, 3, 2], [0]]  # 99 + 7 = 106; + 5 = 111
    # padded, 100 tokens: every row costs the longest (50): 50 + 50 fits, a third row would be 150
    assert micro_batches([0, 1, 2, 3], exs, 4, max_tokens=100, packed=False) == [[1, 3], [2, 0]]
    assert micro_batches([0, 1, 2, 3], exs, 4, max_tokens=20, packed=False) == [[1], [3], [2, 0]]
    # an example longer than the budget goes alone; no budget is the count alone
    assert micro_batches([0, 1, 2, 3], exs, 4, max_tokens=10) == [[1], [3], [2], [0]]
    assert micro_batches([0, 1, 2, 3], exs, 4, max_tokens=0) == [[1, 3, 2, 0]]


def test_loss_equals_transformers_loss_on_a_fixed_batch(tiny):
    """Same tokens, same loss as the naive HF path (model(..., labels=...).loss), padded or packed."""
    exs = tokenize(RECS, tiny.tokenizer, cutoff_len=512)
    width = max(len(e.input_ids) for e in exs)
    pad = [width - len(e.input_ids) for e in exs]
    naive = {"input_ids": torch.tensor([e.input_ids + [tiny.tokenizer.pad_token_id] * p for e, p in zip(exs, pad)]),
             "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * p for e, p in zip(exs, pad)]),
             "labels": torch.tensor([e.labels + [IGNORE] * p for e, p in zip(exs, pad)])}
    assert tiny.packed  # fedit's CPU attention was chosen for this fp32 model
    tiny.model.eval()
    with torch.no_grad():
        hf = tiny.model(**naive).loss
        padded, rows = token_losses(tiny.model, collate(exs, tiny.tokenizer.pad_token_id))
        packed, packed_rows = token_losses(tiny.model, pack(exs))
    assert padded.numel() == sum(e.trained_tokens for e in exs)
    assert torch.allclose(padded.mean(), hf, rtol=1e-5)
    assert rows.tolist() == sorted(rows.tolist())
    # Packed: the same tokens in the same order, each seeing only its own example.
    assert packed_rows.tolist() == rows.tolist()
    assert torch.allclose(packed, padded, rtol=1e-4, atol=1e-5)


def test_packed_training_gives_the_gradients_of_padded_training(tiny_model_dir):
    """bf16, examples on both sides of the fp32-backward threshold: packing changes no gradient."""
    from fedit import attention

    loaded = load_base(ModelConfig(name=str(tiny_model_dir), dtype="bf16", device="cpu"))
    attach_lora(loaded, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    with torch.no_grad():  # a non-zero adapter, so gradients flow through attention into every LoRA matrix
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    long = Record("Repeat: " + "cat dog bird fish " * 100, "", "Done.", "open_qa")
    exs = tokenize(RECS + [long], loaded.tokenizer, cutoff_len=512)
    assert len(exs[-1].input_ids) > attention.FP32_BACKWARD_MAX_LEN > len(exs[0].input_ids)
    loaded.model.train()
    results = []
    for batch in (pack(exs), *[collate([e], loaded.tokenizer.pad_token_id) for e in exs]):
        loaded.model.zero_grad()
        with loaded.autocast():
            losses = token_losses(loaded.model, batch)[0]
        losses.sum().backward()
        results.append((losses.detach().float(), {n: p.grad.float().clone() for n, p in loaded.model.named_parameters()
                                                  if p.requires_grad}))
    (packed, g_packed), one_by_one = results[0], results[1:]
    assert torch.allclose(packed, torch.cat([r[0] for r in one_by_one]), rtol=0.02, atol=0.02)
    for n in g_packed:
        ref = sum(g[n] for _, g in one_by_one)
        assert (g_packed[n] - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-6, n


def test_accumulation_equals_one_big_batch(tiny):
    """micro_batch_size only changes memory: the update after one step is the same."""
    from fedit import client

    exs = tokenize(RECS * 2, tiny.tokenizer, cutoff_len=512)
    start = get_adapter(tiny.model)
    cfg = TrainConfig(lr=1e-2, batch_size=6, micro_batch_size=6, max_steps=1, max_grad_norm=0.0)
    from fedit.protocol import FitIns

    ins = FitIns(1, 0, {"global": start})
    big, _ = client.train(tiny, ins, exs, cfg, seed=1)
    small, _ = client.train(tiny, ins, exs, TrainConfig(**{**cfg.__dict__, "micro_batch_size": 2}), seed=1)
    for k in big.adapter:
        assert torch.allclose(big.adapter[k], small.adapter[k], atol=1e-6), k
    assert big.num_examples == 6 and big.metrics["steps"] == 1
    assert any(not torch.equal(big.adapter[k], start[k]) for k in start)
    # A token budget that splits the step into one micro-batch per example: the same update again
    budget, _ = client.train(tiny, ins, exs, TrainConfig(**{**cfg.__dict__, "micro_batch_tokens": 1}), seed=1)
    for k in big.adapter:
        assert torch.allclose(big.adapter[k], budget.adapter[k], atol=1e-6), k
    assert budget.metrics["train_loss"] == pytest.approx(big.metrics["train_loss"], rel=1e-6)


def test_set_adapter_rejects_wrong_keys(tiny):
    state = get_adapter(tiny.model)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        set_adapter(tiny.model, bad)
    set_adapter(tiny.model, state)  # the right keys load


def test_heldout_loss_is_the_same_under_a_token_budget(tiny):
    """The budget only changes how many examples share a forward pass: every example's loss is kept."""
    from fedit.evaluation.heldout import heldout_loss

    exs = tokenize(RECS * 3, tiny.tokenizer, cutoff_len=512)
    whole = heldout_loss(tiny, exs, batch_size=8)
    split = heldout_loss(tiny, exs, batch_size=8, max_tokens=max(len(e.input_ids) for e in exs))
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert [n for _, n in split["examples"]] == [n for _, n in whole["examples"]]
    assert [s for s, _ in split["examples"]] == pytest.approx([s for s, _ in whole["examples"]], rel=1e-5)
    # hand check: the overall loss is the token-weighted mean of the examples' losses
    assert whole["loss"] == pytest.approx(sum(s for s, _ in whole["examples"]) / sum(n for _, n in whole["examples"]))
