"""Local-training throughput: the naive loop vs fedit's client loop vs the machine's limit.

All three see the same Dolly examples (same tokenization, cutoff and masking) and
count the same thing: real (non-padding) input tokens per second of training.

- naive: what the paper's repository does per client, adapted to run here: a new
  transformers Trainer per client, fp32 weights, micro-batches padded to their
  longest example (DataCollatorForSeq2Seq), the adapter saved with torch.save and
  loaded back from disk for aggregation.
- fedit: ``fedit.client.train`` with the automatic dtype (bf16 autocast on this CPU),
  micro-batches packed without padding where fedit's CPU attention is chosen (else
  sorted by length and padded), the LM head only on labelled tokens.
- limit: the measured bf16 and fp32 matmul peak; fedit's model FLOPs utilization (MFU)
  against the bf16 peak.

Shared virtual machines slow a process down in bursts (we saw one step of a fixed-shape loop take
3 s, then 27 s, with the machine otherwise idle). Noise only ever adds time, so naive and fedit
run ``repeats`` times, alternating, and each side reports its best repetition (as timeit does);
every repetition is kept in the JSON.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import torch


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of the best of ``repeats`` n x n matmuls (what the hardware can do at best)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def train_flops(model_config, input_tokens: int, labelled_tokens: int) -> float:
    """Model FLOPs of LoRA training: forward + activation gradients (frozen weights get no
    weight gradients), i.e. 4 x params x tokens for the decoder, the attention scores, and the
    LM head at labelled positions only (the tokens the loss reads). LoRA's own matmuls (<1%)
    are left out, which makes the MFU a slight underestimate."""
    c = model_config
    d, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
    head_dim = getattr(c, "head_dim", d // heads)
    per_layer = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * c.intermediate_size
    return 4 * per_layer * layers * input_tokens + 4 * vocab * d * labelled_tokens


def examples(tokenizer, n: int, cutoff: int, seed: int = 0, data: str | Path | None = None):
    """``n`` Dolly examples drawn with ``seed`` from ``data`` (default: the development copy at DOLLY)."""
    import numpy as np

    from fedit.data.batches import tokenize
    from fedit.data.records import load_records

    records = load_records(data or DOLLY).records
    pick = np.random.default_rng(seed).choice(len(records), size=n, replace=False)
    return tokenize([records[i] for i in pick], tokenizer, cutoff)


DOLLY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dolly" / "dolly-15k.jsonl"


def naive_clients(model_name: str, client_examples: list, batch_size: int, micro: int, lr: float,
                  lora_cfg) -> dict:
    """The paper repo's way on this CPU: a new Trainer per client, fp32, pad to longest, torch.save adapters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedit.weights import resolve_source

    source = resolve_source(model_name)
    tok = AutoTokenizer.from_pretrained(source)
    tok.pad_token = tok.pad_token or tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    result = naive_loop(base, tok, client_examples, batch_size, micro, lr, lora_cfg)
    del base
    gc.collect()
    return result


def naive_loop(base, tok, client_examples: list, batch_size: int, micro: int, lr: float, lora_cfg, *,
               bf16: bool = False, checkpointing: bool = False, warmup: bool = False) -> dict:
    """The paper repo's client loop around ``base`` (on its device): LoRA through get_peft_model, a new
    transformers Trainer per client, micro-batches padded to their longest (DataCollatorForSeq2Seq),
    each client's adapter written with torch.save and read back for aggregation. ``bf16``: Trainer's
    bf16 autocast (on a GPU; the paper's fp16 AMP on an 8-bit base needs bitsandbytes); ``checkpointing``:
    what the paper repo's prepare_model_for_int8_training turns on. ``warmup``: one untimed micro-batch
    first (CUDA's first calls). ``base`` comes back without LoRA layers, reusable."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    on_cpu = base.device.type == "cpu"
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    global_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    tokens = train_seconds = 0.0

    def trainer_for(exs, out_dir, seed, steps_of: int):
        # A plain list is a dataset to Trainer: no dependency on the datasets package (absent on the GPU machine).
        ds = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in exs]
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=micro,
                                 gradient_accumulation_steps=steps_of, num_train_epochs=1,
                                 learning_rate=lr, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=on_cpu, bf16=bf16, gradient_checkpointing=checkpointing,
                                 gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
                                 dataloader_num_workers=0, disable_tqdm=True, seed=seed)
        return Trainer(model=model, args=args, train_dataset=ds,
                       data_collator=DataCollatorForSeq2Seq(tok, padding="longest", return_tensors="pt"))

    with tempfile.TemporaryDirectory() as tmp:
        if warmup:
            trainer_for(client_examples[0][:micro], f"{tmp}/warmup", 0, 1).train()
            set_peft_model_state_dict(model, global_state)
        paths = []
        for c, exs in enumerate(client_examples):
            set_peft_model_state_dict(model, global_state)
            trainer = trainer_for(exs, f"{tmp}/c{c}", c, max(1, batch_size // micro))
            _sync(base)
            t = time.perf_counter()
            trainer.train()
            _sync(base)
            train_seconds += time.perf_counter() - t
            tokens += sum(len(e.input_ids) for e in exs)
            path = f"{tmp}/client{c}.bin"
            torch.save(get_peft_model_state_dict(model), path)
            paths.append((path, len(exs)))
            del trainer
            gc.collect()
        t = time.perf_counter()
        total = sum(n for _, n in paths)
        agg = None
        for path, n in paths:  # reloaded from disk for aggregation, as the paper repo does
            sd = torch.load(path)
            agg = {k: v * n / total for k, v in sd.items()} if agg is None else {k: agg[k] + v * n / total
                                                                                 for k, v in sd.items()}
        aggregate_seconds = time.perf_counter() - t
    if checkpointing:
        from fedit.model import set_checkpointing

        set_checkpointing(base, False)
    model.unload()  # the LoRA layers out again: ``base`` is as it came
    gc.collect()
    return {"tokens": tokens, "train_seconds": train_seconds, "tokens_per_s": tokens / train_seconds,
            "aggregate_seconds": aggregate_seconds}


def _sync(model) -> None:
    """Wait for the GPU's queued work, so wall-clock intervals hold all of it (a no-op on CPU)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def fedit_clients(loaded, client_examples: list, batch_size: int, micro: int, lr: float,
                  micro_tokens: int | None = None) -> dict:
    """``micro_tokens``: train.micro_batch_tokens (None: fedit's default)."""
    from fedit import client
    from fedit.config import TrainConfig
    from fedit.protocol import GLOBAL, FitIns

    bound = {} if micro_tokens is None else {"micro_batch_tokens": micro_tokens}
    cfg = TrainConfig(lr=lr, batch_size=batch_size, micro_batch_size=micro, local_epochs=1.0, **bound)
    tokens = seconds = 0.0
    labelled = 0
    # Warm-up on a few examples: first-call costs (oneDNN kernels) are not training throughput.
    client.train(loaded, FitIns(0, 0, {GLOBAL: loaded.initial_adapter}), client_examples[0][:micro], TrainConfig(
        lr=lr, batch_size=micro, micro_batch_size=micro, **bound), seed=0)
    for c, exs in enumerate(client_examples):
        t = time.perf_counter()
        client.train(loaded, FitIns(1, c, {GLOBAL: loaded.initial_adapter}), exs, cfg, seed=c)
        seconds += time.perf_counter() - t
        tokens += sum(len(e.input_ids) for e in exs)
        labelled += sum(e.trained_tokens for e in exs)
    return {"tokens": tokens, "labelled_tokens": labelled, "train_seconds": seconds, "tokens_per_s": tokens / seconds}


def run(model_name: str, n_clients: int = 2, per_client: int = 32, cutoff: int = 512, batch_size: int = 32,
        micro: int = 8, lr: float = 1.5e-4, skip_naive: bool = False, repeats: int = 2,
        data: str | Path | None = None) -> dict:
    """``data``: the Dolly JSONL the examples come from (default DOLLY, ../shared/data)."""
    from fedit.config import LoraConfig, ModelConfig
    from fedit.model import attach_lora, load_base

    lora = LoraConfig()
    loaded = load_base(ModelConfig(name=model_name))
    attach_lora(loaded, lora, seed=0)
    exs = examples(loaded.tokenizer, n_clients * per_client, cutoff, data=data)
    clients = [exs[i * per_client:(i + 1) * per_client] for i in range(n_clients)]
    padded = sum(max(len(e.input_ids) for e in c[i:i + micro]) * len(c[i:i + micro])
                 for c in clients for i in range(0, len(c), micro))
    fedit_runs, padded_runs, naive_runs = [], [], []
    packed = loaded.packed
    for _ in range(repeats):
        fedit_runs.append(fedit_clients(loaded, clients, batch_size, micro, lr))
        # This VM's speed drifts by up to 3x over minutes (matmul peaks of 0.45-1.9 TFLOP/s on
        # one day), so each repetition's MFU is against a peak measured right after it.
        fedit_runs[-1]["peak_bf16"] = matmul_peak(torch.bfloat16)
        if packed:  # the same loop with length-sorted, padded micro-batches: what packing adds
            loaded.packed = False
            padded_runs.append(fedit_clients(loaded, clients, batch_size, micro, lr))
            loaded.packed = True
        if not skip_naive:
            naive_runs.append(naive_clients(model_name, clients, batch_size, micro, lr, lora))
    best = max(fedit_runs, key=lambda r: r["tokens_per_s"])
    result = {"workload": {"clients": n_clients, "examples_per_client": per_client, "cutoff": cutoff,
                           "batch_size": batch_size, "micro_batch_size": micro, "repeats": repeats,
                           "real_tokens": sum(len(e.input_ids) for e in exs),
                           "padded_tokens_naive": padded},
              "fedit": dict(best, all_tokens_per_s=[r["tokens_per_s"] for r in fedit_runs]),
              "fedit_dtype": str(loaded.dtype).replace("torch.", ""),
              "attention": loaded.model.config._attn_implementation, "packed": loaded.packed}
    f = result["fedit"]
    flops = train_flops(loaded.model.get_base_model().config, f["tokens"], f["labelled_tokens"])
    del loaded
    gc.collect()
    result["peak_flops"] = {"bf16": f["peak_bf16"], "bf16_all": [r["peak_bf16"] for r in fedit_runs],
                            "fp32": matmul_peak(torch.float32)}
    f["model_flops"] = flops
    f["mfu_bf16"] = flops / f["train_seconds"] / f["peak_bf16"]
    f["all_mfu_bf16"] = [flops / r["train_seconds"] / r["peak_bf16"] for r in fedit_runs]
    if padded_runs:
        result["fedit_padded"] = dict(max(padded_runs, key=lambda r: r["tokens_per_s"]),
                                      all_tokens_per_s=[r["tokens_per_s"] for r in padded_runs])
        result["packing_speedup"] = f["tokens_per_s"] / result["fedit_padded"]["tokens_per_s"]
    if naive_runs:
        result["naive"] = dict(max(naive_runs, key=lambda r: r["tokens_per_s"]),
                               all_tokens_per_s=[r["tokens_per_s"] for r in naive_runs])
        result["speedup"] = f["tokens_per_s"] / result["naive"]["tokens_per_s"]
    return result
