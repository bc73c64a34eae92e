"""`fedit chat`: prompt building, the terminal loop on scripted input, the web page in headless Chromium.

The browser is Debian's chromium (scripts/setup-system.sh installs it), driven over the DevTools
protocol on a pipe (--remote-debugging-pipe): no webdriver, no extra Python package.
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

import pytest

from fedit.chat import Chat, alpaca_chat_prompt, make_server, parse_chat_request, serve, terminal_chat, url_of
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
