"""`fedit chat`: prompt building, the terminal loop on scripted input, the web page in headless Chromium,
and the web server against hostile requests.

The browser is Debian's chromium (scripts/setup-system.sh installs it), driven over the DevTools
protocol on a pipe (--remote-debugging-pipe): no webdriver, no extra Python package.

The hostile-request tests drive the real handler: a real server on 127.0.0.1 (a free port) around a
Chat whose model is a stub (one token per whitespace-separated word, a fixed two-piece answer), so
every token count is worked out by hand; malformed requests go over raw sockets.
"""

import fcntl
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedit.chat import (MAX_BODY, Chat, alpaca_chat_prompt, make_server, parse_chat_request, serve, terminal_chat,
                        url_of)
from fedit.data.prompts import ALPACA_NO_INPUT
from fedit.errors import FeditError
from fedit.inference import load_for_inference
from fedit.cli import main

from conftest import ROOT
from test_generate import make_run_dir

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return make_run_dir(tmp_path_factory.mktemp("chat") / "run", tiny_model_dir)


@pytest.fixture(scope="module")
def chat(run_dir):
    return Chat(load_for_inference(run_dir, dtype="fp32", device="cpu"), max_new_tokens=32,
                info={"adapter": str(run_dir / "adapter"), "model": "tiny"})


# ---------------------------------------------------------------- prompts

def test_alpaca_prompt_has_one_instruction_response_pair_per_turn():
    assert alpaca_chat_prompt([], "What is 2 plus 2?") == ALPACA_NO_INPUT.format(instruction="What is 2 plus 2?")
    p = alpaca_chat_prompt([("hi", "hello!"), ("and 2+2?", "4")], "and times 3?")
    assert p == (ALPACA_NO_INPUT.format(instruction="hi") + "hello!"
                 "\n\n### Instruction:\nand 2+2?\n\n### Response:\n4"
                 "\n\n### Instruction:\nand times 3?\n\n### Response:\n")


def test_oldest_turns_are_dropped_to_fit_the_budget(chat):
    history = [(f"question number {i} about brainstorming", f"The answer for open_qa is {i}.") for i in range(30)]
    small = Chat(chat.loaded, max_prompt_tokens=200)
    text, dropped = small.prompt(history, "last question")
    assert 0 < dropped < 30
    assert len(chat.loaded.tokenizer(text)["input_ids"]) <= 200
    assert text == alpaca_chat_prompt(history[dropped:], "last question")
    _, one_more = small.prompt(history[dropped - 1:], "last question")
    assert one_more == 1  # the turn just before the kept ones did not fit
    # the message alone is always sent, even when it exceeds the budget
    text, dropped = Chat(chat.loaded, max_prompt_tokens=5).prompt(history, "last question")
    assert dropped == 30 and text == alpaca_chat_prompt([], "last question")


def test_chat_template_gets_real_turns(chat):
    tok = chat.loaded.tokenizer
    saved = getattr(tok, "chat_template", None)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        text, _ = Chat(chat.loaded, template="chat").prompt([("hi", "hello!")], "and you?")
    finally:
        tok.chat_template = saved
    assert text == "<user>hi\n<assistant>hello!\n<user>and you?\n<assistant>"


# ---------------------------------------------------------------- terminal

class Recorder(io.StringIO):
    """stdout that remembers each write, to tell a streamed answer from one printed at once."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def answers_in(writes):
    """The pieces written after each 'bot> ' up to its newline."""
    out, cur = [], None
    for w in writes:
        if w == "bot> ":
            cur = []
        elif cur is not None:
            if w == "\n":
                out.append(cur)
                cur = None
            else:
                cur.append(w)
    return out


def test_terminal_chat_streams_and_handles_reset_and_quit(chat):
    stdin = io.StringIO("Question 3 about closed_qa: what is 3 plus 2?\n\nhello there\n/help\n/reset\n"
                        "What is the answer for open_qa?\n/quit\nnever read\n")
    out = Recorder()
    history = terminal_chat(chat, stdin, out)
    answers = answers_in(out.writes)
    assert len(answers) == 3  # /quit ended the loop before "never read"
    q1, q2, q3 = "Question 3 about closed_qa: what is 3 plus 2?", "hello there", "What is the answer for open_qa?"
    a1 = chat.reply([], q1)
    assert "".join(answers[0]) == a1 and a1
    assert "".join(answers[1]) == chat.reply([(q1, a1)], q2)  # the second turn saw the first
    assert "".join(answers[2]) == chat.reply([], q3)  # /reset: a new conversation
    assert history == [(q3, chat.reply([], q3))]
    assert max(len(a) for a in answers) > 1  # streamed in pieces
    text = out.getvalue()
    assert "(history cleared: a new conversation)" in text and text.count("/reset starts a new conversation") == 2


def test_terminal_chat_ends_at_end_of_input(chat):
    out = Recorder()
    assert terminal_chat(chat, io.StringIO("hello there\n"), out) == [("hello there", chat.reply([], "hello there"))]


def test_chat_command_in_a_subprocess_with_piped_stdin(run_dir, chat):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "fedit.cli", "chat", "--adapter", str(run_dir), "--dtype",
                           "fp32", "--device", "cpu", "--max-new-tokens", "32"],
                          input="hello there\n/reset\n/quit\n", env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"bot> {chat.reply([], 'hello there')}\n" in done.stdout
    assert "(history cleared" in done.stdout


# ---------------------------------------------------------------- web: HTTP level

@pytest.fixture()
def server(chat):
    srv = make_server(chat, "127.0.0.1", 0)
    thread = threading.Thread(target=serve, args=(srv,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join()


def post(url, body):
    req = urllib.request.Request(url + "api/chat", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        return [json.loads(block[len("data: "):]) for block in r.read().decode().split("\n\n") if block]


def test_chat_endpoint_streams_server_sent_events(server, chat):
    url = url_of(server)
    events = post(url, {"message": "hello there", "history": []})
    deltas = [e["delta"] for e in events if "delta" in e]
    assert events[0] == {"dropped_turns": 0} and events[-1] == {"done": True, "answer": chat.reply([], "hello there")}
    assert "".join(deltas) == events[-1]["answer"] and len(deltas) > 1
    events = post(url, {"message": "and then?", "history": [["hello there", events[-1]["answer"]]]})
    assert events[-1]["answer"] == chat.reply([("hello there", chat.reply([], "hello there"))], "and then?")
    info = json.loads(urllib.request.urlopen(url + "api/info", timeout=30).read())
    assert info["template"] == "alpaca" and info["adapter"] == chat.info["adapter"]


def test_chat_endpoint_rejects_bad_requests(server):
    for body in ({"history": []}, {"message": "  "}, {"message": "q", "history": [["only one"]]}):
        with pytest.raises(urllib.error.HTTPError) as e:
            post(url_of(server), body)
        assert e.value.code == 400
    with pytest.raises(ValueError, match="history"):
        parse_chat_request(b'{"message": "q", "history": "not a list"}')


def test_chat_web_command_serves_until_sigterm(run_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedit.cli", "chat", "--web", "--port", "0", "--adapter",
                             str(run_dir), "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "8"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # "loading ...", then "fedit chat on http://127.0.0.1:PORT/ (Ctrl-C stops)"
            lines.append(line)
            if line.startswith("fedit chat on "):
                break
        assert lines and lines[-1].startswith("fedit chat on http://127.0.0.1:"), (lines, proc.stderr.read())
        url = lines[-1].split()[3]
        page = urllib.request.urlopen(url, timeout=60).read().decode()
        assert '<textarea id="input"' in page and "<title>fedit chat</title>" in page
        assert post(url, {"message": "hello there"})[-1]["done"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0  # a clean stop, not death by signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_busy_port_is_a_clear_error(run_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(FeditError, match=rf"port {port} on 127.0.0.1 is in use; pass --port"):
            make_server(Chat(None), "127.0.0.1", port)
        # the command says so before it spends time loading the model
        assert main(["chat", "--web", "--adapter", str(run_dir), "--port", str(port)]) == 2
        assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_chat_command_missing_adapter(tmp_path, capsys):
    assert main(["chat", "--adapter", str(tmp_path / "no-run")]) == 2
    assert f"adapter {tmp_path / 'no-run'} does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- web: hostile requests (stub model)

class WordTokenizer:
    """One token per whitespace-separated word; remembers every text it was given, and whether the
    chat's generation lock was held at the time."""

    def __init__(self):
        self.texts, self.locked, self.chat = [], [], None

    def __call__(self, text, add_special_tokens=True):
        self.texts.append(text)
        self.locked.append(self.chat is not None and self.chat._lock.locked())
        return {"input_ids": list(range(len(text.split())))}


class StubChat(Chat):
    """A Chat whose model answers "stub answer" in two pieces, and counts how often it was run."""

    runs = 0

    def _pieces(self, text):
        type(self).runs += 1
        yield "stub"
        yield " answer"


PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n")


def stub_chat(max_prompt_tokens=512):
    tok = WordTokenizer()
    chat = StubChat(SimpleNamespace(tokenizer=tok), max_prompt_tokens=max_prompt_tokens,
                    info={"adapter": "/home/someone/runs/secret-adapter"})
    tok.chat = chat
    return chat, tok


@pytest.fixture()
def stub():
    chat, _ = stub_chat()
    StubChat.runs = 0
    srv = make_server(chat, "127.0.0.1", 0)
    thread = threading.Thread(target=serve, args=(srv,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join()


def exchange(server, data, half_close=True):
    """Send raw bytes, read until the server closes: the raw response (b"" if it closed without one)."""
    with socket.create_connection(server.server_address[:2], timeout=20) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def http(server, method, path, headers=(), body=b""):
    """A raw HTTP/1.1 request with the right Host unless ``headers`` says otherwise (None drops a header)."""
    hdrs = {"Host": f"127.0.0.1:{server.server_address[1]}", **dict(headers)}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items() if v is not None)
    return exchange(server, (head + "\r\n").encode() + body)


def status(raw):
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else None


def body_of(raw):
    return raw.split(b"\r\n\r\n", 1)[1]


def events_of(raw):
    return [json.loads(b[len("data: "):]) for b in body_of(raw).decode().split("\n\n") if b]


CHAT_BODY = json.dumps({"message": "hello there", "history": [["hi", "hello!"]]}).encode()


def post_chat(server, body=CHAT_BODY, **headers):
    return http(server, "POST", "/api/chat", {"Content-Type": "application/json",
                                              "Content-Length": str(len(body)), **headers}, body)


def test_stub_server_answers_a_well_formed_request(stub):
    raw = post_chat(stub)
    assert status(raw) == 200
    assert events_of(raw) == [{"dropped_turns": 0}, {"delta": "stub"}, {"delta": " answer"},
                              {"done": True, "answer": "stub answer"}]
    # the page's own requests carry its origin: accepted (and localhost names a loopback bind)
    port = stub.server_address[1]
    assert status(post_chat(stub, Origin=f"http://127.0.0.1:{port}")) == 200
    assert status(http(stub, "GET", "/api/info", {"Host": f"localhost:{port}"})) == 200


@pytest.mark.parametrize("value, code", [("-1", 400), ("abc", 400), ("1_0", 400), ("+25", 400),
                                         ("25, 26", 400), (None, 411)])
def test_content_length_must_be_one_non_negative_number(stub, value, code):
    # -1 used to read the body to the end (any size) and answer 200; abc dropped the connection
    # with no response; a missing length read nothing and blamed the JSON
    raw = post_chat(stub, **{"Content-Length": value})
    assert status(raw) == code, raw[:200]
    assert "Content-Length" in json.loads(body_of(raw))["error"]
    assert StubChat.runs == 0


def test_chunked_body_and_too_large_body_are_refused(stub):
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT_BODY), CHAT_BODY)
    raw = http(stub, "POST", "/api/chat", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
               chunked)
    assert status(raw) == 411
    raw = post_chat(stub, **{"Content-Length": str(MAX_BODY + 1)})  # refused before a byte of it is read
    assert status(raw) == 413
    assert StubChat.runs == 0


def test_chat_request_must_be_json(stub):
    # a cross-site <form> can send text/plain without asking first; application/json it cannot
    raw = post_chat(stub, **{"Content-Type": "text/plain"})
    assert status(raw) == 415 and StubChat.runs == 0


@pytest.mark.parametrize("host", ["rebound.attacker.example:{port}", "127.0.0.1:{other}", "localhost:{other}",
                                  "127.0.0.2:{port}", "127.0.0.1:{port}@evil", None])
def test_host_must_name_the_bound_address(stub, host):
    port = stub.server_address[1]
    for method, path, extra in (("GET", "/api/info", {}), ("GET", "/", {}),
                                ("POST", "/api/chat", {"Content-Type": "application/json",
                                                       "Content-Length": str(len(CHAT_BODY))})):
        h = None if host is None else host.format(port=port, other=port + 1 if port < 65535 else port - 1)
        raw = http(stub, method, path, {"Host": h, **extra}, CHAT_BODY if method == "POST" else b"")
        assert status(raw) == 403, (method, path, raw[:200])
        assert b"secret-adapter" not in raw  # DNS rebinding cannot read /api/info
    assert StubChat.runs == 0


@pytest.mark.parametrize("origin", ["http://attacker.example", "http://127.0.0.1:{other}",
                                    "https://127.0.0.1:{port}", "null"])
def test_cross_site_origin_cannot_start_a_generation(stub, origin):
    port = stub.server_address[1]
    raw = post_chat(stub, Origin=origin.format(port=port, other=port + 1 if port < 65535 else port - 1))
    assert status(raw) == 403 and StubChat.runs == 0


def test_host_check_on_other_binds():
    # the rule itself, for binds the tests do not open: on a wildcard bind any IP address of the
    # machine may be typed, but never a DNS name (what a rebinding page has); allowed_hosts adds names
    from fedit.chat import ChatServer

    def allowed(bound, host, port=7860, names=()):
        return ChatServer.host_allowed(SimpleNamespace(server_address=(bound, 7860), allowed_hosts=set(names)),
                                       host, port)

    assert allowed("0.0.0.0", "192.168.1.5") and allowed("0.0.0.0", "localhost")
    assert not allowed("0.0.0.0", "rebound.attacker.example") and not allowed("0.0.0.0", "192.168.1.5", 7861)
    assert allowed("::1", "::1") and allowed("::1", "localhost") and not allowed("::1", "127.0.0.1")
    assert allowed("192.168.1.5", "192.168.1.5") and not allowed("192.168.1.5", "localhost")
    assert allowed("192.168.1.5", "chatbox.lan", names={"chatbox.lan"})


def test_half_sent_headers_are_closed_after_the_timeout(stub):
    stub.request_timeout = 0.5
    port = stub.server_address[1]
    # no blank line: the headers never end (this used to hold the connection open for good)
    raw = exchange(stub, f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode(), half_close=False)
    assert raw == b""


def test_half_sent_body_gets_408(stub):
    stub.request_timeout = 0.5
    head = (f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{stub.server_address[1]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(CHAT_BODY)}\r\n\r\n").encode()
    raw = exchange(stub, head + CHAT_BODY[:10], half_close=False)
    assert status(raw) == 408 and StubChat.runs == 0


def test_a_trickled_request_is_cut_off_at_one_deadline(stub):
    # a byte every 0.1 s never leaves a single read idle for 0.5 s, yet the request as a whole
    # must arrive within request_timeout: the server closes long before 200 bytes are through
    stub.request_timeout = 0.5
    sent = 0
    with socket.create_connection(stub.server_address[:2], timeout=20) as s:
        s.sendall(b"GET /")
        closed = False
        for sent in range(1, 201):
            try:
                s.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if select.select([s], [], [], 0.1)[0]:
                try:
                    closed = s.recv(1 << 16) == b""
                except ConnectionResetError:
                    closed = True
                if closed:
                    break
    assert closed and sent < 200


def test_prompt_work_is_bounded_before_tokenizing():
    # 1,000 one-word turns: the stub counts one token per word, so a prompt with k earlier turns is
    # 21 + 6k tokens (preamble 16 words, "### Instruction:" / "### Response:" 4 per turn, one word
    # each for question, answer and message): k = 81 fits 512 (507), k = 82 does not (513)
    chat, tok = stub_chat(512)
    history = [(f"q{i}", f"a{i}") for i in range(1000)]
    text, dropped = chat.prompt(history, "last")
    assert dropped == 1000 - 81
    assert len(text.split()) == 21 + 6 * 81
    assert text.startswith(PREAMBLE + "q919\n\n### Response:\na919\n\n### Instruction:\nq920\n")
    assert text.endswith("a999\n\n### Instruction:\nlast\n\n### Response:\n")
    # at most 512 // 4 = 128 turns are looked at: 1 whole-prompt try, then bisection over 128
    # candidates (7 halvings) = 8 tokenizations, where dropping one at a time took 920
    assert len(tok.texts) <= 8
    assert max(t.count("### Instruction:") for t in tok.texts) <= 128 + 1


def test_characters_are_capped_before_tokenizing():
    chat, tok = stub_chat(512)  # 16 * 512 = 8192 characters of message and turns
    history = [("x" * 1000, "")] * 10  # each turn one "word": all ten would fit the token budget
    text, dropped = chat.prompt(history, "m")  # 1 + 8 * 1000 <= 8192 < 1 + 9 * 1000: 8 kept
    assert dropped == 2 and text.count("x" * 1000) == 8
    assert max(len(t) for t in tok.texts) < 8192 + 300  # the template's own text on top
    tok.texts.clear()
    with pytest.raises(FeditError, match="the message is 8193 characters; this chat takes at most 8192"):
        chat.prompt([], "y" * 8193)
    assert tok.texts == []  # refused before any tokenization
    text, dropped = chat.prompt(history, "y" * 8192)  # the message alone still goes, however long
    assert dropped == 10 and text == PREAMBLE + "y" * 8192 + "\n\n### Response:\n"


def test_web_request_with_1000_turns_does_bounded_work_inside_the_lock(stub):
    chat, tok = stub.chat, stub.chat.loaded.tokenizer
    body = json.dumps({"message": "last", "history": [[f"q{i}", f"a{i}"] for i in range(1000)]}).encode()
    assert len(body) < 25_000
    raw = post_chat(stub, body)
    assert status(raw) == 200
    assert events_of(raw)[0] == {"dropped_turns": 919}  # as worked out above
    # the prompt is built once per request (it was built twice), under the generation lock
    # (the tokenizer is shared, and the work of many requests at once is then one at a time)
    assert 1 <= len(tok.texts) <= 8 and all(tok.locked)
    # a message over the character cap is a 400 before the answer starts, not a tokenization
    tok.texts.clear()
    raw = post_chat(stub, json.dumps({"message": "y" * 8193}).encode())
    assert status(raw) == 400 and "8193 characters" in json.loads(body_of(raw))["error"]
    assert tok.texts == [] and StubChat.runs == 1


def test_terminal_chat_refuses_a_too_long_message_and_goes_on():
    chat, _ = stub_chat(512)
    out = Recorder()
    history = terminal_chat(chat, io.StringIO("y" * 8193 + "\nhello\n"), out)
    assert "the message is 8193 characters; this chat takes at most 8192" in out.getvalue()
    assert history == [("hello", "stub answer")]


# ---------------------------------------------------------------- web: in a real browser

class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the browser)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe"]

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="fedit-chromium-")
        child_in, self._w = os.pipe()
        self._r, child_out = os.pipe()
        # above 4, so that "3<&in 4>&out" cannot clobber one with the other (bash: dash reads fds 0-9 only)
        child_in, child_out = (self._high(fd) for fd in (child_in, child_out))
        self._buf, self._id = b"", 0
        # exec keeps the PID: self.proc.pid is the browser, the leader of its own process group
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{child_in} 4>&{child_out}', str(CHROMIUM), *self.FLAGS,
             f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(child_in, child_out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        os.close(child_in)
        os.close(child_out)
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _high(fd):
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def call(self, method, session=None, timeout=60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout  # a guard against hanging, not a measurement
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method}")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk

    def page(self, method, **params):
        return self.call(method, session=self.session, **params)

    def js(self, expression):
        r = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"waited for {expression}")

    def type(self, selector, text):
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.page("Input.insertText", text=text)

    def press_enter(self):
        for kind in ("keyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
            self.proc.wait(timeout=10)
        except Exception:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # helpers left in the browser's own process group
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self._r)
        os.close(self._w)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture()
def browser():
    if not CHROMIUM.exists():
        # a failure, never a skip: a test that cannot run is not a test that passed
        pytest.fail("/usr/bin/chromium is absent: run scripts/setup-system.sh (the web chat test needs a browser)")
    b = Browser()
    yield b
    b.close()


LAST_ANSWER = "(() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();" \
              " return m && m.dataset.done ? m.textContent : null; })()"


def ask(browser, question, n_before):
    browser.type("#input", question)
    browser.press_enter()
    browser.wait_for(f"document.querySelectorAll('.msg.assistant[data-done]').length === {n_before + 1}")
    assert browser.js("document.querySelectorAll('.msg.error').length") == 0
    return browser.js(LAST_ANSWER)


def test_web_chat_in_headless_chromium(server, chat, browser):
    browser.page("Page.navigate", url=url_of(server))
    browser.wait_for("document.readyState === 'complete' && document.getElementById('info').textContent !== ''")
    assert "template alpaca" in browser.js("document.getElementById('info').textContent")

    q1, q2 = "Question 3 about closed_qa: what is 3 plus 2?", "hello there"
    a1 = ask(browser, q1, 0)
    assert a1 == chat.reply([], q1) and a1
    assert browser.js("document.querySelector('.msg.user').textContent") == q1
    assert browser.js("document.getElementById('input').value") == ""
    a2 = ask(browser, q2, 1)
    assert a2 == chat.reply([(q1, a1)], q2)  # the page sent the first turn along

    browser.js("document.getElementById('reset').click()")
    assert browser.js("document.querySelectorAll('.msg').length") == 0
    assert ask(browser, q2, 0) == chat.reply([], q2)  # after Reset the history is empty again
