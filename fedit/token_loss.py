"""Next-token cross-entropy on the labelled tokens only; shared by training and evaluation.

Same loss as the model's own ``model(input_ids, labels=...)`` (shift by one, ignore -100,
fp32 cross-entropy), but the LM head runs only at labelled positions: with the prompt
masked that skips roughly half of the biggest matmul and its vocabulary-sized activations.
The families that post-process their logits get the same post-processing (``head_logits``);
for any other, fedit/model.py checks at load that this loss equals the model's own and
otherwise asks for ``own_logits``: the model's full forward, whatever it does to its logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedit.data.batches import IGNORE


def head_logits(base, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head and the logit post-processing of the families that have one, in fp32."""
    logits = base.get_output_embeddings()(hidden).float()
    cfg = base.config
    if getattr(cfg, "logits_scaling", None):  # Granite: logits / logits_scaling
        logits = logits / cfg.logits_scaling
    scale = getattr(base, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):  # Cohere: logits * logit_scale
        logits = logits * scale
    if getattr(cfg, "final_logit_softcapping", None):  # Gemma 2 and 3: cap * tanh(logits / cap)
        cap = cfg.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def token_losses(model, batch: dict[str, torch.Tensor], own_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of every labelled token, the example each token belongs to), for a padded or packed batch."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {}
    if "cu_seq_lens" in batch:  # packed (batches.pack): attention reads the example boundaries
        cu = batch["cu_seq_lens"]
        kwargs = {"position_ids": batch["position_ids"], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    keep = batch["targets"] != IGNORE
    # Padded batches are right-padded, so under the causal mask no real token can see a pad:
    # the padding mask changes nothing the loss reads, and without it attention takes the
    # fused causal kernel (its backward was a fifth of a training step with the mask).
    # use_cache=False: with a KV cache transformers would not read packed position ids as example boundaries.
    if own_logits:
        logits = base(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[keep].float()
    else:
        hidden = base.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
        logits = head_logits(base, hidden[keep])
    return F.cross_entropy(logits, batch["targets"][keep], reduction="none"), batch["rows"][keep]
