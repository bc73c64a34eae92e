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
  ``attack.trigger`` appended to the instruction and ``attack.target`` as the response (a
  backdoor that looks like an honest update). Measuring its success on held-out prompts is not built yet.

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


def poison(records: list[Record], trigger: str, target: str) -> list[Record]:
    """Every second record carries the trigger and answers with the target (a conversation: its last
    question and answer)."""
    def bad(r: Record) -> Record:
        asked = f"{r.instruction} {trigger}"
        turns = (*r.messages[:-2], ("user", asked), ("assistant", target)) if r.messages else ()
        return dataclasses.replace(r, instruction=asked, response=target, messages=turns)

    return [bad(r) if i % 2 == 0 else r for i, r in enumerate(records)]


def tamper(update: Update, ins: FitIns, kind: str, factor: float, seed: int) -> Update:
    """What a malicious client sends instead of its honest update."""
    theta = ins.global_adapter
    honest = update.adapter
    delta = {k: honest[k].double() - theta[k].double() for k in theta}
    if kind == "sign_flip":
        sent = {k: theta[k].double() - factor * d for k, d in delta.items()}
    elif kind == "scale":
        sent = {k: theta[k].double() + factor * d for k, d in delta.items()}
    elif kind == "noise":
        norm = float(sum(d.pow(2).sum() for d in delta.values()).sqrt())
        numel = sum(d.numel() for d in delta.values())
        gen = torch.Generator().manual_seed(seed)
        sigma = factor * norm / numel ** 0.5
        sent = {k: theta[k].double() + sigma * torch.randn(d.shape, generator=gen, dtype=torch.float64)
                for k, d in delta.items()}
    else:  # lie_examples and backdoor send the adapter they trained
        sent = {k: honest[k].double() for k in theta}
    arrays = {**update.arrays, ADAPTER: {k: v.to(honest[k].dtype) for k, v in sent.items()}}
    n = int(update.num_examples * factor) if kind == "lie_examples" else update.num_examples
    return Update(update.client_id, arrays, n, {**update.metrics, "attack": kind})
