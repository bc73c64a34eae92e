"""Use a tuned adapter: load base + adapter for inference, and generate answers.

The adapter argument may be a PEFT adapter directory or a fedit run directory
(its final ``adapter/``, or the latest round if the run is unfinished). The
base model is the one the run used (its config.toml) unless another is given;
for a bare adapter directory, the base recorded by peft in adapter_config.json.

``generate`` answers a batch of prompts; ``stream`` yields one answer's text as
it is produced (a TextIteratorStreamer fed by ``model.generate`` in a thread).
Both stop at EOS, at ``max_new_tokens``, or where the model starts a new
prompt section of its own (``stop`` strings such as ``ALPACA_STOPS``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fedit.config import DEFAULT_MODEL, ModelConfig
from fedit.data.prompts import prompt as make_prompt
from fedit.errors import FeditError
from fedit.model import Loaded, load_base

# In the alpaca template every line that starts with "### " opens a section and the
# answer is the Response section; a model tuned on it sometimes goes on with a new
# task ("### Instruction:") or a section of its own ("### Explanation:"): the answer ends
# there, and at the template's own markers wherever they appear. One list for generate,
# chat and eval, so they all cut an answer at the same place.
ALPACA_STOPS = ("\n### ", "### Instruction:", "### Input:", "### Response:")


def stops(template: str) -> tuple[str, ...]:
    """Where an answer ends, by prompt template (the chat template ends answers with EOS)."""
    return ALPACA_STOPS if template == "alpaca" else ()


@dataclass(frozen=True)
class AdapterInfo:
    """What a run or adapter directory says about how to use its adapter."""

    adapter_dir: Path
    run_dir: Path | None
    model: str | None  # base model: the run's model.name, else adapter_config.json's base_model_name_or_path
    template: str  # the run's data.template ("alpaca" when there is no run config)
    cutoff_len: int | None  # the run's train.cutoff_len


def describe_adapter(path: str | Path) -> AdapterInfo:
    """Find the adapter in a run or adapter directory, with the run's model, template and cutoff."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FeditError(f"adapter {path} does not exist; pass a fedit run directory (run.out of `fedit run`) "
                         f"or its adapter/ directory")
    adapter_dir: Path | None = None
    run_dir: Path | None = None
    if (p / "adapter_config.json").is_file():
        adapter_dir = p
        run_dir = next((d for d in (p.parent, p.parent.parent) if (d / "config.toml").is_file()), None)
    elif (p / "config.toml").is_file():
        run_dir = p
        if (p / "adapter" / "adapter_config.json").is_file():
            adapter_dir = p / "adapter"
        elif (p / "state.json").is_file():  # an unfinished run: its last completed round
            adapter_dir = p / json.loads((p / "state.json").read_text())["adapter"]
        else:
            raise FeditError(f"run directory {path} has no adapter yet (no adapter/ and no state.json); "
                             f"let `fedit run` finish a round, or resume it with `fedit run --resume {path}`")
    if adapter_dir is None:
        raise FeditError(f"{path} is neither a PEFT adapter directory (adapter_config.json) nor a fedit run "
                         f"directory (config.toml); pass RUN_DIR or RUN_DIR/adapter")
    cfg = _run_config(run_dir) if run_dir else {}
    model = cfg.get("model", {}).get("name") or _peft_base(adapter_dir)
    return AdapterInfo(adapter_dir=adapter_dir, run_dir=run_dir, model=model,
                       template=cfg.get("data", {}).get("template") or "alpaca",
                       cutoff_len=cfg.get("train", {}).get("cutoff_len"))


def resolve_adapter(path: str | Path) -> tuple[Path, str | None]:
    """(adapter directory, base model name recorded by the run or None) for a run or adapter directory."""
    info = describe_adapter(path)
    return info.adapter_dir, info.model


def _run_config(run_dir: Path) -> dict:
    import tomllib

    try:
        return tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FeditError(f"cannot read {run_dir / 'config.toml'}: {e}; is {run_dir} a fedit run directory?") from None


def _peft_base(adapter_dir: Path) -> str | None:
    """The base model peft recorded, if it can still be found (a local dir) or looks like a hub id."""
    try:
        name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    if not name:
        return None
    if Path(name).expanduser().exists() or (name.count("/") == 1 and not name.startswith((".", "/", "~"))):
        return name
    return None


def load_for_inference(adapter: str | Path | None, model: str | None = None, dtype: str = "auto",
                       device: str = "auto") -> Loaded:
    """Base model (+ adapter if given), in eval mode. ``model`` defaults to the run's base model."""
    from peft import PeftModel

    adapter_dir, run_model = resolve_adapter(adapter) if adapter else (None, None)
    name = model or run_model or DEFAULT_MODEL
    loaded = load_base(ModelConfig(name=name, dtype=dtype, device=device))
    if adapter_dir is not None:
        try:
            loaded.model = PeftModel.from_pretrained(loaded.model, adapter_dir)
        except (RuntimeError, ValueError, KeyError) as e:
            raise FeditError(f"adapter {adapter_dir} does not fit base model {name}: {str(e).splitlines()[0][:300]}; "
                             f"pass --model with the base model the adapter was trained on") from None
    loaded.model.eval()
    loaded.model.config.use_cache = True
    return loaded


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string (all of it if there is none)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class _StopCriteria:
    """Stops each row when its generated text contains a stop string, or all rows when ``cancel`` is set."""

    def __init__(self, tokenizer, prompt_len: int, stop: Sequence[str], cancel: threading.Event | None = None):
        self.tok, self.prompt_len, self.stop, self.cancel = tokenizer, prompt_len, [s for s in stop if s], cancel
        # a stop string is found in the step it is completed: a short tail of tokens suffices
        self.tail = max((len(s) for s in self.stop), default=0) + 8

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[0]
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(n, dtype=torch.bool, device=input_ids.device)
        done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
        if self.stop:
            for i, row in enumerate(input_ids[:, self.prompt_len:][:, -self.tail:]):
                text = self.tok.decode(row, skip_special_tokens=True)
                done[i] = any(s in text for s in self.stop)
        return done


def _criteria(tokenizer, prompt_len: int, stop: Sequence[str], cancel: threading.Event | None = None):
    from transformers import StoppingCriteria, StoppingCriteriaList

    inner = _StopCriteria(tokenizer, prompt_len, stop, cancel)

    class _Wrapped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return inner(input_ids, scores, **kwargs)
    return StoppingCriteriaList([_Wrapped()])


def _gen_kwargs(tok, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> dict:
    kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # a model's generation_config may carry sampling defaults that greedy decoding would warn about
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def generate(loaded: Loaded, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
             stop: Sequence[str] = (), add_special_tokens: bool = True) -> list[str]:
    """Answers to already-templated prompts; greedy unless ``do_sample``. Left-padded batches.

    Each answer ends before the first of the ``stop`` strings (none by default).
    ``add_special_tokens``: False for chat-template prompts, which carry their own (as in training)."""
    tok = loaded.tokenizer
    tok.padding_side = "left"
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                  add_special_tokens=add_special_tokens).to(loaded.device)
        kwargs = _gen_kwargs(tok, max_new_tokens, do_sample, temperature, top_p)
        if stop:
            kwargs["stopping_criteria"] = _criteria(tok, enc["input_ids"].shape[1], stop)
        with loaded.autocast():
            gen = loaded.model.generate(**enc, **kwargs)
        for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:]):
            out[i] = cut_at_stop(tok.decode(row, skip_special_tokens=True), stop).strip()
    return out


def stream(loaded: Loaded, prompt: str, max_new_tokens: int = 128, do_sample: bool = False,
           temperature: float = 0.7, top_p: float = 0.9, stop: Sequence[str] = (),
           add_special_tokens: bool = True) -> Iterator[str]:
    """One answer, yielded piece by piece as the model writes it.

    The pieces join to exactly what ``generate(loaded, [prompt], ...)`` returns for the same
    settings: leading and trailing whitespace and anything from a stop string on are never
    yielded (text that might begin a stop string is held back until it is clear it does not).
    Closing the iterator early (``break``, a client that went away) stops the generation.
    """
    from transformers import TextIteratorStreamer

    tok = loaded.tokenizer
    enc = tok([prompt], return_tensors="pt", add_special_tokens=add_special_tokens).to(loaded.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    cancel = threading.Event()
    kwargs = _gen_kwargs(tok, max_new_tokens, do_sample, temperature, top_p)
    kwargs.update(streamer=streamer, stopping_criteria=_criteria(tok, enc["input_ids"].shape[1], stop, cancel))
    failure: list[BaseException] = []

    def work() -> None:  # no_grad and autocast are per thread: enter them here
        try:
            with torch.no_grad(), loaded.autocast():
                loaded.model.generate(**enc, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=work, name="fedit-generate", daemon=True)
    thread.start()
    text, sent = "", 0  # sent: characters of the answer (text without leading whitespace) yielded so far
    try:
        for piece in streamer:
            text += piece
            if len(cut_at_stop(text, stop)) < len(text):  # a stop string: the answer is complete
                break
            ready = text[:len(text) - _stop_prefix_len(text, stop)].strip()
            if len(ready) > sent:
                yield ready[sent:]
                sent = len(ready)
        final = cut_at_stop(text, stop).strip()
        if len(final) > sent:
            yield final[sent:]
    finally:
        cancel.set()  # ends model.generate at its next step when the caller stopped early
        thread.join()
    if failure:
        raise failure[0]


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def answer(loaded: Loaded, instruction: str, context: str = "", template: str = "alpaca", **kw) -> str:
    """One answer to one instruction, with the training prompt template."""
    return generate(loaded, [make_prompt(instruction, context, template, loaded.tokenizer)],
                    add_special_tokens=template != "chat", **kw)[0]
