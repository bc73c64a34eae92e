"""Use a tuned adapter: load base + adapter for inference, and generate answers.

The adapter argument may be a PEFT adapter directory or a fedit run directory
(its final ``adapter/``, or the latest round if the run is unfinished). The
base model is the one the run used (its config.toml) unless another is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedit.config import DEFAULT_MODEL, ModelConfig
from fedit.data.prompts import prompt as make_prompt
from fedit.errors import FeditError
from fedit.model import Loaded, load_base


def resolve_adapter(path: str | Path) -> tuple[Path, str | None]:
    """(adapter directory, base model name recorded by the run or None) for a run or adapter directory."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        run = p.parent if (p.parent / "config.toml").is_file() else p.parent.parent
        return p, _run_model(run)
    if (p / "config.toml").is_file():
        if (p / "adapter" / "adapter_config.json").is_file():
            return p / "adapter", _run_model(p)
        state = p / "state.json"
        if state.is_file():
            return p / json.loads(state.read_text())["adapter"], _run_model(p)
    raise FeditError(f"{path} is neither a PEFT adapter directory (adapter_config.json) nor a fedit run directory; "
                     f"pass RUN_DIR or RUN_DIR/adapter")


def _run_model(run_dir: Path) -> str | None:
    cfg = run_dir / "config.toml"
    if not cfg.is_file():
        return None
    import tomllib

    return tomllib.loads(cfg.read_text()).get("model", {}).get("name")


def load_for_inference(adapter: str | Path | None, model: str | None = None, dtype: str = "auto",
                       device: str = "auto") -> Loaded:
    """Base model (+ adapter if given), in eval mode. ``model`` defaults to the run's base model."""
    from peft import PeftModel

    adapter_dir, run_model = resolve_adapter(adapter) if adapter else (None, None)
    loaded = load_base(ModelConfig(name=model or run_model or DEFAULT_MODEL, dtype=dtype, device=device))
    if adapter_dir is not None:
        loaded.model = PeftModel.from_pretrained(loaded.model, adapter_dir)
    loaded.model.eval()
    loaded.model.config.use_cache = True
    return loaded


@torch.no_grad()
def generate(loaded: Loaded, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9) -> list[str]:
    """Answers to already-templated prompts; greedy unless ``do_sample``. Left-padded batches."""
    tok = loaded.tokenizer
    tok.padding_side = "left"
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(loaded.device)
        kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        with loaded.autocast():
            gen = loaded.model.generate(**enc, **kwargs)
        for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:]):
            out[i] = tok.decode(row, skip_special_tokens=True).strip()
    return out


def answer(loaded: Loaded, instruction: str, context: str = "", template: str = "alpaca", **kw) -> str:
    """One answer to one instruction, with the training prompt template."""
    return generate(loaded, [make_prompt(instruction, context, template, loaded.tokenizer)], **kw)[0]
