"""Offline evaluation of whatever weights are active on a model: held-out loss and perplexity of
the reference responses per category, generated answers, and ROUGE-L against the references.

The loss is fedit.evaluation.loss.heldout_loss on examples tokenized exactly as in
training (same template, cutoff and label masking), so it is the training loss on
unseen data. ROUGE-L is the rouge-score package's F-measure (with Porter stemming),
averaged per category and overall.

Callers choose the weights: ``fedit eval`` loads PEFT adapters side by side and
switches between them (``ModelSet``), ``fedit reproduce`` swaps adapter tensors
through the adapter door.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from fedit.config import EvalConfig, TrainConfig
from fedit.data.batches import tokenize
from fedit.data.prompts import record_prompt
from fedit.evaluation.heldout import heldout_loss
from fedit.evaluation.questions import QuestionSet
from fedit.inference import cut_at_stop, stops
from fedit.model import Loaded


def clean_answer(text: str, template: str) -> str:
    return cut_at_stop(text, stops(template)).strip()


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (rouge-score, Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def mean_by_category(values: list[float], categories: list[str]) -> dict:
    by: dict[str, list[float]] = defaultdict(list)
    for v, c in zip(values, categories, strict=True):
        by[c].append(v)
    return {"mean": sum(values) / len(values) if values else float("nan"),
            "by_category": {c: sum(v) / len(v) for c, v in sorted(by.items())}}


@dataclass(frozen=True)
class Settings:
    """How answers are produced and the loss is computed; recorded with every result."""

    template: str = "alpaca"
    cutoff_len: int = 512
    train_on_inputs: bool = False
    batch_size: int = 8
    batch_tokens: int = TrainConfig().micro_batch_tokens  # most tokens per forward pass of the held-out loss
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 42

    @classmethod
    def from_config(cls, ecfg: EvalConfig, template: str, cutoff_len: int, train_on_inputs: bool,
                    seed: int, batch_tokens: int = TrainConfig().micro_batch_tokens) -> "Settings":
        return cls(template=template, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs,
                   batch_size=ecfg.batch_size, batch_tokens=batch_tokens, max_new_tokens=ecfg.max_new_tokens,
                   do_sample=ecfg.do_sample, temperature=ecfg.temperature, top_p=ecfg.top_p, seed=seed)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def generate_answers(loaded: Loaded, qset: QuestionSet, s: Settings,
                     on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    """Answers with fedit.inference.generate, in eval mode with the KV cache on.

    A model fresh from training (``fedit reproduce``) is in train mode, where LoRA dropout
    would change greedy answers, and has ``use_cache`` off: both are switched for the
    generation and restored after it, as is the tokenizer's padding side.
    """
    from fedit.inference import generate

    model, tok = loaded.model, loaded.tokenizer
    saved = (model.training, tok.padding_side, model.config.use_cache)
    prompts = [record_prompt(q.record(), s.template, tok) for q in qset.questions]
    stop = stops(s.template)
    torch.manual_seed(s.seed)  # sampling, when chosen, is reproducible
    out: list[str] = []
    model.eval()
    model.config.use_cache = True
    try:
        for start in range(0, len(prompts), s.batch_size * 4):
            chunk = prompts[start:start + s.batch_size * 4]
            out += generate(loaded, chunk, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                            do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p, stop=stop,
                            add_special_tokens=s.template != "chat")
            if on_batch:
                on_batch(len(out), len(prompts))
    finally:
        model.train(saved[0])
        tok.padding_side = saved[1]
        model.config.use_cache = saved[2]
    return [clean_answer(a, s.template) for a in out]


def evaluate_active(loaded: Loaded, qset: QuestionSet, s: Settings, name: str = "model",
                    on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Evaluate the weights currently active on ``loaded.model`` on a question set.

    With references (a test file of records): loss, perplexity and ROUGE-L, overall and per
    category, plus every answer. Without (Vicuna questions): the answers only.
    """
    result: dict = {"name": name, "questions": len(qset.questions), "source": qset.source, "kind": qset.kind,
                    "settings": s.to_dict()}
    cats = [q.category for q in qset.questions]
    if qset.has_references:
        t0 = time.perf_counter()
        examples = tokenize([q.record() for q in qset.questions], loaded.tokenizer, s.cutoff_len,
                            s.train_on_inputs, s.template)
        loss = heldout_loss(loaded, examples, None, s.batch_size, s.batch_tokens)
        loss["perplexity_by_category"] = {c: math.exp(min(v, 50.0)) for c, v in loss["by_category"].items()}
        result["loss"] = loss
        result["seconds_loss"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    answers = generate_answers(loaded, qset, s, on_batch)
    result["seconds_generation"] = round(time.perf_counter() - t0, 3)
    rows = [{"id": q.id, "category": q.category, **({"history": [list(t) for t in q.history]} if q.history else {}),
             "instruction": q.instruction, "context": q.context, "reference": q.reference, "answer": a}
            for q, a in zip(qset.questions, answers)]
    if qset.has_references:
        scores = rouge_l(answers, [q.reference for q in qset.questions])
        for row, sc in zip(rows, scores):
            row["rouge_l"] = sc
        result["rouge_l"] = mean_by_category(scores, cats)
    result["answers"] = rows
    return result


# ---------------------------------------------------------------- several PEFT adapters on one base model

@dataclass
class ModelSet:
    """One base model with named PEFT adapters loaded side by side; ``use(label)`` activates one
    (an adapter label, or a label mapped to None for the untuned base model)."""

    loaded: Loaded
    adapters: dict[str, str | None] = field(default_factory=dict)  # label -> peft adapter name, None = base

    @contextmanager
    def use(self, label: str) -> Iterator[Loaded]:
        name = self.adapters[label]
        model = self.loaded.model
        if name is None:
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    yield self.loaded
            else:
                yield self.loaded
            return
        model.set_adapter(name)
        yield self.loaded


def load_model_set(model_name: str, adapters: dict[str, Path | None], dtype: str = "auto",
                   device: str = "auto") -> ModelSet:
    """Load the base model once and every adapter of ``adapters`` (label -> directory, None = base)."""
    from peft import PeftModel

    from fedit.config import ModelConfig
    from fedit.model import load_base

    loaded = load_base(ModelConfig(name=model_name, dtype=dtype, device=device))
    names: dict[str, str | None] = {}
    for i, (label, path) in enumerate(adapters.items()):
        if path is None:
            names[label] = None
            continue
        peft_name = f"adapter_{i}"
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(path), adapter_name=peft_name)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, str(path), adapter_name=peft_name)
        names[label] = peft_name
    loaded.model.eval()
    return ModelSet(loaded, names)
