"""The suite's real records are the samples kept in tests/data, with their licenses; nothing in tests/
points outside the repository (a user's clone has no development data beside it)."""

import json
import re

from conftest import DATA, DOLLY, ROOT, VICUNA


def test_no_test_file_names_data_outside_the_repository():
    outside = re.compile(r"\.\./shared|shared/data|parents\[[2-9]\]")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "tests").rglob("*")
            if p.is_file() and p.suffix in (".py", ".md", ".toml", ".cfg", ".ini", ".sh") and p.name != "test_samples.py"
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not hits, hits


def test_the_samples_are_as_their_readme_says_and_carry_their_licenses():
    dolly = [json.loads(line) for line in DOLLY.read_text(encoding="utf-8").splitlines()]
    per_category = {}
    for r in dolly:
        per_category[r["category"]] = per_category.get(r["category"], 0) + 1
    assert len(dolly) == 80 and len(per_category) == 8 and set(per_category.values()) == {10}
    assert all(set(r) == {"instruction", "context", "response", "category"} for r in dolly)
    ids = [json.loads(line)["question_id"] for line in VICUNA.read_text(encoding="utf-8").splitlines()]
    assert ids == list(range(1, 80, 2))
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in readme and "Apache License 2.0" in readme
    assert DOLLY.stat().st_size + VICUNA.stat().st_size < 100_000  # samples, not the data sets
