"""LoRA's CPU fast paths: the same maths as peft's layers, less time (each is tested against the
code it replaces; `python -m benchmarks.kernels` times them)."""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F


def _uniform16(n: int) -> np.ndarray:
    """n 16-bit uniforms from a PCG64 stream seeded by torch's generator.

    Seeding from torch ties the masks to torch.manual_seed (so a client's training is
    reproducible and resume is exact) and lets activation checkpointing, which restores
    torch's RNG state before it reruns a forward, recompute the same masks. Raw 64-bit draws
    cut into four 16-bit uniforms are ~5x faster than Generator.bytes.
    """
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]


_UINT_OF_WIDTH = {2: torch.uint16, 4: torch.uint32}


class FastDropout(torch.nn.Module):
    """Inverted dropout, distributed as torch.nn.Dropout, with masks drawn by numpy's PCG64.

    On CPU torch draws dropout masks with bernoulli_ at ~25M numbers/s; with LoRA on all
    linear layers (7 dropouts per decoder layer over full activations) that cost more than
    the matmuls. Drawing 16-bit uniforms from PCG64 is ~10x cheaper. The keep probability is
    1 - round(p * 65536) / 65536, within 1e-5 of 1 - p.

    The mask holds 1/keep (rounded to x's dtype, as torch's own dropout does) where kept and 0
    elsewhere, so forward and backward are one multiplication each. numpy has no bfloat16, so
    the mask is built as the bit pattern of that value in an unsigned integer of the same width.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = int(round(p * 65536))
        self.scale = 1.0 / (1.0 - self.threshold / 65536)
        self._scale_bits: dict[torch.dtype, np.ndarray] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        scale_bits = self._scale_bits.get(x.dtype)
        if scale_bits is None:  # once per dtype, not on every call of the training loop
            scale_bits = torch.tensor(self.scale, dtype=x.dtype).view(_UINT_OF_WIDTH[x.element_size()]).numpy()
            self._scale_bits[x.dtype] = scale_bits
        keep = _uniform16(x.numel()).reshape(x.shape) >= self.threshold
        mask = torch.from_numpy(keep * scale_bits).view(x.dtype)  # bool * uint -> uint of the same width
        return x * mask.to(x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _lora_linear_training_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA Linear forward, base(x) + B(A(dropout(x))) * scaling, with two passes fewer.

    The scaling multiplies the rank-r intermediate instead of the full-width output, and the
    addition to the base output happens inside the matmul (addmm): per LoRA layer that saves
    two full-activation passes forward and one backward. Anything but plain training with
    one active adapter (eval, merged weights, DoRA, biases, mixed adapter batches) goes to
    peft's own forward.
    """
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    if (not self.training or args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or self.use_dora.get(name) or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    h = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight.to(x.dtype)) * self.scaling[name]
    out = self.base_layer(x)
    fused = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]),
                        self.lora_B[name].weight.to(x.dtype).t())
    return fused.view(out.shape)


def speed_up_lora_on_cpu(loaded, fast_dropout: bool = True) -> None:
    """Changes to the LoRA layers that keep the maths and cut the time: on CPU always; on CUDA
    only benchmarks/gpu.py applies them so far (its "lean LoRA" case, without FastDropout).

    - dropout masks from FastDropout instead of torch's bernoulli_ (``fast_dropout``: a CPU cost);
    - no cast of each layer's input to the fp32 adapter dtype: under bf16 autocast the
      LoRA matmuls run in bf16 anyway, so the fp32 copy of every activation was pure cost;
    - the training forward of LoRA Linear layers with two full-activation passes fewer.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    for module in loaded.model.modules():
        if isinstance(module, LoraLayer):
            if loaded.dtype == torch.bfloat16:
                module.cast_input_dtype_enabled = False
            for name, drop in module.lora_dropout.items():
                if fast_dropout and isinstance(drop, torch.nn.Dropout):
                    module.lora_dropout[name] = FastDropout(drop.p)
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_lora_linear_training_forward, module)
