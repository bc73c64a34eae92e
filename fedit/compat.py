"""Any causal LM: fedit's fast paths are used only where they compute what the model computes.

fedit trains with its own loss (fedit/token_loss.py: the LM head at labelled positions only)
and, on CPU, its own attention over packed micro-batches (fedit/attention.py). Both are
exact for the families they were written for, and wrong for a family that does something
else (a sliding window, softcapped attention scores, logits post-processed in the forward).
So at load:

- fedit's attention is not used for a model whose config has a sliding window or softcapped
  attention (those need transformers' own attention path);
- one tiny forward then compares fedit's per-example loss, with the attention and batch
  layout chosen, against the model's own ``model(input_ids, labels=...)`` loss on the same
  random tokens. If they differ, fedit's attention is dropped for the model's own (padded
  batches); if they still differ, the loss takes the model's full forward (``own_logits``);
  if even that differs, loading stops with the numbers. Each fallback is logged.
"""

from __future__ import annotations

import logging

import torch

from fedit.errors import FeditError

log = logging.getLogger(__name__)
LENGTHS = (11, 6)  # two examples of different lengths: packing and padding both show


def windowed_or_capped(config) -> bool:
    """Attention that fedit's CPU kernel does not compute: a sliding window or softcapped scores."""
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return bool(sliding or "sliding_attention" in layer_types or getattr(config, "attn_logit_softcapping", None))


def dummy(config) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)  # its own generator: the global seed (LoRA init) is untouched
    return [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


@torch.no_grad()
def own_losses(model, device, autocast) -> torch.Tensor:
    """The model's own mean loss of each ``dummy`` sequence (every token a target), one at a time."""
    seqs = dummy(model.config)
    with autocast():
        return torch.tensor([model(input_ids=torch.tensor([s], device=device), labels=torch.tensor([s], device=device),
                                   use_cache=False).loss.float().item() for s in seqs], dtype=torch.float64)


def fedit_losses(loaded, seqs: list[list[int]]) -> torch.Tensor:
    """fedit's mean loss of each sequence, in one micro-batch as training lays it out."""
    from fedit.data.batches import Example, make_batch
    from fedit.token_loss import token_losses

    batch = make_batch([Example(s, s, "") for s in seqs], loaded.tokenizer.pad_token_id or 0, loaded.packed,
                       loaded.device)
    # with gradients on: training's path (fedit's attention serves padded batches only then)
    with torch.enable_grad(), loaded.autocast():
        losses, rows = token_losses(loaded.model, batch, loaded.own_logits)
    losses, rows = losses.detach().double().cpu(), rows.cpu()
    return torch.zeros(len(seqs), dtype=torch.float64).index_add_(0, rows, losses) / torch.bincount(rows)


def _agree(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the two attention kernels round differently
    return bool(torch.all((a - b).abs() <= tol * b.abs().clamp(min=1.0)))


def check(loaded, reference: torch.Tensor, own_attention: str, packing: str) -> None:
    """Fall back step by step until fedit's loss equals ``reference`` (the model's own); see the module doc."""
    model, seqs = loaded.model, dummy(loaded.model.config)
    was_training = model.training
    model.eval()  # no dropout in either forward
    try:
        got = fedit_losses(loaded, seqs)
        if not _agree(got, reference, loaded.dtype) and model.config._attn_implementation != own_attention:
            log.warning("fedit's CPU attention gives %s where the model gives %s; using the model's own attention "
                        "(%s) and padded micro-batches", got.tolist(), reference.tolist(), own_attention)
            model.set_attn_implementation(own_attention)
            loaded.packed = packing == "packed"
            got = fedit_losses(loaded, seqs)
        if not _agree(got, reference, loaded.dtype):
            log.warning("fedit's loss gives %s where the model's own gives %s; computing the loss from the model's "
                        "full forward (all its logits)", got.tolist(), reference.tolist())
            loaded.own_logits = True
            got = fedit_losses(loaded, seqs)
        if not _agree(got, reference, loaded.dtype):
            raise FeditError(f"fedit cannot reproduce this model's own loss ({got.tolist()} vs {reference.tolist()} "
                             f"on the same tokens, model.packing = {packing!r}); try model.packing = \"padded\"")
    finally:
        model.train(was_training)
