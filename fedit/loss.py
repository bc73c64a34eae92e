"""Next-token cross-entropy on the labelled tokens only; shared by training and evaluation.

Same loss as transformers' ForCausalLMLoss (shift by one, ignore -100, fp32
cross-entropy), but the LM head runs only at labelled positions: with the
prompt masked that skips roughly half of the biggest matmul and its
vocabulary-sized activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedit.data.batches import IGNORE


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of every labelled token, the row each token belongs to)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Batches are right-padded, so under the causal mask no real token can see a pad: the
    # padding mask changes nothing the loss reads, and without it attention takes the
    # fused causal kernel (its backward was a fifth of a training step with the mask).
    hidden = base.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="none"), keep.nonzero()[:, 0]
