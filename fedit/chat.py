"""Chat with a tuned adapter: in the terminal, or on a local web page.

One ``Chat`` (model + adapter + prompt template + generation settings) serves
both. It is stateless: every call gets the conversation so far as a list of
``(user, assistant)`` turns, so the terminal keeps its history in a list and the
web page keeps it in the browser; ``/reset`` (or the page's Reset button)
simply starts a new list. One generation runs at a time (a lock), so several
browser tabs share the model safely, one answer after another.

Multi-turn prompts. The alpaca template the paper trains with has one
instruction, an optional input and one response; it has no turns. fedit
continues it the way alpaca-style chat front ends do: the preamble once, then
one ``### Instruction:`` / ``### Response:`` pair per turn, the newest message
last with an empty response for the model to write::

    Below is an instruction that describes a task. Write a response ...

    ### Instruction:
    <message 1>

    ### Response:
    <answer 1>

    ### Instruction:
    <newest message>

    ### Response:

With no history this is exactly the single-turn training prompt. The other
choice, the earlier turns as a transcript in the ``### Input:`` section, keeps
the trained shape more literally, but on SmolLM2-135M + a Dolly adapter it lost
the thread ("And what river flows through it?" after "What is the capital of
France?" -> "The answer is France."), where the turn-by-turn form answered
"The river that flows through Paris is the River Seine." With the ``chat``
template the turns go through the tokenizer's own chat template as messages.
Either way the oldest turns are dropped first when the prompt would exceed the
token budget (the run's ``train.cutoff_len``, at least 512), and an answer ends
where the model starts a new ``### `` section of its own.

The web page (``chat_web.html``) is served by the standard library's
http.server; ``POST /api/chat`` streams the answer as server-sent events.
"""

from __future__ import annotations

import errno
import json
import signal
import sys
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable, Iterator, Sequence, TextIO

from fedit.data.prompts import ALPACA_NO_INPUT, chat_text
from fedit.errors import FeditError
from fedit.inference import generate, stops, stream

Turn = tuple[str, str]  # (user message, assistant answer)

TURN = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca_chat_prompt(history: Sequence[Turn], message: str) -> str:
    """The alpaca prompt for ``message`` after ``history`` (see the module docstring)."""
    turns = [*history, (message, None)]
    text = ALPACA_NO_INPUT.format(instruction=turns[0][0])
    for (_, answer), (user, _) in zip(turns, turns[1:]):
        text += answer + TURN.format(instruction=user)
    return text


def chat_template_prompt(history: Sequence[Turn], message: str, tokenizer) -> str:
    """The model's chat template over the turns: as training renders conversations (fedit/data/prompts.py)."""
    turns = [(role, text) for u, a in history for role, text in (("user", u), ("assistant", a))]
    return chat_text(tokenizer, [*turns, ("user", message)], generation_prompt=True)


@dataclass
class Chat:
    """A tuned model ready to answer: ``loaded`` from ``fedit.inference.load_for_inference``."""

    loaded: object
    template: str = "alpaca"
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    max_prompt_tokens: int = 512
    title: str = "fedit chat"
    info: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def stop(self) -> tuple[str, ...]:
        return stops(self.template)

    def prompt(self, history: Sequence[Turn], message: str) -> tuple[str, int]:
        """(prompt, number of oldest turns dropped to fit ``max_prompt_tokens``)."""
        history = list(history)
        for dropped in range(len(history) + 1):
            kept = history[dropped:]
            if self.template == "alpaca":
                text = alpaca_chat_prompt(kept, message)
            elif self.template == "chat":
                text = chat_template_prompt(kept, message, self.loaded.tokenizer)
            else:
                raise FeditError(f"unknown template {self.template!r}; use --template alpaca or chat")
            if not kept or len(self.loaded.tokenizer(text)["input_ids"]) <= self.max_prompt_tokens:
                return text, dropped
        raise AssertionError("unreachable")

    def _settings(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "temperature": self.temperature, "top_p": self.top_p, "stop": self.stop,
                "add_special_tokens": self.template != "chat"}

    def stream(self, history: Sequence[Turn], message: str) -> Iterator[str]:
        """The answer to ``message`` after ``history``, piece by piece."""
        text, _ = self.prompt(history, message)
        with self._lock:
            yield from stream(self.loaded, text, **self._settings())

    def reply(self, history: Sequence[Turn], message: str) -> str:
        """The whole answer at once (what the joined pieces of ``stream`` equal)."""
        text, _ = self.prompt(history, message)
        with self._lock:
            return generate(self.loaded, [text], batch_size=1, **self._settings())[0]


# ---------------------------------------------------------------- terminal

HELP = "/reset starts a new conversation, /quit (or Ctrl-D) leaves; Ctrl-C stops an answer."


def terminal_chat(chat: Chat, stdin: TextIO | None = None, stdout: TextIO | None = None,
                  banner: str = "") -> list[Turn]:
    """Read messages line by line, stream each answer; returns the history at the end.

    On a terminal the line editor of ``input()`` is used; with other streams (a pipe, tests)
    lines are read from ``stdin`` as they come."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin is sys.stdin and stdout is sys.stdout and stdin.isatty()

    def read(prompt: str) -> str:
        if interactive:
            return input(prompt)
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def say(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if banner:
        say(banner + "\n")
    say(HELP + "\n")
    history: list[Turn] = []
    while True:
        try:
            message = read("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            say("\n")
            return history
        if not message:
            continue
        if message in ("/quit", "/exit", "/q"):
            return history
        if message == "/reset":
            history = []
            say("(history cleared: a new conversation)\n")
            continue
        if message == "/help":
            say(HELP + "\n")
            continue
        if message.startswith("/"):
            say(f"unknown command {message.split()[0]}; {HELP}\n")
            continue
        say("bot> ")
        pieces: list[str] = []
        answer = chat.stream(history, message)
        try:
            for piece in answer:
                pieces.append(piece)
                say(piece)
        except KeyboardInterrupt:
            answer.close()
            say(" [stopped]")
        say("\n")
        history.append((message, "".join(pieces)))


# ---------------------------------------------------------------- web

MAX_BODY = 1 << 20


def page_html(chat: Chat) -> bytes:
    html = resources.files("fedit").joinpath("chat_web.html").read_text(encoding="utf-8")
    return html.replace("{{TITLE}}", _html_escape(chat.title)).encode("utf-8")


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def parse_chat_request(body: bytes) -> tuple[list[Turn], str]:
    """``{"message": str, "history": [[user, assistant], ...]}`` -> (history, message); ValueError if malformed."""
    data = json.loads(body.decode("utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("message"), str) or not data["message"].strip():
        raise ValueError("expected a JSON object with a non-empty string 'message'")
    history = data.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
        raise ValueError("'history' must be a list of [user, assistant] string pairs")
    return [(u, a) for u, a in history], data["message"].strip()


class Handler(BaseHTTPRequestHandler):
    """The page, ``GET /api/info`` and ``POST /api/chat`` (server-sent events) for ``self.server.chat``."""

    server_version = "fedit-chat"
    protocol_version = "HTTP/1.0"  # one request per connection: a streamed answer ends when it closes

    def log_message(self, format, *args):  # quiet: the terminal shows the URL, not every request
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        chat, path = self.server.chat, self.path.split("?")[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, page_html(chat), "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, {"title": chat.title, "template": chat.template,
                                       "max_new_tokens": chat.max_new_tokens, "ready": chat.loaded is not None,
                                       **chat.info})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}"})

    def do_POST(self):
        chat = self.server.chat
        if self.path.split("?")[0] != "/api/chat":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path}"})
        if chat.loaded is None:
            return self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the model is still loading; try again"})
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request too large"})
        try:
            history, message = parse_chat_request(self.rfile.read(n))
            _, dropped = chat.prompt(history, message)
        except (ValueError, UnicodeDecodeError) as e:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        pieces: list[str] = []
        answer = chat.stream(history, message)
        try:
            self._event({"dropped_turns": dropped})
            for piece in answer:
                pieces.append(piece)
                self._event({"delta": piece})
            self._event({"done": True, "answer": "".join(pieces)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away: closing the generator below stops the model
        except Exception as e:  # a bug, but the page should say so rather than spin forever
            try:
                self._event({"error": f"{type(e).__name__}: {e}"})
            except OSError:
                pass
            raise
        finally:
            answer.close()

    def _event(self, obj) -> None:
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()


class ChatServer(ThreadingHTTPServer):
    """A threaded HTTP server for one ``Chat`` (``chat`` may be set after binding, while the model loads)."""

    # server_close() waits for the request threads: a daemon thread still inside torch when
    # the interpreter exits is killed mid-C++ and aborts the process ("terminate called
    # without an active exception", exit -6), so SIGTERM would not be a clean stop.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address, chat: Chat):
        self.chat = chat
        super().__init__(address, Handler)


def make_server(chat: Chat, host: str = "127.0.0.1", port: int = 7860) -> ChatServer:
    """Bind the web chat (port 0 picks a free port: see ``url_of``); FeditError if it cannot."""
    try:
        return ChatServer((host, port), chat)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise FeditError(f"port {port} on {host} is in use; pass --port with a free port "
                             f"(or --port 0 to let fedit pick one)") from None
        raise FeditError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass --host 127.0.0.1 "
                         f"or the address of one of this machine's interfaces") from None


def url_of(server: ChatServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def serve(server: ChatServer, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM (or ``server.shutdown()`` from another thread)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    if on_ready:
        on_ready(url_of(server))
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
