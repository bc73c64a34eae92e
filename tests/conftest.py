"""Shared fixtures: a tiny random Llama with its own tokenizer, small record sets, partitions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real records for the few tests that need them: small samples kept in the repository (sources,
# licenses and how they were drawn: tests/data/README.md), so the suite passes on any clone.
DATA = ROOT / "tests" / "data"
DOLLY = DATA / "dolly-sample.jsonl"  # 10 records per Dolly category, 80 in all
VICUNA = DATA / "vicuna-questions-sample.jsonl"  # the 40 odd-numbered Vicuna-80 questions

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CATEGORIES = ["brainstorming", "classification", "closed_qa", "open_qa"]


def make_records(n_per_cat: int = 12) -> list[dict]:
    """Deterministic Dolly-shaped records with category-specific wording."""
    rows = []
    for c, cat in enumerate(CATEGORIES):
        for i in range(n_per_cat):
            rows.append({
                "instruction": f"Question {i} about {cat}: what is {i} plus {c}?",
                "context": f"Some context for {cat} number {i}." if i % 2 else "",
                "response": f"The answer for {cat} is {i + c}. " * (1 + i % 3),
                "category": cat,
            })
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_model(d: Path) -> Path:
    """A 2-layer, hidden-64 Llama with random weights and a byte-level BPE tokenizer trained on
    the test records: everything from_pretrained needs, made offline in about a second (also the
    model of scripts/experiments.py --smoke)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [" ".join(r.values()) for r in make_records()]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts + ["### Instruction: ### Input: ### Response: Below is an instruction"],
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture()
def records_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "records.jsonl", make_records())


@pytest.fixture()
def partition_dir(tmp_path, records_file) -> Path:
    """3 IID clients over the synthetic records, 2 test records per category."""
    from fedit.data import partition
    from fedit.data.records import load_records

    loaded = load_records(records_file)
    sp = partition.split(loaded.records, 3, "iid", seed=1, test_per_category=2)
    out = tmp_path / "parts"
    partition.write(out, loaded, sp, scheme="iid", seed=1, alpha=0.5, test_per_category=2)
    return out


def tiny_config(model_dir: Path, clients_dir: Path, out: Path, **sections):
    """A Config for the tiny model: fp32 so fixed expected losses do not depend on bf16 kernels."""
    from fedit import config

    base = {
        "data": {"clients_dir": str(clients_dir)},
        "model": {"name": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "train": {"lr": 1e-2, "batch_size": 4, "micro_batch_size": 2, "cutoff_len": 256},
        "federation": {"rounds": 2, "clients_per_round": 2, "seed": 7},
        "eval": {"batch_size": 4},
        "run": {"out": str(out), "progress": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config.from_dict(base)
