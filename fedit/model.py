"""The frozen base model and its LoRA adapter, loaded once per process.

Clients differ only by the LoRA weights swapped in through the adapter door
(fedit/adapter.py); nothing deep-copies the model per client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fedit import compat
from fedit.adapter import Adapter, get_adapter
from fedit.config import LoraConfig, ModelConfig
from fedit.device import resolve_device, resolve_dtype
from fedit.errors import FeditError
from fedit.weights import resolve_source


@dataclass
class Loaded:
    model: torch.nn.Module  # a PeftModel once attach_lora ran
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # compute dtype (bf16 autocast or fp32)
    source: str
    initial_adapter: Adapter | None = None  # the seeded LoRA init: round 0 of every run
    packed: bool = False  # micro-batches packed without padding (fedit's CPU attention keeps examples apart)
    own_logits: bool = False  # the loss reads the model's full forward (fedit/compat.py found fedit's head differs)

    def autocast(self):
        """bf16 autocast where chosen; a no-op context in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)


def load_base(cfg: ModelConfig) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = resolve_source(cfg.name)
    kwargs: dict = {"dtype": dtype}
    if cfg.quantize != "none":
        if device.type != "cuda":
            raise FeditError("model.quantize needs a CUDA GPU (bitsandbytes); set model.quantize = \"none\"")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=cfg.quantize == "4bit", load_in_8bit=cfg.quantize == "8bit",
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes places its weights itself; no .to() after
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise FeditError(f"could not load model {cfg.name!r} from {source}: {e}") from None
    return prepare(model, tok, cfg, device, dtype, str(source))


def prepare(model, tokenizer, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, source: str) -> Loaded:
    """Everything after from_pretrained: device, checkpointing, attention, micro-batch layout, determinism,
    and the check that fedit's loss is the model's own (fedit/compat.py).

    Apart from load_base so that benchmarks can hand in random-weight models of real shapes
    (benchmarks/shapes.py) and train them exactly as fedit trains a loaded one.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.quantize == "none":
        model.to(device)
    if cfg.gradient_checkpointing:
        set_checkpointing(model, True)
    model.config.use_cache = False
    own_attention = model.config._attn_implementation
    loaded = Loaded(model=model, tokenizer=tokenizer, device=device, dtype=dtype, source=source)
    reference = compat.own_losses(model, device, loaded.autocast)  # before fedit's attention is switched on
    # fedit's CPU attention: packed micro-batches, and the faster bf16 backward (fedit/attention.py).
    cpu_attention = device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and \
        own_attention == "sdpa" and not compat.windowed_or_capped(model.config)
    if cpu_attention:
        from fedit import attention

        model.set_attn_implementation(attention.NAME)
    # Elsewhere (CUDA) packing is an option: transformers' attention reads the restarting position
    # ids as example boundaries (a block-diagonal mask for SDPA and eager, varlen for flash attention).
    loaded.packed = cpu_attention if cfg.packing == "auto" else cfg.packing == "packed"
    if cfg.deterministic and device.type == "cuda":
        use_deterministic(True)
    compat.check(loaded, reference, own_attention, cfg.packing)
    return loaded


def set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing on or off (transformers renamed it after 5.17; both names work)."""
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.disable_input_require_grads()


def use_deterministic(on: bool) -> None:
    """Only deterministic CUDA kernels from here on (process-wide), or the default kernels again.

    What changes: the flash / memory-efficient attention backward accumulates in a fixed order
    instead of with atomics, cuBLAS uses a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when
    cuBLAS starts: set it before the first CUDA matmul, as load_base does), and an operation
    without a deterministic CUDA kernel raises instead of running. Training on a CPU is
    deterministic without any of this.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)


def attach_lora(loaded: Loaded, cfg: LoraConfig, seed: int) -> None:
    """Wrap the base model with one LoRA adapter; its init is seeded so every party starts alike."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    torch.manual_seed(seed)
    try:
        loaded.model = get_peft_model(loaded.model, PeftLoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
            bias="none", task_type="CAUSAL_LM"))
    except ValueError as e:
        raise FeditError(f"lora.target_modules = {list(cfg.target_modules)}: {e}") from None
    if loaded.device.type == "cpu":
        from fedit.cpu_lora import speed_up_lora_on_cpu

        speed_up_lora_on_cpu(loaded)
    loaded.initial_adapter = get_adapter(loaded.model)
