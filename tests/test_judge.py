"""The judge client against a real HTTP server on 127.0.0.1 serving scripted replies.

Every request pops the next scripted action (a reply text, an HTTP status, a delay
longer than the client's timeout, a malformed body), so the counts in the report
can be checked against exactly what the server served.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedit.config import JudgeConfig
from fedit.errors import FeditError
from fedit.evaluation.judge import JudgeClient, judge_pair, parse_scores
from fedit.evaluation.questions import Question


class ScriptedJudge:
    """A chat-completions server whose replies follow a script; it records every request it gets."""

    def __init__(self, script: list[tuple]):
        self.script = list(script)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    action = judge.script.pop(0) if judge.script else ("status", 503)
                kind = action[0]
                if kind == "sleep":  # longer than the client's timeout: the client gives up first
                    time.sleep(action[1])
                    return
                if kind == "status":
                    self._send(action[1], b'{"error": "scripted failure"}')
                elif kind == "malformed":
                    self._send(200, b"not json at all")
                else:
                    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": action[1]}}]}
                    self._send(200, json.dumps(reply).encode())

            def _send(self, code: int, data: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # the timed-out client closed its socket: writing to it fails, as it should

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def ok(text: str) -> tuple:
    return ("reply", text)


QUESTIONS = [Question("q1", "brainstorming", "Name three fruits."), Question("q2", "open_qa", "What is rain?", "ctx")]
CANDIDATE = ["apple, pear, plum", "water falling from clouds"]
BASELINE = ["cars", "no idea"]


def judge_cfg(url: str, **kw) -> JudgeConfig:
    base = dict(url=url, model="scripted-judge", api_key_env="FEDIT_TEST_JUDGE_KEY", timeout=0.5, retries=2, backoff=0.0)
    return JudgeConfig(**{**base, **kw})


def test_counts_match_what_the_server_served(monkeypatch):
    monkeypatch.setenv("FEDIT_TEST_JUDGE_KEY", "sk-test")
    script = [
        ok("8 6\nAssistant 1 lists fruits."),              # q1, candidate first
        ("status", 500), ok("Assistant 1: 5\nAssistant 2: 9"),  # q1, baseline first: a 500, then a reply
        ("sleep", 1.5), ok("7 7"),                          # q2, candidate first: a timeout, then a reply
        ok("Both answers are fine, I cannot choose."),      # q2, baseline first: unparseable
    ]
    sleeps: list[float] = []
    with ScriptedJudge(script) as srv:
        client = JudgeClient(judge_cfg(srv.url, backoff=0.25), sleep=sleeps.append)
        res = judge_pair(client, QUESTIONS, CANDIDATE, BASELINE, samples=1, names=("fedit", "local-1"))
        requests = srv.requests
    calls = res["calls"]
    assert len(requests) == 6 and not srv.script
    assert calls == {"planned": 4, "parsed": 3, "unparseable": 1, "failed": 0, "http_requests": 6, "retries": 2,
                     "timeouts": 1, "network_errors": 0, "malformed": 0, "http_errors": {"500": 1}}
    assert sleeps == [0.25, 0.25]  # the first retry of each call waits judge.backoff
    # q1: candidate (8 + 9) / 2, baseline (6 + 5) / 2; q2 has no valid score with the baseline first: unscored
    assert res["scored_questions"] == 1 and res["unscored_questions"] == ["q2"]
    assert res["candidate_total"] == pytest.approx(8.5) and res["baseline_total"] == pytest.approx(5.5)
    assert res["relative"] == pytest.approx(8.5 / 5.5)
    assert res["by_category"] == {"brainstorming": {"questions": 1, "candidate_total": 8.5, "baseline_total": 5.5,
                                                    "relative": pytest.approx(8.5 / 5.5)}}
    bad = [r for r in res["reviews"] if r["status"] == "unparseable"]
    assert [(r["question"], r["order"]) for r in bad] == [("q2", "baseline_first")]
    assert "cannot choose" in bad[0]["reply"]
    # What the judge was sent: the endpoint, the key from the configured variable, the model, both orders.
    assert {r["path"] for r in requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in requests} == {"Bearer sk-test"}
    assert requests[0]["body"]["model"] == "scripted-judge"
    first, swapped = requests[0]["body"]["messages"][1]["content"], requests[1]["body"]["messages"][1]["content"]
    assert first.index(CANDIDATE[0]) < first.index(BASELINE[0])
    assert swapped.index(BASELINE[0]) < swapped.index(CANDIDATE[0])
    assert "[Question]\nName three fruits." in first and "scale of 1 to 10" in first
    assert "What is rain?\n\nctx" in requests[3]["body"]["messages"][1]["content"]


def test_samples_average_and_a_call_that_keeps_failing():
    script = [
        ok("9 1"), ("status", 500), ("status", 502), ("status", 500),  # candidate first: 1 valid, 1 failed call
        ok("2 8"), ("malformed",), ok("4, 6"),                         # baseline first: 2 valid (one after a bad body)
    ]
    sleeps: list[float] = []
    with ScriptedJudge(script) as srv:
        client = JudgeClient(judge_cfg(srv.url, backoff=0.5), sleep=sleeps.append)
        res = judge_pair(client, QUESTIONS[:1], CANDIDATE[:1], BASELINE[:1], samples=2)
    assert res["calls"] == {"planned": 4, "parsed": 3, "unparseable": 0, "failed": 1, "http_requests": 7,
                            "retries": 3, "timeouts": 0, "network_errors": 0, "malformed": 1,
                            "http_errors": {"500": 2, "502": 1}}
    assert sleeps == [0.5, 1.0, 0.5]  # backoff doubles per retry of one call
    # candidate: mean(9 [cand first], mean(8, 6) [base first]) = 8; baseline: mean(1, mean(2, 4)) = 2
    (row,) = res["per_question"]
    assert row["valid"] == {"candidate_first": 1, "baseline_first": 2}
    assert row["candidate"] == pytest.approx(8.0) and row["baseline"] == pytest.approx(2.0)
    assert res["relative"] == pytest.approx(4.0)
    assert [r["status"] for r in res["reviews"]] == ["ok", "failed", "ok", "ok"]


def test_counts_are_per_pair_when_a_client_serves_several():
    with ScriptedJudge([ok("5 5")] * 2 + [("status", 500), ok("6 3"), ok("3 6")]) as srv:
        client = JudgeClient(judge_cfg(srv.url))
        a = judge_pair(client, QUESTIONS[:1], CANDIDATE[:1], BASELINE[:1], samples=1)
        b = judge_pair(client, QUESTIONS[:1], CANDIDATE[:1], BASELINE[:1], samples=1)
    assert a["calls"]["http_requests"] == 2 and a["calls"]["http_errors"] == {} and a["relative"] == 1.0
    assert b["calls"]["http_requests"] == 3 and b["calls"]["http_errors"] == {"500": 1}
    assert b["relative"] == pytest.approx(2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_judge_is_one_clear_error():
    client = JudgeClient(judge_cfg(f"http://127.0.0.1:{free_port()}/v1", retries=1), sleep=lambda s: None)
    with pytest.raises(FeditError, match=r"did not answer after 2 attempt\(s\).*judge.url"):
        judge_pair(client, QUESTIONS, CANDIDATE, BASELINE, samples=1)
    assert client.counts["network_errors"] == 2


def test_unauthorized_names_the_key_variable():
    with ScriptedJudge([("status", 401)]) as srv:
        client = JudgeClient(judge_cfg(srv.url))
        with pytest.raises(FeditError, match=r"HTTP 401.*\$FEDIT_TEST_JUDGE_KEY"):
            judge_pair(client, QUESTIONS, CANDIDATE, BASELINE, samples=1)


def test_config_problems():
    with pytest.raises(FeditError, match="judge.url"):
        JudgeClient(JudgeConfig())
    with pytest.raises(FeditError, match="http://"):
        JudgeClient(JudgeConfig(url="localhost:8000", model="m"))


@pytest.mark.parametrize("text, expected", [
    ("8 6", (8.0, 6.0)),
    ("8, 6\nAssistant 1 is better.", (8.0, 6.0)),
    ("\n  7.5 9  \nbecause", (7.5, 9.0)),
    ("8/10 6/10", (8.0, 6.0)),
    ("Assistant 1: 8\nAssistant 2: 6", (8.0, 6.0)),
    ("Evaluation evidence: both fine.\nScore of the Assistant1: 7\nScore of the Assistant2: 3", (7.0, 3.0)),
    ("assistant 2: 4\nassistant 1 = 10", (10.0, 4.0)),
    ("11 3", None),          # outside 1-10
    ("0 5", None),
    ("8", None),
    ("8 6 4", None),
    ("Assistant 1 did better than Assistant 2.", None),
    ("", None),
])
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected
