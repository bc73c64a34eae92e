"""Causal attention for training on CPU: packed batches, and a faster bf16 backward.

Packed batches (``batches.pack``): a micro-batch's examples sit end to end in one row,
with ``cu_seq_lens`` marking where each starts; attention runs example by example, so no
token sees another example and no padding token is computed.

torch's CPU flash-attention backward is slow in bf16: on Dolly-length sequences (most under
256 tokens) it takes 3-8x its forward, and the same kernel run on fp32 copies of its inputs
is much faster at short lengths (`python -m benchmarks.kernels`; docs/performance.md). So
the forward stays the fused kernel and the backward runs in fp32 for sequences up to
``FP32_BACKWARD_MAX_LEN`` tokens, where that wins; the attention output and the loss are
unchanged, the gradients only more precise.

Registered with transformers' AttentionInterface; everything this does not cover (a padding
mask, generation with a cache, dropout) goes to transformers' own SDPA path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "fedit_cpu_causal"
FP32_BACKWARD_MAX_LEN = 320  # measured crossover on a 2-core Xeon (AMX): 1.15x at 256, 0.97x at 384

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _CausalAttention(torch.autograd.Function):
    """Causal attention over the segments [starts[i], starts[i + 1]) of the sequence axis."""

    @staticmethod
    def forward(ctx, q, k, v, scale, starts):
        if len(starts) == 2:  # one segment: the kernel's own outputs, no copies
            out, lse = _flash(q, k, v, 0.0, True, scale=scale)[:2]
        else:
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
            for s, e in zip(starts[:-1], starts[1:]):
                out[:, :, s:e], lse[:, :, s:e] = _flash(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], 0.0, True,
                                                        scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.starts = scale, starts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grads = [torch.empty_like(t) for t in (q, k, v)]
        for s, e in zip(ctx.starts[:-1], ctx.starts[1:]):
            part = [t[:, :, s:e] for t in (grad_out, q, k, v, out)]
            if e - s <= FP32_BACKWARD_MAX_LEN:
                part = [t.float() for t in part]
            for g, d in zip(grads, _flash_backward(*part, lse[:, :, s:e], 0.0, True, scale=ctx.scale)):
                g[:, :, s:e] = d
        return *grads, None, None


def causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    cu = kwargs.get("cu_seq_lens_q")
    plain = (dropout == 0.0 and query.device.type == "cpu" and query.shape[2] == key.shape[2]
             and (is_causal is None or is_causal) and getattr(module, "is_causal", True)
             and not kwargs.get("output_attentions"))
    if plain and cu is not None and query.shape[0] == 1:
        # Packed: the block-diagonal mask transformers built from the position ids says what
        # the segments say; they are used instead.
        starts = tuple(cu.tolist())
    elif (plain and attention_mask is None and torch.is_grad_enabled()
          and 1 < query.shape[2] <= FP32_BACKWARD_MAX_LEN):
        starts = (0, query.shape[2])
    else:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    out = _CausalAttention.apply(query, repeat_kv(key, groups), repeat_kv(value, groups), scaling, starts)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, causal_attention)
# transformers builds no mask at all for an attention it does not know, so left-padded batches
# in generation would attend to their padding; masks are built as for SDPA (none when causal suffices).
AttentionMaskInterface.register(NAME, sdpa_mask)
