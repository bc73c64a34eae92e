"""Question sets for evaluation: Dolly-style test files (with reference answers) and the
Vicuna-80 questions (no references), with the paper's seeded random subset of 20."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from fedit.data.records import Record, Turn, load_records
from fedit.errors import FeditError


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    instruction: str
    context: str = ""
    reference: str | None = None  # the test record's response; None for Vicuna questions
    history: tuple[Turn, ...] = ()  # a conversation's turns before the instruction (its last user turn)

    @property
    def text(self) -> str:
        """The question as a judge reads it: the conversation so far, the instruction, then its context if any."""
        asked = f"{self.instruction}\n\n{self.context}" if self.context else self.instruction
        if not self.history:
            return asked
        return "".join(f"{role}: {content}\n\n" for role, content in self.history) + f"user: {asked}"

    @classmethod
    def from_record(cls, i: int, r: Record, reference: str | None = None) -> "Question":
        """Record ``r`` asked as question ``i``: its (last) question after the turns before it."""
        return cls(id=str(i), category=r.category, instruction=r.instruction, context=r.context,
                   reference=reference, history=r.messages[:-2])

    def record(self) -> Record:
        if self.history:
            turns = (*self.history, ("user", self.instruction), ("assistant", self.reference or ""))
            return Record(self.instruction, "", self.reference or "", self.category, turns)
        return Record(self.instruction, self.context, self.reference or "", self.category)


@dataclass
class QuestionSet:
    questions: list[Question]
    kind: str  # "records" (has references) or "vicuna"
    source: str
    total: int  # questions in the file before any subset
    skipped: list[tuple[int, str]]

    @property
    def has_references(self) -> bool:
        return self.kind == "records"


def _first_row(path: Path) -> object:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


def is_vicuna_file(path: Path) -> bool:
    row = _first_row(path)
    return isinstance(row, dict) and "turns" in row and "question_id" in row


def load_vicuna(path: Path, limit: int = 0, seed: int = 42) -> QuestionSet:
    """Vicuna/MT-Bench question files: one {"question_id", "category", "turns"} per line; the first turn is asked.

    ``limit`` > 0 keeps a seeded random subset of that many questions, in file order
    (the paper: 20 of the 80 Vicuna questions).
    """
    questions, skipped = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            text = turns[0] if isinstance(turns, list) else turns
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty first turn")
            questions.append(Question(id=str(row["question_id"]), category=str(row.get("category") or "uncategorized"),
                                      instruction=text.strip()))
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
            skipped.append((n, f"{type(e).__name__}: {e}"))
    if not questions:
        raise FeditError(f"{path} has no usable questions; expected JSON lines with question_id and turns")
    total = len(questions)
    if limit and limit < total:
        keep = sorted(random.Random(seed).sample(range(total), limit))
        questions = [questions[i] for i in keep]
    return QuestionSet(questions, "vicuna", str(path), total, skipped)


def load_questions(path: str | Path, limit: int = 0, seed: int = 42) -> QuestionSet:
    """A test file of instruction records or conversations (JSON/JSONL; a conversation asks its last
    user turn after the turns before it, its last answer the reference) or a Vicuna question file."""
    p = Path(path)
    if not p.is_file():
        raise FeditError(f"test file {path} does not exist; pass --data with a JSONL file of test records "
                         f"(e.g. the test.jsonl that `fedit partition` wrote) or of Vicuna questions")
    if is_vicuna_file(p):
        return load_vicuna(p, limit, seed)
    loaded = load_records(p)
    qs = [Question.from_record(i, r, r.response) for i, r in enumerate(loaded.records)]
    return QuestionSet(qs, "records", str(p), len(qs), loaded.skipped)
