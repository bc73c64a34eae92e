"""Random-weight Llama models of real shapes, for speed measurements where no real weights can go.

A GPU's speed on a model depends on its shapes, not its weights, so a LlamaConfig with the real
dimensions stands in for the real model. The shapes:

- ``smollm2-135m``: SmolLM2-135M(-Instruct), fedit's default model (its config.json);
- ``llama2-7b``: Llama-2-7B, the size of the paper's 7B LLaMA (same dimensions as LLaMA-1 7B);
- ``tiny``: 2 layers, hidden 64, for tests and a CPU smoke run.
"""

from __future__ import annotations

import torch

SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=1024),
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    # bos/eos/pad inside every vocabulary; the benchmark's token ids are folded into it (for_vocab)
    return LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=None, use_cache=False)


def param_count(cfg) -> int:
    """Parameters of a LlamaForCausalLM from its config alone (no weights built)."""
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q = o = d * cfg.num_attention_heads * head_dim
    k = v = d * cfg.num_key_value_heads * head_dim
    mlp = 3 * d * cfg.intermediate_size
    norms = 2 * d
    embeddings = vocab * d * (1 if cfg.tie_word_embeddings else 2)
    return layers * (q + k + v + o + mlp + norms) + d + embeddings


def build(shape: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A LlamaForCausalLM of ``shape`` with random weights (transformers' own init), made on ``device``
    in ``dtype`` directly: a 7B model never passes through CPU memory. On the meta device it holds
    no memory at all (for counting parameters)."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()
