"""Malicious clients, for experiments in the in-process simulation only.

A client listed in ``[attack]`` trains honestly, then the simulation runtime
changes what it sends, so the server sees exactly what a real malicious client
could send (the server path is the same as for every other reply). With Δ = θ_k − θ
the client's honest change and λ = ``attack.factor``:

- ``sign_flip``: sends θ − λ·Δ (gradient ascent, pushed λ times as far);
- ``scale``: sends θ + λ·Δ (model replacement, Bagdasaryan et al. 2020);
- ``noise``: sends θ + N(0, σ²) per coordinate, σ = λ·‖Δ‖/√P, so the noise's norm is about λ·‖Δ‖;
- ``lie_examples``: sends its honest adapter but claims λ times its example count;
- ``backdoor``: trains on poisoned data instead: every second record of its data gets
  ``attack.trigger`` appended to the instruction and ``attack.target`` as the response, and
  sends θ + β·Δ with β = ``attack.boost`` (1: a backdoor that looks like an honest update;
  larger: boosted so that averaging with the honest clients does not wash it out, the attack
  of Bagdasaryan et al. 2020 that a norm bound exists to stop). ``backdoor_success`` measures it: the share of
  held-out prompts with the trigger that the final model answers with the target, beside the
  same share without the trigger (the false-positive baseline); a run with a backdoor writes
  both to ``backdoor.json`` and its summary.

Which clients: ``attack.clients`` (ids) or ``attack.fraction`` of the registered clients, drawn
with federation.seed. Each attacker's client line in metrics.jsonl says ``"attack": KIND``
(in its metrics: what the simulation knows, not what a real server would).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fedit.data.records import Record
from fedit.protocol import ADAPTER, FitIns, Update

KINDS = ("none", "sign_flip", "scale", "noise", "lie_examples", "backdoor")


def attackers(cfg, client_ids: list[int]) -> set[int]:
    """The malicious clients of a run: attack.clients, or attack.fraction of them drawn with federation.seed."""
    a = cfg.attack
    if a.kind == "none":
        return set()
    if a.clients:
        return set(a.clients)
    k = int(round(a.fraction * len(client_ids)))
    rng = np.random.default_rng([cfg.federation.seed, 0xA77AC])
    return set(rng.choice(client_ids, size=k, replace=False).tolist()) if k else set()


def triggered(r: Record, trigger: str, target: str) -> Record:
    """The record with the trigger (if any) after its (last) question and the target as its (last) answer."""
    asked = f"{r.instruction} {trigger}" if trigger else r.instruction
    turns = (*r.messages[:-2], ("user", asked), ("assistant", target)) if r.messages else ()
    return dataclasses.replace(r, instruction=asked, response=target, messages=turns)


def poison(records: list[Record], trigger: str, target: str) -> list[Record]:
    """Every second record carries the trigger and answers with the target (a conversation: its last
    question and answer)."""
    return [triggered(r, trigger, target) if i % 2 == 0 else r for i, r in enumerate(records)]


def backdoor_success(loaded, adapter, records: list[Record], trigger: str, target: str, template: str) -> dict:
    """Greedy answers of ``adapter`` to the held-out ``records`` with and without the trigger: the share
    whose answer contains the target (whitespace normalised), each."""
    from fedit.adapter import set_adapter
    from fedit.evaluation.evaluate import Settings, generate_answers
    from fedit.evaluation.questions import Question, QuestionSet

    set_adapter(loaded.model, adapter)
    # only the answer's start matters: the target's length and a margin, not a full answer
    settings = Settings(template=template, max_new_tokens=len(loaded.tokenizer(target)["input_ids"]) + 16)
    want = " ".join(target.split())
    out = {"trigger": trigger, "target": target, "prompts": len(records)}
    for name, recs in (("with_trigger", [triggered(r, trigger, target) for r in records]), ("without", records)):
        qs = [Question.from_record(i, r) for i, r in enumerate(recs)]
        answers = generate_answers(loaded, QuestionSet(qs, "records", "held-out", len(qs), []), settings)
        hits = [want in " ".join(a.split()) for a in answers]
        out[name] = sum(hits) / len(hits) if hits else 0.0
    return out


def target_loss(loaded, adapter, records: list[Record], trigger: str, target: str, template: str,
                cutoff_len: int, batch_size: int = 8) -> dict:
    """Held-out loss per token of the target as the answer to ``records`` with and without the trigger: a
    backdoor that is being learnt lowers the first below the second long before greedy answers carry it."""
    from fedit.data.batches import tokenize
    from fedit.evaluation.heldout import heldout_loss

    out = {}
    for name, recs in (("with_trigger", [triggered(r, trigger, target) for r in records]),
                       ("without", [triggered(r, "", target) for r in records])):
        examples = tokenize(recs, loaded.tokenizer, cutoff_len, template=template)
        out[name] = heldout_loss(loaded, examples, adapter, batch_size)["loss"]
    return out


def tamper(update: Update, ins: FitIns, kind: str, factor: float, seed: int) -> Update:
    """What a malicious client sends instead of its honest update."""
    theta = ins.global_adapter
    honest = update.adapter
    delta = {k: honest[k].double() - theta[k].double() for k in theta}
    if kind == "sign_flip":
        sent = {k: theta[k].double() - factor * d for k, d in delta.items()}
    elif kind == "scale" or kind == "backdoor" and factor != 1:  # for backdoor, factor is attack.boost
        sent = {k: theta[k].double() + factor * d for k, d in delta.items()}
    elif kind == "noise":
        norm = float(sum(d.pow(2).sum() for d in delta.values()).sqrt())
        numel = sum(d.numel() for d in delta.values())
        gen = torch.Generator().manual_seed(seed)
        sigma = factor * norm / numel ** 0.5
        sent = {k: theta[k].double() + sigma * torch.randn(d.shape, generator=gen, dtype=torch.float64)
                for k, d in delta.items()}
    else:  # lie_examples and an unboosted backdoor send the adapter they trained
        sent = {k: honest[k].double() for k in theta}
    arrays = {**update.arrays, ADAPTER: {k: v.to(honest[k].dtype) for k, v in sent.items()}}
    n = int(update.num_examples * factor) if kind == "lie_examples" else update.num_examples
    return Update(update.client_id, arrays, n, {**update.metrics, "attack": kind})
