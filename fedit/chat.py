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

Bounded work per message. Before anything is tokenized, at most
``max_prompt_tokens // 4`` earlier turns are looked at (a turn costs at least
4 tokens in either template, so older ones could not fit) and at most
``16 * max_prompt_tokens`` characters of message and turns (a message longer
than that is refused); the turns that pass are then fitted to the token budget
by a bisection over how many of the oldest to drop: at most
1 + log2(turns + 1) tokenizations of a bounded text, where dropping one turn
at a time re-tokenized the whole prompt once per dropped turn. Prompt building
and generation run under the one lock (the tokenizer is shared and not safe
for concurrent use).

The web page (``chat_web.html``) is served by the standard library's
http.server; ``POST /api/chat`` streams the answer as server-sent events. The
server is for this machine only: it answers only requests whose ``Host`` (and
``Origin``, when a browser sends one) names the address it is bound to, so a
web page from another site cannot drive it or read it, not even through DNS
rebinding; a chat request must be ``application/json`` with a valid
``Content-Length`` of at most ``MAX_BODY`` bytes, and the whole request must
arrive within ``ChatServer.request_timeout`` seconds.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import json
import re
import signal
import socket
import sys
import threading
import time
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

    # A turn is at least this many tokens in either template (the alpaca markers alone are
    # more; a chat template's role markers too), so more turns than budget // this cannot fit.
    MIN_TOKENS_PER_TURN = 4
    # Far more characters than a token ever stands for in running text (about 4 in English):
    # text beyond budget * this cannot fit, so it is cut before any tokenizer sees it.
    MAX_CHARS_PER_TOKEN = 16

    @property
    def stop(self) -> tuple[str, ...]:
        return stops(self.template)

    @property
    def max_turns(self) -> int:
        """Earlier turns looked at per message; older ones are dropped unread."""
        return max(1, self.max_prompt_tokens // self.MIN_TOKENS_PER_TURN)

    @property
    def max_chars(self) -> int:
        """Characters of message + earlier turns looked at per message; a longer message is refused."""
        return self.MAX_CHARS_PER_TOKEN * self.max_prompt_tokens

    def bounded(self, history: Sequence[Turn], message: str) -> tuple[list[Turn], int]:
        """(the newest turns within ``max_turns`` and ``max_chars``, how many older ones were cut).

        No tokenization: this is the cheap first cut, and where a too-long message is refused
        (FeditError)."""
        if len(message) > self.max_chars:
            raise FeditError(f"the message is {len(message)} characters; this chat takes at most "
                             f"{self.max_chars} ({self.MAX_CHARS_PER_TOKEN} x its prompt budget of "
                             f"{self.max_prompt_tokens} tokens): shorten it")
        if self.template not in ("alpaca", "chat"):
            raise FeditError(f"unknown template {self.template!r}; use --template alpaca or chat")
        chars, kept = len(message), 0
        for user, answer in reversed(history[-self.max_turns:]):
            chars += len(user) + len(answer)
            if chars > self.max_chars:
                break
            kept += 1
        return list(history[len(history) - kept:]), len(history) - kept

    def _text(self, history: Sequence[Turn], message: str) -> str:
        if self.template == "alpaca":
            return alpaca_chat_prompt(history, message)
        return chat_template_prompt(history, message, self.loaded.tokenizer)

    def _fits(self, text: str) -> bool:
        ids = self.loaded.tokenizer(text, add_special_tokens=self.template != "chat")["input_ids"]
        return len(ids) <= self.max_prompt_tokens

    def prompt(self, history: Sequence[Turn], message: str) -> tuple[str, int]:
        """(prompt, number of oldest turns dropped to fit ``max_prompt_tokens``).

        The oldest turns are dropped first; the message itself is always kept, alone when even
        it does not fit (it is at most ``max_chars`` characters: ``bounded``)."""
        kept, cut = self.bounded(list(history), message)
        n, text = len(kept), self._text(kept, message)
        if not n or self._fits(text):
            return text, cut
        # Bisect on d = turns dropped, with "d - 1 does not fit" and "d fits or d = n" kept
        # true at the ends: the answer is the fewest drops that fit, found in log2(n + 1)
        # tokenizations instead of one per dropped turn.
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            if self._fits(self._text(kept[mid:], message)):
                hi = mid
            else:
                lo = mid + 1
        return self._text(kept[lo:], message), cut + lo

    def _settings(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "temperature": self.temperature, "top_p": self.top_p, "stop": self.stop,
                "add_special_tokens": self.template != "chat"}

    def _pieces(self, text: str) -> Iterator[str]:
        """The model's answer to a finished prompt, piece by piece (the one place that runs it)."""
        return stream(self.loaded, text, **self._settings())

    def stream(self, history: Sequence[Turn], message: str,
               on_prompt: Callable[[int], None] | None = None) -> Iterator[str]:
        """The answer to ``message`` after ``history``, piece by piece.

        ``on_prompt(dropped)`` is called once the prompt is built, before the first piece."""
        with self._lock:
            text, dropped = self.prompt(history, message)
            if on_prompt:
                on_prompt(dropped)
            yield from self._pieces(text)

    def reply(self, history: Sequence[Turn], message: str) -> str:
        """The whole answer at once (what the joined pieces of ``stream`` equal)."""
        with self._lock:
            text, _ = self.prompt(history, message)
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
        try:
            chat.bounded(history, message)
        except FeditError as e:  # a message too long for the prompt: say so, keep the conversation
            say(f"{e}\n")
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


class _DeadlineReader(io.RawIOBase):
    """The socket's receiving side with one deadline for the whole request: each read waits at
    most until then, so a client that sends nothing, or trickles a byte now and then, is cut off
    (a per-read timeout alone would let a byte every few seconds hold the connection forever)."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?")
_DIGITS = re.compile(r"[0-9]{1,20}")


def _authority(value: str) -> tuple[str, int] | None:
    """``host[:port]`` as (lower-case host without brackets, port; 80 when absent), None if malformed."""
    m = _HOST.fullmatch(value.strip())
    if not m:
        return None
    return m.group(1).strip("[]").lower(), int(m.group(2) or 80)


class Handler(BaseHTTPRequestHandler):
    """The page, ``GET /api/info`` and ``POST /api/chat`` (server-sent events) for ``self.server.chat``."""

    server_version = "fedit-chat"
    protocol_version = "HTTP/1.0"  # one request per connection: a streamed answer ends when it closes

    def log_message(self, format, *args):  # quiet: the terminal shows the URL, not every request
        pass

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stream makefile() made: its reference would keep the socket open
        self.rfile = io.BufferedReader(
            _DeadlineReader(self.connection, time.monotonic() + self.server.request_timeout))
        self._body_unread = False

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # the reader set the socket's timeout to what is left of the request's deadline: a
        # reply (or the body, read next) gets its own request_timeout per operation
        self.connection.settimeout(self.server.request_timeout)
        return ok

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._body_unread:
                self._drain()

    def _drain(self) -> None:
        """After an early refusal: read (a bounded amount of) what the client still sends, so that
        closing with unread data does not reset the connection before it has read the refusal."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline, left = time.monotonic() + 2.0, 4 * MAX_BODY
            while left > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = self.connection.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._common_headers()
        self.end_headers()
        self.wfile.write(body)

    def _common_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # no other site may frame the page (clicks on a hidden chat)
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _refuse(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _same_origin(self) -> bool:
        """Host names the bound address (or localhost on a loopback or wildcard bind), and Origin,
        when present, is that same host: else refused with 403. A page of another site cannot
        pass: its requests carry its own Origin, and through DNS rebinding its own host name."""
        hosts = self.headers.get_all("Host") or []
        host = _authority(hosts[0]) if len(hosts) == 1 else None
        if host is None or not self.server.host_allowed(*host):
            shown = ", ".join(hosts)[:100] or "(none)"
            self._refuse(HTTPStatus.FORBIDDEN, f"Host {shown} is not this server's address "
                                               f"{url_of(self.server)}: open the chat at that address")
            return False
        origin = self.headers.get("Origin")
        if origin is not None:
            scheme, _, rest = origin.partition("://")
            if scheme.lower() != "http" or _authority(rest) != host:
                self._refuse(HTTPStatus.FORBIDDEN, f"requests from {origin[:100]} are not accepted: the chat answers "
                                                   f"its own page only")
                return False
        return True

    def do_GET(self):
        if not self._same_origin():
            return
        chat, path = self.server.chat, self.path.split("?")[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, page_html(chat), "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, {"title": chat.title, "template": chat.template,
                                       "max_new_tokens": chat.max_new_tokens, "ready": chat.loaded is not None,
                                       **chat.info})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}"})

    def _body(self) -> bytes | None:
        """The request body, or None after a refusal (411, 400, 413, 415, 408)."""
        if self.headers.get_content_type() != "application/json":
            self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request as Content-Type: application/json")
            return None
        if self.headers.get("Transfer-Encoding") is not None:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "Transfer-Encoding is not accepted: send a Content-Length")
            return None
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not lengths:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
            return None
        if len(lengths) > 1 or not _DIGITS.fullmatch(next(iter(lengths))):
            shown = ", ".join(sorted(lengths))[:100]
            self._refuse(HTTPStatus.BAD_REQUEST, f"Content-Length {shown!r} is not one non-negative whole number")
            return None
        n = int(next(iter(lengths)))
        if n > MAX_BODY:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request too large: {n} bytes, at most {MAX_BODY}")
            return None
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, f"the request did not arrive within "
                                                     f"{self.server.request_timeout:g} s")
            return None
        if len(body) < n:
            self._refuse(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {n} bytes")
            return None
        return body

    def do_POST(self):
        self._body_unread = True
        if not self._same_origin():
            return
        chat = self.server.chat
        if self.path.split("?")[0] != "/api/chat":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path}"})
        body = self._body()
        if body is None:
            return
        self._body_unread = False
        self.connection.settimeout(self.server.request_timeout)  # for each write of the answer
        if chat.loaded is None:
            return self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the model is still loading; try again"})
        try:
            history, message = parse_chat_request(body)
            chat.bounded(history, message)  # the cheap checks, before the answer starts
        except (ValueError, UnicodeDecodeError, FeditError) as e:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self._common_headers()
        self.end_headers()
        pieces: list[str] = []
        answer = chat.stream(history, message, on_prompt=lambda dropped: self._event({"dropped_turns": dropped}))
        try:
            for piece in answer:
                pieces.append(piece)
                self._event({"delta": piece})
            self._event({"done": True, "answer": "".join(pieces)})
        except (ConnectionError, TimeoutError):
            pass  # the page went away or stopped reading: closing the generator below stops the model
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
    # Seconds for a whole request (line, headers, body) to arrive, and for each write of the
    # answer to be taken: an idle or half-sent connection holds a thread no longer than this.
    request_timeout = 30.0

    def __init__(self, address, chat: Chat):
        self.chat = chat
        # Host names (lower case) besides the bound address and localhost that requests may
        # carry (the name of this machine, when serving under one); empty by default.
        self.allowed_hosts: set[str] = set()
        super().__init__(address, Handler)

    def host_allowed(self, host: str, port: int) -> bool:
        """Whether ``Host: host:port`` names this server: its port, and its address (any IP
        address on a wildcard bind), ``localhost`` on a loopback or wildcard bind, or one of
        ``allowed_hosts``. Other names are refused, which is what stops DNS rebinding."""
        bound, bound_port = self.server_address[:2]
        if port != bound_port:
            return False
        bound_ip = ipaddress.ip_address(bound)
        if host in self.allowed_hosts:
            return True
        if host == "localhost":
            return bound_ip.is_loopback or bound_ip.is_unspecified
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return bound_ip.is_unspecified or ip == bound_ip


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
