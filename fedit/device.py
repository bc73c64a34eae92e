"""Where fedit computes and in which dtype: CUDA if there is one, bf16 where the hardware has it."""

from __future__ import annotations

from pathlib import Path

import torch

from fedit.errors import FeditError


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
