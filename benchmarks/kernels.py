"""fedit's three CPU fast paths, timed against what they replace (docs/performance.md).

    python -m benchmarks.kernels

- causal attention backward at Dolly-like lengths: torch's bf16 flash backward (with GQA,
  as transformers' SDPA path calls it) vs fedit's (same kernel on fp32 copies below
  fedit.attention.FP32_BACKWARD_MAX_LEN tokens); the forward is the same kernel in both;
- LoRA dropout forward + backward: torch.nn.Dropout vs fedit's FastDropout;
- one LoRA Linear layer (576 -> 1536, rank 8) forward + backward under bf16 autocast: peft's
  forward vs fedit's training forward.

Each figure is the best of a few repetitions (noise on a shared machine only adds time).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def attention(batch: int = 8, heads: int = 9, kv_heads: int = 3, head_dim: int = 64,
              lengths=(64, 128, 256, 384, 512)) -> list[dict]:
    """SmolLM2-135M's attention shape: 9 query heads sharing 3 key/value heads, head_dim 64."""
    from fedit.attention import causal_attention

    class Module(torch.nn.Module):
        num_key_value_groups = heads // kv_heads
        is_causal = True

    rows = []
    for n in lengths:
        q, k, v = (torch.randn(batch, h, n, head_dim, dtype=torch.bfloat16, requires_grad=True)
                   for h in (heads, kv_heads, kv_heads))
        grad = torch.randn(batch, n, heads, head_dim, dtype=torch.bfloat16)

        def torch_sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).backward(grad)

        def fedit():
            causal_attention(Module(), q, k, v, None)[0].backward(grad)

        rows.append({"length": n, "torch_ms": best_ms(torch_sdpa), "fedit_ms": best_ms(fedit)})
    return rows


def dropout(shape=(8, 256, 576), p: float = 0.05) -> dict:
    from fedit.cpu_lora import FastDropout

    x = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(*shape, dtype=torch.bfloat16)
    ours, theirs = FastDropout(p).train(), torch.nn.Dropout(p).train()
    return {"shape": list(shape), "torch_ms": best_ms(lambda: theirs(x).backward(grad)),
            "fedit_ms": best_ms(lambda: ours(x).backward(grad))}


def lora_linear(shape=(8, 256, 576), out_features: int = 1536) -> dict:
    import types

    from peft import LoraConfig, get_peft_model

    from fedit.cpu_lora import _lora_linear_training_forward

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(shape[-1], out_features, bias=False, dtype=torch.bfloat16)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(One(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    x = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(*shape[:-1], out_features, dtype=torch.bfloat16)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(grad)

    peft_ms = best_ms(step)
    layer.forward = types.MethodType(_lora_linear_training_forward, layer)
    return {"shape": list(shape), "out_features": out_features, "peft_ms": peft_ms, "fedit_ms": best_ms(step)}


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("causal attention forward + backward, (8, 9 heads / 3 kv heads, L, 64), bf16:")
    for r in attention():
        print(f"  L={r['length']:4d}  torch SDPA {r['torch_ms']:7.1f} ms   fedit {r['fedit_ms']:7.1f} ms   "
              f"{r['torch_ms'] / r['fedit_ms']:.2f}x")
    d = dropout()
    print(f"LoRA dropout forward + backward, {tuple(d['shape'])}, bf16: torch {d['torch_ms']:.1f} ms, "
          f"fedit {d['fedit_ms']:.1f} ms, {d['torch_ms'] / d['fedit_ms']:.2f}x")
    lo = lora_linear()
    print(f"LoRA Linear 576 -> {lo['out_features']} forward + backward, {tuple(lo['shape'])}, bf16 autocast: "
          f"peft {lo['peft_ms']:.1f} ms, fedit {lo['fedit_ms']:.1f} ms, {lo['peft_ms'] / lo['fedit_ms']:.2f}x")


if __name__ == "__main__":
    main()
