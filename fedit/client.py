"""Local training of one client: global adapter + the client's examples -> Update.

The explicit loop of the paper's clients: a fresh AdamW per client and round,
``batch_size`` examples per optimizer step through gradient accumulation over
micro-batches, the loss averaged over every labelled token of the step (so
accumulation gives the same gradient as one big batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from fedit.config import TrainConfig
from fedit.data.batches import Example, make_batch, micro_batches, plan_steps
from fedit.loss import token_losses
from fedit.model import Adapter, Loaded, get_adapter, set_adapter


@dataclass
class Update:
    """What a client sends back: its adapter, how many examples it trained on, and its metrics."""

    client_id: int
    adapter: Adapter
    num_examples: int
    metrics: dict = field(default_factory=dict)


@dataclass
class Failure:
    """A selected client that sent no usable reply (crashed, timed out, unreachable), and why."""

    client_id: int
    reason: str


def seed_for(seed: int, round_num: int, client_id: int) -> int:
    """One seed per (run, round, client): a client's training depends on nothing else, so resume is exact."""
    return int(np.random.SeedSequence([seed, round_num, client_id]).generate_state(1)[0])


def train(loaded: Loaded, global_adapter: Adapter, examples: list[Example], cfg: TrainConfig, seed: int,
          client_id: int = 0, on_step: Callable[[int, int], None] | None = None) -> Update:
    model = loaded.model
    set_adapter(model, global_adapter)
    model.train()
    torch.manual_seed(seed)  # LoRA dropout, FastDropout's masks included
    steps = plan_steps(len(examples), cfg.batch_size, cfg.local_epochs, cfg.max_steps, np.random.default_rng(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad = loaded.tokenizer.pad_token_id
    loss_sum, tokens, started = 0.0, 0, time.perf_counter()
    for s, step in enumerate(steps):
        step_tokens = sum(examples[i].trained_tokens for i in step)
        if step_tokens == 0:  # every response truncated away: nothing to learn from this step
            continue
        for mb in micro_batches(step, examples, cfg.micro_batch_size):
            batch = make_batch([examples[i] for i in mb], pad, loaded.packed, loaded.device)
            with loaded.autocast():
                losses, _ = token_losses(model, batch)
            # Divide by the step's token count, not the micro-batch's: the sum over micro-batches
            # then equals the mean over the whole step, as if it were one batch.
            (losses.sum() / step_tokens).backward()
            loss_sum += losses.detach().sum().item()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += step_tokens
        if on_step:
            on_step(s + 1, len(steps))
    seconds = time.perf_counter() - started
    metrics = {"train_loss": loss_sum / max(tokens, 1), "steps": len(steps), "trained_tokens": tokens,
               "seconds": round(seconds, 3)}
    return Update(client_id=client_id, adapter=get_adapter(model), num_examples=len(examples), metrics=metrics)
