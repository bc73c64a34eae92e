"""The CPU fast paths keep the maths: FastDropout is inverted dropout, the attention backward is exact."""

import pytest
import torch
import torch.nn.functional as F

from fedit import attention
from fedit.config import LoraConfig, ModelConfig
from fedit.data.batches import collate, tokenize
from fedit.token_loss import token_losses
from fedit.data.records import Record
from fedit.cpu_lora import FastDropout
from fedit.model import attach_lora, load_base

RECS = [Record("Name a colour.", "", "Blue.", "open_qa"),
        Record("Is 2 even?", "", "Yes, 2 is even because it divides by two.", "closed_qa")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_dropout_is_inverted_dropout(dtype):
    p = 0.05
    drop = FastDropout(p).train()
    x = (torch.rand(400, 500) + 0.5).to(dtype).requires_grad_()
    torch.manual_seed(7)
    y = drop(x)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    # Kept values are scaled by 1/keep rounded to x's dtype, exactly as torch's own dropout does.
    assert abs(drop.scale - 1 / (1 - p)) < 1e-4
    scale = torch.tensor(drop.scale, dtype=dtype)
    assert y.dtype == dtype and torch.equal(y[kept], x[kept] * scale)
    y.sum().backward()
    assert torch.equal(x.grad, kept.to(dtype) * scale)
    assert not torch.equal(drop(x), y)  # a fresh mask on every call
    torch.manual_seed(7)
    assert torch.equal(drop(x), y)  # torch reseeded: the same mask (resume depends on it)
    assert drop.eval()(x) is x


class _Attn(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


@pytest.mark.parametrize("length", [24, attention.FP32_BACKWARD_MAX_LEN + 16])
def test_causal_attention_matches_sdpa_forward_and_backward(length):
    """Both sides of the length threshold (fp32 backward below, torch's SDPA above) give SDPA's gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, length, 16, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    out, _ = attention.causal_attention(_Attn(), q, k, v, None, scaling=0.25)
    grad = torch.randn_like(out)
    out.backward(grad)
    # Reference: fp32 SDPA on the same (bf16-valued) inputs, in transformers' layout (B, L, H, D).
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32.repeat_interleave(2, 1), v32.repeat_interleave(2, 1),
                                         is_causal=True, scale=0.25).transpose(1, 2)
    ref.backward(grad.float())
    for ours, theirs in [(out, ref), (q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)]:
        assert ours.dtype == torch.bfloat16
        assert (ours.float() - theirs).abs().max() <= 0.02 * theirs.abs().max(), "off by more than bf16 rounding"


def test_packed_attention_stays_inside_each_segment():
    """One row holding segments of 1, 5 and 24 tokens: each gets SDPA's causal attention on its own."""
    torch.manual_seed(0)
    lengths = [1, 5, 24]
    q, k, v = (torch.randn(1, h, sum(lengths), 16, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([0, 1, 6, 30], dtype=torch.int32)
    out, _ = attention.causal_attention(_Attn(), q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    grad = torch.randn_like(out)
    out.backward(grad)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t.detach()[:, :, s:e].clone().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qs, ks.repeat_interleave(2, 1), vs.repeat_interleave(2, 1),
                                             is_causal=True, scale=0.25).transpose(1, 2)
        ref.backward(grad[:, s:e])
        assert torch.allclose(out[:, s:e], ref, atol=1e-5)
        for ours, theirs in [(q, qs), (k, ks), (v, vs)]:
            assert torch.allclose(ours.grad[:, :, s:e], theirs.grad, atol=1e-5)


def test_causal_attention_leaves_masks_and_inference_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 8, 16, dtype=torch.bfloat16) for h in (4, 2, 2))
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    mask[..., 0] = False
    mask[..., 0, 0] = True
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.25)
    ours, _ = attention.causal_attention(_Attn(), q, k, v, mask, scaling=0.25)
    assert torch.equal(ours, ref)
    with torch.no_grad():
        assert torch.equal(attention.causal_attention(_Attn(), q, k, v, None, scaling=0.25)[0],
                           sdpa_attention_forward(_Attn(), q, k, v, None, scaling=0.25)[0])


def test_bf16_model_on_cpu_trains_with_fedit_attention_and_the_same_loss(tiny_model_dir):
    loaded = load_base(ModelConfig(name=str(tiny_model_dir), dtype="bf16", device="cpu"))
    assert loaded.model.config._attn_implementation == attention.NAME
    attach_lora(loaded, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    _nonzero_adapter(loaded.model)  # so gradients flow through attention into every LoRA matrix
    batch = collate(tokenize(RECS, loaded.tokenizer, cutoff_len=512), loaded.tokenizer.pad_token_id)
    results = {}
    for impl in (attention.NAME, "sdpa"):
        loaded.model.set_attn_implementation(impl)
        loaded.model.zero_grad()
        with loaded.autocast():
            loss = token_losses(loaded.model, batch)[0].mean()
        loss.backward()
        results[impl] = loss.item(), {n: p.grad.float() for n, p in loaded.model.named_parameters() if p.requires_grad}
    (ours, g_ours), (ref, g_ref) = results[attention.NAME], results["sdpa"]
    assert ours == pytest.approx(ref, rel=1e-6)  # same forward kernel (bit-identical on this machine)
    for n in g_ref:
        assert (g_ours[n] - g_ref[n]).abs().max() <= 0.05 * g_ref[n].abs().max() + 1e-6, n


def test_fedit_attention_masks_left_padding_in_batched_generation(tiny_model_dir, monkeypatch):
    """Training takes the fast causal path (no mask needed); a left-padded generation batch gets its mask."""
    from fedit.inference import generate

    loaded = load_base(ModelConfig(name=str(tiny_model_dir), dtype="bf16", device="cpu"))
    attach_lora(loaded, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    fast_calls = []
    apply = attention._CausalAttention.apply
    monkeypatch.setattr(attention._CausalAttention, "apply", lambda *a: fast_calls.append(1) or apply(*a))
    loaded.model.train()
    batch = collate(tokenize(RECS, loaded.tokenizer, cutoff_len=512), loaded.tokenizer.pad_token_id)
    with loaded.autocast():
        token_losses(loaded.model, batch)[0].mean().backward()
    assert fast_calls, "training should use fedit's causal attention, not the masked SDPA path"
    prompts = ["Name a colour please, a nice one, with a prompt long enough to need left padding.", "Hi"]
    one_by_one = [generate(loaded, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert generate(loaded, prompts, max_new_tokens=8, batch_size=2) == one_by_one


def test_lora_training_forward_equals_peft(tiny_model_dir):
    """The fused LoRA forward (scaling on the rank-r side, addmm) gives peft's outputs and gradients."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    loaded = load_base(ModelConfig(name=str(tiny_model_dir), dtype="fp32", device="cpu"))
    attach_lora(loaded, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    layers = [m for m in loaded.model.modules() if type(m) is LoraLinear]
    assert layers and all("forward" in m.__dict__ for m in layers)  # installed on every LoRA Linear
    _nonzero_adapter(loaded.model)
    batch = collate(tokenize(RECS, loaded.tokenizer, cutoff_len=512), loaded.tokenizer.pad_token_id)
    loaded.model.train()
    results = []
    for fused in (True, False):
        if not fused:
            for m in layers:
                del m.forward  # back to peft's class forward
        results.append(_loss_and_grads(loaded.model, batch))
    (ours, g_ours), (peft, g_peft) = results
    assert ours == pytest.approx(peft, rel=1e-6)
    for n in g_peft:
        assert torch.allclose(g_ours[n], g_peft[n], rtol=1e-4, atol=1e-7), n


def test_gradient_checkpointing_recomputes_the_same_dropout_masks(tiny_model_dir):
    """Checkpointing reruns the forward in the backward pass: LoRA dropout must draw the same masks again."""
    batch = collate(tokenize(RECS, _tokenizer(tiny_model_dir), cutoff_len=512), 0)
    results = []
    for checkpointing in (False, True):
        loaded = load_base(ModelConfig(name=str(tiny_model_dir), dtype="fp32", device="cpu",
                                       gradient_checkpointing=checkpointing))
        attach_lora(loaded, LoraConfig(r=4, alpha=8, dropout=0.3), seed=0)
        _nonzero_adapter(loaded.model)
        loaded.model.train()
        torch.manual_seed(123)
        results.append(_loss_and_grads(loaded.model, batch))
    (plain, g_plain), (ckpt, g_ckpt) = results
    assert ckpt == pytest.approx(plain, rel=1e-6)
    for n in g_plain:
        assert torch.allclose(g_ckpt[n], g_plain[n], rtol=1e-4, atol=1e-7), n


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU would accept quantized weights")
def test_quantized_base_weights_on_a_cpu_say_what_to_do(tiny_model_dir):
    """model.device = "auto" resolves to the CPU here: 4/8-bit weights are refused before any loading."""
    from fedit.errors import FeditError

    with pytest.raises(FeditError, match='needs a CUDA GPU.*model.quantize = "none"'):
        load_base(ModelConfig(name=str(tiny_model_dir), device="auto", quantize="8bit"))


def _nonzero_adapter(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = token_losses(model, batch)[0].mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_onednn_kernel_cache_is_bounded_unless_the_user_set_it():
    """fedit.device bounds oneDNN's kernel cache (it grew by ~0.4 GB per client); a user's own value wins."""
    import os
    import subprocess
    import sys

    code = "import os, fedit.device; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True,  # noqa: E731
                                   text=True).stdout.strip()
    assert run(env) == "128"
    assert run({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"}) == "7"
