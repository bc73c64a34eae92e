"""Where fedit computes and in which dtype: CUDA if there is one, bf16 where the hardware has it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedit.errors import FeditError

# oneDNN (torch's CPU matmul library) keeps a compiled kernel and its buffers for every matrix
# shape it has seen, up to 1,024 by default. Packed micro-batches give almost every forward pass
# a new shape, so that cache grew by about 0.4 GB per client. 128 still holds the shapes of one
# micro-batch's forward and backward, which every layer reuses (with 16 a protocol round ran 8%
# slower), and keeps the memory flat. oneDNN reads it when it makes its first kernel: this module
# is imported before any training. Set the variable yourself to override it.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")


def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16: the CPU multiplies bf16 natively (about 5x fp32 on Sapphire Rapids)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FeditError("model.device = \"cuda\" but no CUDA GPU is visible; set model.device = \"cpu\" or \"auto\"")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32
