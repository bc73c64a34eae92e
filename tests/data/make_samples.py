"""How tests/data's samples were drawn (run once by hand; the tests read only the files it wrote).

    python tests/data/make_samples.py DOLLY_JSONL VICUNA_QUESTIONS_JSONL

DOLLY_JSONL: databricks-dolly-15k as JSON lines (the hub's ``databricks/databricks-dolly-15k``);
VICUNA_QUESTIONS_JSONL: FastChat's ``fastchat/llm_judge/data/vicuna_bench/question.jsonl``. Both are
given by path: nothing outside the repository is read by default.

- dolly-sample.jsonl: from databricks-dolly-15k (first release), per category in sorted order:
  the category's records in file order, shuffled with random.Random(f"fedit-{category}"), then the
  first PER_CATEGORY of them whose JSON line is at most MAX_CHARS characters (short records keep the
  sample at tens of KB and whole under the tests' 256-token cutoff). Records are copied unchanged.
- vicuna-questions-sample.jsonl: from the Vicuna-80 questions, the odd question_ids (1, 3, ..., 79),
  40 questions in file order, unchanged.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

PER_CATEGORY = 10
MAX_CHARS = 1200
HERE = Path(__file__).resolve().parent


def dolly(src: Path) -> list[str]:
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_cat: dict[str, list[str]] = {}
    for line in lines:
        by_cat.setdefault(json.loads(line)["category"], []).append(line)
    out = []
    for cat in sorted(by_cat):
        rows = list(by_cat[cat])
        random.Random(f"fedit-{cat}").shuffle(rows)
        out += [r for r in rows if len(r) <= MAX_CHARS][:PER_CATEGORY]
    return out


def vicuna(src: Path) -> list[str]:
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines if json.loads(line)["question_id"] % 2 == 1]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/data/make_samples.py DOLLY_JSONL VICUNA_QUESTIONS_JSONL")
    dolly_file, vicuna_file = map(Path, sys.argv[1:])
    for name, rows in (("dolly-sample.jsonl", dolly(dolly_file)), ("vicuna-questions-sample.jsonl", vicuna(vicuna_file))):
        (HERE / name).write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} rows")
