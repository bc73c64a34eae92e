"""The attack table of docs/robustness.md: 2 of 10 clients attack, for each attack and aggregator the
distance of the aggregate from the honest clients' mean, relative to that mean's norm.

    python -m benchmarks.attacks          # about a minute on 2 CPU cores; prints a markdown table

It runs the same experiment as tests/test_robust.py (whose assertions are: > 1 for the plain mean,
<= 1 for every defence) on the same tiny random model, and prints the numbers behind the pass/fail.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Factory:
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        p = Path(tempfile.mkdtemp(prefix=name, dir=self.root))
        return p


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: E402  (the tiny model and records of the tests)
    import test_robust as t  # noqa: E402

    with tempfile.TemporaryDirectory() as tmp:
        factory = _Factory(Path(tmp))
        model = conftest.tiny_model_dir.__wrapped__(factory)
        setup = t.ten_clients.__wrapped__(factory, model)
        names = ["mean", *t.DEFENCES, "norm_bound"]
        print("| attack (2 of 10 clients) | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for kind, factor in t.ATTACKS.items():
            d = t.attack_distances(setup, kind, factor)
            print(f"| {kind} x{factor:g} | " + " | ".join(f"{d[n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
