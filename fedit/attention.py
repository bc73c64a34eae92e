"""Causal attention for bf16 training on CPU: torch's flash kernel forward, a faster backward.

torch's CPU flash-attention backward is slow in bf16: on Dolly-length sequences (most under
256 tokens) it takes 3-8x its forward, and the same kernel run on fp32 copies of its inputs
is much faster at short lengths (`python -m benchmarks.kernels`; docs/performance.md). So
the forward stays the fused bf16 kernel and the backward runs in fp32 up to
``FP32_BACKWARD_MAX_LEN`` tokens, where that wins; the attention output and the loss are
unchanged, the gradients only more precise.

Registered with transformers' AttentionInterface; everything this does not cover (longer
sequences, a padding mask, generation with a cache, no gradient) goes to transformers' own
SDPA path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

NAME = "fedit_cpu_causal"
FP32_BACKWARD_MAX_LEN = 320  # measured crossover on a 2-core Xeon (AMX): 1.15x at 256, 0.97x at 384

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = _flash(q, k, v, 0.0, True, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dtype = q.dtype
        grad_out, q, k, v, out = (t.float() for t in (grad_out.contiguous(), q, k, v, out))
        dq, dk, dv = _flash_backward(grad_out, q, k, v, out, lse, 0.0, True, scale=ctx.scale)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None


def causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    covered = (attention_mask is None and dropout == 0.0 and torch.is_grad_enabled() and query.device.type == "cpu"
               and 1 < query.shape[2] == key.shape[2] <= FP32_BACKWARD_MAX_LEN and (is_causal is None or is_causal)
               and getattr(module, "is_causal", True) and not kwargs.get("output_attentions"))
    if not covered:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    out = _CausalAttention.apply(query, repeat_kv(key, groups), repeat_kv(value, groups), scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, causal_attention)
# transformers builds no mask at all for an attention it does not know, so left-padded batches
# in generation would attend to their padding; masks are built as for SDPA (none when causal suffices).
AttentionMaskInterface.register(NAME, sdpa_mask)
