"""Build a multi-turn, per-user conversation set from Dolly-15k (no public one ships with fedit).

How, exactly (seeded by --seed):
- each of --users users gets a favourite Dolly category (user u: the u-th category in sorted
  order, cycling) and asks about it with probability --favourite, about a uniformly drawn
  other category otherwise: users differ the way real users do, by what they ask about;
- each user holds --per-user conversations; each conversation has 2 to 4 exchanges (uniform);
  each exchange is one Dolly record not used before: the user turn is its instruction, then a
  blank line and its context when it has one; the assistant turn is its response;
- the conversation's category is its last exchange's (what evaluation asks and scores);
- records run out: a category that has none left is drawn from the others.

Writes JSONL: {"messages": [...], "user": "u007", "category": ...} per line.

    python scripts/dolly_conversations.py --data dolly-15k.jsonl --out chats.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path


def build(rows: list[dict], users: int, per_user: int, favourite: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pools: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("instruction", "").strip() and r.get("response", "").strip():
            pools[r.get("category") or "uncategorized"].append(r)
    for pool in pools.values():
        rng.shuffle(pool)
    cats = sorted(pools)
    out = []
    for u in range(users):
        fav = cats[u % len(cats)]
        for _ in range(per_user):
            messages, cat = [], fav
            for _ in range(rng.randint(2, 4)):
                want = fav if rng.random() < favourite else rng.choice([c for c in cats if c != fav])
                left = [c for c in cats if pools[c]]
                if not left:
                    raise SystemExit("Dolly ran out of records; ask for fewer users or conversations")
                cat = want if pools[want] else rng.choice(left)
                r = pools[cat].pop()
                ctx = (r.get("context") or "").strip()
                question = r["instruction"].strip() + (f"\n\n{ctx}" if ctx else "")
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": r["response"].strip()}]
            out.append({"messages": messages, "user": f"u{u:03d}", "category": cat})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Dolly-15k JSONL")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--per-user", type=int, default=12)
    p.add_argument("--favourite", type=float, default=0.7, help="probability of asking about the favourite category")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    rows = [json.loads(line) for line in Path(a.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    convs = build(rows, a.users, a.per_user, a.favourite, a.seed)
    Path(a.out).write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    print(f"wrote {len(convs)} conversations of {a.users} users "
          f"({sum(len(c['messages']) // 2 for c in convs)} exchanges) to {a.out}")


if __name__ == "__main__":
    main()
