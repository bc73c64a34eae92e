"""The one door adapters pass through: read, load, save and open LoRA weights as plain tensors.

peft's ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` under strict key checks,
and PEFT adapter directories written from a state (not from the live model).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedit.checkpoint import atomic_dir

Adapter = dict[str, torch.Tensor]


def get_adapter(model) -> Adapter:
    """The adapter weights as fp32 CPU tensors owned by the caller (safe to keep after more training)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in get_peft_model_state_dict(model).items()}


def set_adapter(model, state: Adapter) -> None:
    """Load adapter weights; any missing or unexpected LoRA key is an error, not a silent no-op."""
    from peft import set_peft_model_state_dict

    expected = adapter_shapes(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapter keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    result = set_peft_model_state_dict(model, state)
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise ValueError(f"peft ignored adapter keys {bad[:3]}")


def adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    from peft import get_peft_model_state_dict

    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model, state: Adapter, path: Path) -> None:
    """Write ``state`` as a PEFT adapter directory that ``PeftModel.from_pretrained(base, path)`` opens.

    Same files as ``PeftModel.save_pretrained`` (adapter_config.json + adapter_model.safetensors),
    written from ``state`` so the model's live weights are neither read nor changed.
    """
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        model.peft_config["default"].save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})


def load_adapter_file(path: Path) -> Adapter:
    from safetensors.torch import load_file

    return load_file(Path(path) / "adapter_model.safetensors")


def adapter_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters under their adapter keys (the keys of get_adapter), so client
    algorithms can pair a parameter with the same tensor of the global adapter."""
    name = model.active_adapter
    params = {k.replace(f".{name}.", "."): p for k, p in model.named_parameters() if p.requires_grad}
    expected = adapter_shapes(model)
    if set(params) != set(expected):
        raise ValueError(f"trainable parameters do not match the adapter keys: {sorted(set(params) ^ set(expected))[:3]}")
    return params
