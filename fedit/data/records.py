"""Load and validate instruction records and conversations from JSON, JSONL or a hub dataset.

Every row becomes a :class:`Record`. Instruction rows keep the Dolly fields (instruction,
context, response, category); the Dolly and Alpaca schemas are recognised without options,
other names go through a field mapping such as ``{"instruction": "prompt", "response": "answer"}``.
Conversations are recognised by their list of turns, in the two formats people have:
OpenAI-style ``messages`` (``role``: system / user / assistant, ``content``) and ShareGPT-style
``conversations`` (``from``: system / human / gpt, ``value``). A conversation is an optional
system turn, then user and assistant turns alternating, with at least one assistant turn; an
unanswered last user turn is dropped (nothing to learn from it). Rows that cannot be used are
skipped and reported with their line number and reason, never silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from fedit.checkpoint import atomic_write
from fedit.errors import FeditError

FIELDS = ("instruction", "context", "response", "category")
# Each schema maps our field names to the source's. The first schema whose
# required names (instruction + response) appear in a row is used for it.
SCHEMAS: dict[str, dict[str, str]] = {
    "dolly": {"instruction": "instruction", "context": "context", "response": "response", "category": "category"},
    "alpaca": {"instruction": "instruction", "context": "input", "response": "output", "category": "category"},
}
UNCATEGORIZED = "uncategorized"
# Conversation formats: the list's key, and each turn's role and text keys.
TURNS = {"messages": ("role", "content"), "conversations": ("from", "value")}
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}

Turn = tuple[str, str]  # (role: system / user / assistant, content)


@dataclass(frozen=True)
class Record:
    """An instruction row, or a conversation (``messages``); for a conversation the instruction
    and response are its last user and assistant turns (what evaluation asks and compares)."""
    instruction: str
    context: str
    response: str
    category: str
    messages: tuple[Turn, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()  # fields kept for partitioning (--by, --label), as text

    @property
    def is_conversation(self) -> bool:
        return bool(self.messages)

    def field(self, name: str) -> str | None:
        """A field by name: category or one kept in ``extra``; None when the row had none."""
        if name == "category":
            return self.category
        return dict(self.extra).get(name)

    def to_json(self) -> str:
        if self.messages:
            row: dict = {"messages": [{"role": r, "content": c} for r, c in self.messages], "category": self.category}
        else:
            row = {k: getattr(self, k) for k in FIELDS}
        return json.dumps({**row, **dict(self.extra)}, ensure_ascii=False)


def conversation(instruction: str, context: str, response: str) -> tuple[Turn, ...]:
    """An instruction row as a one-exchange conversation (the chat template's view of it)."""
    return (("user", f"{instruction}\n\n{context}" if context else instruction), ("assistant", response))


@dataclass
class LoadResult:
    records: list[Record]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line or row number, reason)
    source: str = ""

    def skipped_summary(self, limit: int = 10) -> str:
        if not self.skipped:
            return "no rows skipped"
        shown = "; ".join(f"line {n}: {why}" for n, why in self.skipped[:limit])
        more = f" (+{len(self.skipped) - limit} more)" if len(self.skipped) > limit else ""
        return f"{len(self.skipped)} rows skipped: {shown}{more}"


def parse_mapping(text: str | None) -> dict[str, str]:
    """``"instruction=prompt,response=answer"`` -> ``{"instruction": "prompt", "response": "answer"}``."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        ours, _, theirs = part.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if ours not in FIELDS or not theirs:
            raise FeditError(f"field mapping {part!r} must be FIELD=SOURCE_NAME with FIELD one of {', '.join(FIELDS)}, "
                             f"e.g. --fields instruction=prompt,response=answer")
        mapping[ours] = theirs
    return mapping


def _rows_from_file(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or an Exception) for a .json or .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FeditError(f"{path} is not UTF-8 text ({e}); pass a JSON or JSONL file of instruction records") from None
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FeditError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                             f"fix the file or save it as JSONL, one record per line") from None
        if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise FeditError(f"{path} holds a JSON object; expected a list of records (or an object with one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise FeditError(f"{path} must hold a JSON list of records, got {type(data).__name__}")
        # A JSON list has no line per row; number rows from 1 as "line" for the report.
        yield from enumerate(data, start=1)
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")


def _rows_from_hub(dataset_id: str, split: str) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise FeditError("reading a hub dataset needs the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network, unknown id, gated repo: all user-fixable
        raise FeditError(f"could not load hub dataset {dataset_id!r} (split {split!r}): {type(e).__name__}: {e}. "
                         f"Check the id and your network, or download it and pass the JSON/JSONL path") from None
    yield from enumerate(ds, start=1)


def _a(word: str) -> str:
    return f"an {word}" if word == "assistant" else f"a {word}"  # a system, a user


def _turns(row: dict, key: str) -> tuple[Turn, ...] | str:
    """A conversation's turns checked and normalised, or the reason it cannot be used."""
    role_key, text_key = TURNS[key]
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        return f"{key!r} is not a non-empty list of turns"
    out: list[Turn] = []
    for n, t in enumerate(turns, start=1):
        if not isinstance(t, dict):
            return f"turn {n} is not a JSON object"
        role = t.get(role_key)
        if role not in ROLES:
            expected = "system, human or gpt" if key == "conversations" else "system, user or assistant"
            return f"turn {n}: unknown {role_key} {role!r} (expected {expected})"
        content = t.get(text_key)
        if not isinstance(content, str) or not content.strip():
            return f"turn {n}: {'no' if content is None else 'empty' if isinstance(content, str) else 'non-text'} {text_key}"
        out.append((ROLES[role], content.strip()))
    first = 1 if out[0][0] == "system" else 0
    for n, (role, _) in enumerate(out[first:], start=first + 1):
        expected = "user" if (n - first) % 2 else "assistant"
        if role != expected:
            where = "after the first turn" if role == "system" else f"where {_a(expected)} turn belongs"
            return f"turn {n}: {_a(role)} turn {where} (turns go: system (optional), then user and assistant alternating)"
    if out[-1][0] == "user":
        out.pop()  # an unanswered last question: nothing to learn from it
    if not out or out[-1][0] != "assistant":
        return "no assistant turn"
    return tuple(out)


def _to_record(row: Any, mapping: dict[str, str], keep: tuple[str, ...] = ()) -> Record | str:
    """A Record, or the reason the row cannot be used."""
    if isinstance(row, Exception):
        return str(row)
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    extra = []
    for name in keep:  # --by / --label fields: text, numbers or booleans, kept as text
        v = row.get(name)
        if isinstance(v, (str, int, float, bool)) and str(v).strip():
            extra.append((name, str(v).strip()))
    key = next((k for k in TURNS if k in row), None) if not mapping else None
    if key is not None:
        turns = _turns(row, key)
        if isinstance(turns, str):
            return turns
        category = row.get("category")
        category = category.strip() if isinstance(category, str) and category.strip() else UNCATEGORIZED
        last_user = next((c for r, c in reversed(turns) if r == "user"))
        return Record(last_user, "", turns[-1][1], category, turns, tuple(extra))
    names = mapping or next((s for s in SCHEMAS.values() if s["instruction"] in row and s["response"] in row), None)
    if names is None:
        keys = ", ".join(sorted(map(str, row))[:8])
        return (f"no instruction/response fields (has: {keys}); "
                f"use --fields instruction=NAME,response=NAME to map them")
    names = {**SCHEMAS["dolly"], **names}
    values = {}
    for ours in FIELDS:
        v = row.get(names[ours])
        if v is None:
            v = ""
        if not isinstance(v, str):
            return f"field {names[ours]!r} is {type(v).__name__}, expected text"
        values[ours] = v.strip()
    for required in ("instruction", "response"):
        if not values[required]:
            missing = "missing" if row.get(names[required]) is None else "empty"
            return f"{missing} {required} (field {names[required]!r})"
    values["category"] = values["category"] or UNCATEGORIZED
    return Record(**values, extra=tuple(extra))


def load_records(source: str | Path, mapping: dict[str, str] | None = None, split: str = "train",
                 keep: tuple[str, ...] = ()) -> LoadResult:
    """Read records from a file path or hub id; skip and report unusable rows; fail if none is usable.
    ``keep``: other fields to carry on each record (``Record.extra``), e.g. the one clients are formed by."""
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise FeditError(f"{path} is a directory; pass a .json or .jsonl file of instruction records")
        rows: Iterable[tuple[int, Any]] = _rows_from_file(path)
    elif str(source).endswith((".json", ".jsonl")) or str(source).startswith((".", "/", "~")):
        raise FeditError(f"data file {source} does not exist; check the path")
    elif str(source).count("/") == 1:
        rows = _rows_from_hub(str(source), split)
    else:
        raise FeditError(f"{source!r} is neither an existing file nor a hub dataset id like 'databricks/databricks-dolly-15k'")
    result = LoadResult(records=[], source=str(source))
    for n, row in rows:
        rec = _to_record(row, mapping or {}, keep)
        if isinstance(rec, Record):
            result.records.append(rec)
        else:
            result.skipped.append((n, rec))
    if not result.records:
        raise FeditError(f"{source} has no usable records ({result.skipped_summary(3)}); each record needs a "
                         f"non-empty instruction and response, or a conversation with an assistant turn")
    return result


def write_jsonl(path: Path, records: Iterable[Record]) -> None:
    atomic_write(path, "".join(r.to_json() + "\n" for r in records))
