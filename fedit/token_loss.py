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
    """(loss of every labelled token, the example each token belongs to), for a padded or packed batch."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {}
    if "cu_seq_lens" in batch:  # packed (batches.pack): attention reads the example boundaries
        cu = batch["cu_seq_lens"]
        kwargs = {"position_ids": batch["position_ids"], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    # Padded batches are right-padded, so under the causal mask no real token can see a pad:
    # the padding mask changes nothing the loss reads, and without it attention takes the
    # fused causal kernel (its backward was a fifth of a training step with the mask).
    # use_cache=False: with a KV cache transformers would not read packed position ids as example boundaries.
    hidden = base.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
    keep = batch["targets"] != IGNORE
    logits = base.get_output_embeddings()(hidden[keep]).float()
    return F.cross_entropy(logits, batch["targets"][keep], reduction="none"), batch["rows"][keep]
