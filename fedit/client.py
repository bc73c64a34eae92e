"""Local training of one client: FitIns + the client's examples -> Update.

The explicit loop of the paper's clients: a fresh optimizer per client and round
(the paper's AdamW unless the strategy's client algorithm makes another),
``batch_size`` examples per optimizer step through gradient accumulation over
micro-batches, the loss averaged over every labelled token of the step (so
accumulation gives the same gradient as one big batch). A strategy's client
algorithm (fedit.protocol.ClientAlgorithm) hooks into this one loop: an extra
loss term and a gradient hook once per optimizer step, before clipping and
the optimizer's step, the optimizer itself, and arrays, state and metrics of
its own after the last step.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from fedit.config import TrainConfig
from fedit.data.batches import Example, make_batch, micro_batches, plan_steps
from fedit.token_loss import token_losses
from fedit.adapter import adapter_parameters, get_adapter, set_adapter
from fedit.model import Loaded
from fedit import hetero
from fedit.protocol import ADAPTER, GLOBAL, Arrays, ClientAlgorithm, Failure, FitIns, Update

__all__ = ["train", "seed_for", "Update", "Failure"]


def seed_for(seed: int, round_num: int, client_id: int) -> int:
    """One seed per (run, round, client): a client's training depends on nothing else, so resume is exact."""
    return int(np.random.SeedSequence([seed, round_num, client_id]).generate_state(1)[0])


def train(loaded: Loaded, ins: FitIns, examples: list[Example], cfg: TrainConfig, seed: int,
          algorithm: type[ClientAlgorithm] = ClientAlgorithm, state: Arrays | None = None,
          on_step: Callable[[int, int], None] | None = None) -> tuple[Update, Arrays | None]:
    """(the client's Update, the state it keeps for its next round or None)."""
    model = loaded.model
    rank = int(ins.config.get(hetero.RANK, 0))  # a client with its own LoRA rank and modules (fedit/hetero.py)
    mask = old_scaling = None
    if rank:
        trained = list(ins.global_adapter)
        lora = model.peft_config["default"]
        full = hetero.expand(ins.global_adapter, loaded.initial_adapter, rank, lora.r,
                             bool(ins.config.get(hetero.FREEZE_A)))
        ins = FitIns(ins.round, ins.client_id, {**ins.arrays, GLOBAL: full}, ins.config)
        mask = hetero.RankMask(trained, rank)
        old_scaling = hetero.set_scaling(model, float(ins.config.get(hetero.SCALING, lora.lora_alpha / rank)))
    try:
        update, new_state = _train(loaded, ins, examples, cfg, seed, algorithm, state, on_step, mask)
    finally:
        if old_scaling is not None:
            hetero.restore_scaling(old_scaling)
    if rank:
        update.arrays[ADAPTER] = hetero.restrict(update.adapter, trained, rank)
    return update, new_state


def _train(loaded: Loaded, ins: FitIns, examples: list[Example], cfg: TrainConfig, seed: int,
           algorithm: type[ClientAlgorithm], state: Arrays | None, on_step, mask) -> tuple[Update, Arrays | None]:
    model = loaded.model
    set_adapter(model, ins.global_adapter)
    model.train()
    torch.manual_seed(seed)  # LoRA dropout, FastDropout's masks included
    steps = plan_steps(len(examples), cfg.batch_size, cfg.local_epochs, cfg.max_steps, np.random.default_rng(seed))
    named = adapter_parameters(model)
    # A client of lower rank steps only on what it trains: nothing else moves, weight decay included.
    params = [p for k, p in named.items() if mask is None or k in mask.keys]
    algo = algorithm(ins, state)
    opt = algo.make_optimizer(params, cfg)
    opt.zero_grad(set_to_none=True)
    pad = loaded.tokenizer.pad_token_id
    loss_sum, tokens, trained, started = 0.0, 0, 0, time.perf_counter()
    for s, step in enumerate(steps):
        step_tokens = sum(examples[i].trained_tokens for i in step)
        if step_tokens == 0:  # every response truncated away: nothing to learn from this step
            continue
        for mb in micro_batches(step, examples, cfg.micro_batch_size, cfg.micro_batch_tokens, loaded.packed):
            batch = make_batch([examples[i] for i in mb], pad, loaded.packed, loaded.device)
            with loaded.autocast():
                losses, _ = token_losses(model, batch, loaded.own_logits)
            # Divide by the step's token count, not the micro-batch's: the sum over micro-batches
            # then equals the mean over the whole step, as if it were one batch.
            (losses.sum() / step_tokens).backward()
            loss_sum += losses.detach().sum().item()
        extra = algo.extra_loss(named)
        if extra is not None:
            extra.backward()
        algo.on_grads(named)
        if mask is not None:
            mask(named)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += step_tokens
        trained += sum(1 for i in step if examples[i].trained_tokens)  # examples this step learnt from
        if on_step:
            on_step(s + 1, len(steps))
    seconds = time.perf_counter() - started
    metrics = {"train_loss": loss_sum / max(tokens, 1), "steps": len(steps), "trained_tokens": tokens,
               "seconds": round(seconds, 3)}
    shortened = sum(1 for e in examples if e.dropped_turns or e.cut)
    if shortened:  # fitted to train.cutoff_len (fedit/data/batches.py): the run's metrics say how many
        metrics["examples_shortened"] = shortened
    extra_arrays, new_state = algo.finish(named)
    metrics.update(algo.metrics())
    update = Update(client_id=ins.client_id, arrays={ADAPTER: get_adapter(model), **extra_arrays},
                    num_examples=trained, metrics=metrics)
    return update, new_state
