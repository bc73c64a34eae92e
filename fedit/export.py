"""`fedit export`: merge a tuned LoRA adapter into a standalone Hugging Face model directory.

The result loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` (and its tokenizer
with ``AutoTokenizer.from_pretrained(DIR)``), needs neither peft nor fedit, and answers
like base + adapter: peft's ``merge_and_unload`` folds ``B @ A * alpha / r`` into each
adapted weight. The merge is done in fp32 whatever the saving dtype, so the only
difference from base + adapter is the final rounding to ``dtype``.

The directory appears complete or not at all (written beside it, then renamed), and an
existing non-empty directory is never overwritten. ``fedit_export.json`` records where
the weights came from and the prompt template the adapter was tuned with: the merged
model answers best when prompted the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fedit import __version__
from fedit.checkpoint import atomic_dir
from fedit.errors import FeditError
from fedit.inference import describe_adapter, load_for_inference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FeditError(f"--out {out} is a file; pass the path of a new (or empty) directory")
    if out.is_dir() and any(out.iterdir()):
        raise FeditError(f"--out {out} is not empty; fedit export never overwrites: pass a new directory "
                         f"(or remove {out} first)")


def export(adapter: str | Path, out: str | Path, model: str | None = None, dtype: str = "fp32",
           device: str = "cpu") -> Path:
    """Merge ``adapter`` (run or adapter directory) into its base model and save it to ``out``."""
    out = Path(out).expanduser()
    if dtype not in DTYPES:
        raise FeditError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_out_dir(out)
    info = describe_adapter(adapter)
    loaded = load_for_inference(adapter, model=model, dtype="fp32", device=device)
    merged = loaded.model.merge_and_unload()
    merged.config.use_cache = True
    merged.to(DTYPES[dtype])
    check_out_dir(out)  # again: loading took a while and someone may have written there meanwhile
    meta = {"fedit": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "adapter": str(info.adapter_dir.resolve()), "run": str(info.run_dir.resolve()) if info.run_dir else None,
            "base_model": model or info.model, "base_source": loaded.source, "dtype": dtype,
            "template": info.template,
            "usage": "prompt with fedit.data.prompts.prompt(instruction, context, template) "
                     "(the alpaca template is in the FedIT paper's repository, templates/alpaca.json)"}
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "fedit_export.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
