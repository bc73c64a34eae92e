"""The paper's LLM-judge protocol against any OpenAI-compatible chat-completions server.

For every question the judge sees the two answers of a pair and scores each
from 1 to 10; it is asked ``samples`` times (the paper: 3) in each of the two
orders (candidate first, then baseline first) so that position bias cancels.
A question's score for a model is the mean of its valid scores over both
orders; relative score = candidate total / baseline total over the questions
scored in both orders.

Nothing is dropped silently: every reply is kept in the result, replies that
cannot be parsed are counted and listed (they are not scored as zero), calls
that still fail after the retries are counted, and a question without a valid
score in both orders is listed as unscored and left out of both totals.

Only the standard library talks to the server (urllib): no new dependency.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from fedit.config import JudgeConfig
from fedit.errors import FeditError
from fedit.evaluation.questions import Question

# The pairwise reviewer prompt of Vicuna's GPT-4 evaluation (lm-sys/FastChat,
# fastchat/eval/table/prompt.jsonl, the "general" reviewer, with the system
# message of fastchat/eval/eval_gpt_review.py). The FedIT paper's GPT-4
# scoring follows this Vicuna protocol: two answers, a score of 1-10 each.
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
PAIR_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\n{prompt}\n\n"
)
REVIEW_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their "
    "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\nPlease first output a single line containing only two values indicating the "
    "scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent "
    "line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
    "ensuring that the order in which the responses were presented does not affect your judgment."
)

_NUM = r"(\d+(?:\.\d+)?)"
_PAIR_LINE = re.compile(rf"^\s*\**\s*{_NUM}\s*(?:/\s*10)?\s*[,;\s]\s*{_NUM}\s*(?:/\s*10)?\s*\**\s*$")
_LABELLED = {i: re.compile(rf"(?:score\s+(?:of|for)\s+(?:the\s+)?)?assistant\s*{i}\s*(?:'s)?\s*(?:score)?\s*[:=]\s*"
                           rf"\**\s*{_NUM}", re.IGNORECASE) for i in (1, 2)}


def parse_scores(text: str) -> tuple[float, float] | None:
    """(score of assistant 1, score of assistant 2) from a review, or None if it holds no valid pair.

    Accepted: Vicuna's format, a first non-empty line of two numbers ("8 6", "8, 6",
    "8/10 6/10"), or labelled scores anywhere ("Assistant 1: 8" ... "Assistant 2: 6",
    "Score of the Assistant 2: 6"). Scores outside 1-10 are not a valid pair.
    """
    if not isinstance(text, str):
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    pair = None
    if lines:
        m = _PAIR_LINE.match(lines[0])
        if m:
            pair = (float(m.group(1)), float(m.group(2)))
    if pair is None:
        found = [_LABELLED[i].search(text) for i in (1, 2)]
        if all(found):
            pair = (float(found[0].group(1)), float(found[1].group(1)))
    if pair is None or not all(1.0 <= s <= 10.0 for s in pair):
        return None
    return pair


def build_messages(question: str, answer_1: str, answer_2: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": PAIR_TEMPLATE.format(question=question, answer_1=answer_1,
                                                             answer_2=answer_2, prompt=REVIEW_PROMPT)}]


class CallFailed(Exception):
    """One judge call that still failed after every retry."""


class JudgeClient:
    """POST {url}/chat/completions with retries and exponential backoff; counts what happened."""

    def __init__(self, cfg: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        if not cfg.url:
            raise FeditError("no judge configured: set judge.url (an OpenAI-compatible server, e.g. "
                             "https://api.openai.com/v1) and judge.model")
        if not cfg.url.startswith(("http://", "https://")):
            raise FeditError(f"judge.url = {cfg.url!r} must start with http:// or https://")
        if not cfg.model:
            raise FeditError("judge.model is empty; set it to the judge's model name, e.g. judge.model=gpt-4")
        base = cfg.url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.cfg = cfg
        self.key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.sleep = sleep
        self.counts: Counter = Counter()  # requests, replies, retries, timeouts, network_errors, http_<code>, malformed, failed
        self.ever_answered = False

    def _post(self, payload: bytes) -> str:
        """One HTTP request -> the reply's message content; raises _Retryable or FeditError."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.endpoint, data=payload, headers=headers, method="POST")
        self.counts["requests"] += 1
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            self.counts[f"http_{e.code}"] += 1
            if e.code in (408, 409, 429) or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}") from None
            detail = e.read()[:300].decode("utf-8", "replace")
            hint = {401: f"check the API key in ${self.cfg.api_key_env}", 403: f"check the API key in ${self.cfg.api_key_env}",
                    404: "check judge.url (the server's /v1 base) and judge.model"}.get(e.code, "check judge.url and judge.model")
            raise FeditError(f"judge at {self.endpoint} answered HTTP {e.code} ({detail.strip()}); {hint}") from None
        except (TimeoutError, socket.timeout):
            self.counts["timeouts"] += 1
            raise _Retryable(f"no reply within judge.timeout = {self.cfg.timeout}s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                self.counts["timeouts"] += 1
                raise _Retryable(f"no reply within judge.timeout = {self.cfg.timeout}s") from None
            self.counts["network_errors"] += 1
            raise _Retryable(f"network error: {e.reason}") from None
        except (ConnectionError, OSError) as e:  # reset or refused mid-read
            self.counts["network_errors"] += 1
            raise _Retryable(f"network error: {e}") from None
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            self.counts["malformed"] += 1
            raise _Retryable(f"reply is not a chat completion ({type(e).__name__}: {e})") from None
        self.counts["replies"] += 1
        self.ever_answered = True
        return content

    def complete(self, messages: list[dict]) -> str:
        payload = json.dumps({"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                              "max_tokens": self.cfg.max_tokens}).encode()
        reason = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.counts["retries"] += 1
                self.sleep(self.cfg.backoff * 2 ** (attempt - 1))
            try:
                return self._post(payload)
            except _Retryable as e:
                reason = str(e)
        self.counts["failed"] += 1
        if not self.ever_answered:
            raise FeditError(f"judge at {self.endpoint} did not answer after {self.cfg.retries + 1} attempt(s) "
                             f"({reason}); check judge.url, that the server is running and reachable, or raise "
                             f"judge.timeout / judge.retries")
        raise CallFailed(reason)


class _Retryable(Exception):
    pass


@dataclass
class _Side:
    scores: list[float] = field(default_factory=list)


def judge_pair(client: JudgeClient, questions: Sequence[Question], candidate: Sequence[str],
               baseline: Sequence[str], *, samples: int, names: tuple[str, str] = ("candidate", "baseline"),
               on_call: Callable[[int, int], None] | None = None) -> dict:
    """Score the candidate's and the baseline's answers to every question; return the full record.

    ``on_call(done, total)`` reports progress. The result holds every review (raw text),
    the counts of what the server did, and the totals and relative score.
    """
    if not (len(questions) == len(candidate) == len(baseline)):
        raise ValueError("questions, candidate and baseline answers differ in length")
    total_calls = len(questions) * 2 * samples
    before = Counter(client.counts)  # a client may serve several pairs: count this pair's calls only
    done = 0
    reviews: list[dict] = []
    per_question: list[dict] = []
    parsed = unparseable = failed = 0
    for q, a_cand, a_base in zip(questions, candidate, baseline):
        orders = {"candidate_first": (a_cand, a_base), "baseline_first": (a_base, a_cand)}
        got: dict[str, dict[str, list[float]]] = {o: {"candidate": [], "baseline": []} for o in orders}
        for order, (ans1, ans2) in orders.items():
            messages = build_messages(q.text, ans1, ans2)
            for s in range(samples):
                review = {"question": q.id, "order": order, "sample": s}
                try:
                    reply = client.complete(messages)
                except CallFailed as e:
                    failed += 1
                    reviews.append({**review, "status": "failed", "reason": str(e)})
                else:
                    pair = parse_scores(reply)
                    if pair is None:
                        unparseable += 1
                        reviews.append({**review, "status": "unparseable", "reply": reply})
                    else:
                        parsed += 1
                        cand, base = pair if order == "candidate_first" else pair[::-1]
                        got[order]["candidate"].append(cand)
                        got[order]["baseline"].append(base)
                        reviews.append({**review, "status": "ok", "reply": reply, "candidate": cand,
                                        "baseline": base})
                done += 1
                if on_call:
                    on_call(done, total_calls)
        scored = all(got[o]["candidate"] for o in orders)
        row = {"question": q.id, "category": q.category, "scored": scored,
               "valid": {o: len(got[o]["candidate"]) for o in orders}}
        if scored:
            # Each order weighs the same whatever its count of valid samples: the position bias cancels.
            row["candidate"] = _mean([_mean(got[o]["candidate"]) for o in orders])
            row["baseline"] = _mean([_mean(got[o]["baseline"]) for o in orders])
        per_question.append(row)
    scored_rows = [r for r in per_question if r["scored"]]
    by_cat: dict[str, dict] = {}
    for r in scored_rows:
        c = by_cat.setdefault(r["category"], {"questions": 0, "candidate_total": 0.0, "baseline_total": 0.0})
        c["questions"] += 1
        c["candidate_total"] += r["candidate"]
        c["baseline_total"] += r["baseline"]
    for c in by_cat.values():
        c["relative"] = _ratio(c["candidate_total"], c["baseline_total"])
    cand_total = sum(r["candidate"] for r in scored_rows)
    base_total = sum(r["baseline"] for r in scored_rows)
    counts = dict(client.counts - before)
    return {
        "candidate": names[0], "baseline": names[1], "judge": client.cfg.model, "endpoint": client.endpoint,
        "samples": samples, "questions": len(questions), "scored_questions": len(scored_rows),
        "unscored_questions": [r["question"] for r in per_question if not r["scored"]],
        "candidate_total": cand_total, "baseline_total": base_total,
        "candidate_mean": cand_total / len(scored_rows) if scored_rows else float("nan"),
        "baseline_mean": base_total / len(scored_rows) if scored_rows else float("nan"),
        "relative": _ratio(cand_total, base_total),
        "by_category": dict(sorted(by_cat.items())),
        "calls": {"planned": total_calls, "parsed": parsed, "unparseable": unparseable, "failed": failed,
                  "http_requests": counts.get("requests", 0), "retries": counts.get("retries", 0),
                  "timeouts": counts.get("timeouts", 0), "network_errors": counts.get("network_errors", 0),
                  "malformed": counts.get("malformed", 0),
                  "http_errors": {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("http_")}},
        "per_question": per_question,
        "reviews": reviews,
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
