"""The frozen base model and its LoRA adapter, loaded once per process.

Clients differ only by the LoRA weights swapped in through the adapter door
(fedit/adapter.py); nothing deep-copies the model per client.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise FeditError(f"could not load model {cfg.name!r} from {source}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    # fedit's CPU attention: packed micro-batches, and the faster bf16 backward (fedit/attention.py).
    packed = device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and \
        model.config._attn_implementation == "sdpa"
    if packed:
        from fedit import attention

        model.set_attn_implementation(attention.NAME)
    return Loaded(model=model, tokenizer=tok, device=device, dtype=dtype, source=str(source), packed=packed)


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
