"""A scriptable fake OpenAI-compatible server on 127.0.0.1, for deterministic tests.

It speaks real HTTP, so the real ``openai`` client (and its retries) is exercised.
Each POST to ``/v1/chat/completions`` takes the next scripted action, or, when the
script is empty, asks ``responder(body)`` for one. Actions:

- ``Reply(content, finish_reason="stop")``: a chat completion; streamed as
  server-sent events when the request asked for ``stream``.
- ``Status(code, message)``: an OpenAI-style error body with that HTTP status.
- ``Reset()``: close the connection without answering.
- ``Stall(seconds)``: wait, then close without answering.

``rejects`` maps a ``response_format.type`` to the (status, message) the server answers
it with, imitating a real server: :data:`LLAMA_CPP_PYTHON` (500 to ``json_schema``, with
the message llama-cpp-python 0.3 gives) or :data:`LM_STUDIO` (400 to ``json_object``).
``props``, when given, is the answer to ``GET /props`` (llama.cpp's self-description, e.g.
:data:`LLAMA_CPP_PROPS`); otherwise that path is a 404, as on most servers.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LLAMA_CPP_PYTHON = {
    "json_schema": (
        500,
        "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', "
        "'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
        "'ctx': {'expected': \"'text' or 'json_object'\"}}",
    )
}
LM_STUDIO = {"json_object": (400, "'response_format.type' must be 'json_schema' or 'text'")}
# What llama.cpp's server says of itself at GET /props (abridged).
LLAMA_CPP_PROPS = {
    "default_generation_settings": {"n_ctx": 8192, "params": {}},
    "total_slots": 1,
    "model_path": "model.gguf",
    "build_info": "b0-unknown",
}


@dataclass
class Reply:
    content: str
    finish_reason: str = "stop"
    refusal: str | None = None
    pause: float = 0.0  # seconds between streamed chunks
    delay: float = 0.0  # seconds before answering (a model's thinking time)
    gate: threading.Event | None = None  # answer only once this is set
    usage: dict[str, int] | None = field(
        default_factory=lambda: {"prompt_tokens": 11, "completion_tokens": 7}
    )
    tool_calls: list[tuple[str, str, str]] | None = None  # (id, name, arguments as JSON text)


@dataclass
class Status:
    code: int
    message: str = "scripted error"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Reset:
    pass


@dataclass
class Stall:
    seconds: float


Action = Reply | Status | Reset | Stall


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeServer:
    """Start with :meth:`start` (or as a context manager); ``base_url`` is the API root."""

    def __init__(
        self,
        responder: Callable[[dict[str, Any]], Action] | None = None,
        *,
        model: str = "fake-model",
        rejects: dict[str, tuple[int, str]] | None = None,
        props: dict[str, Any] | None = None,
    ) -> None:
        self.script: deque[Action] = deque()
        self.props = props
        self.responder = responder or (lambda body: Reply("ok"))
        self.model = model
        self.rejects = rejects or {}
        self.stopping = threading.Event()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def add(self, *actions: Action) -> None:
        self.script.extend(actions)

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r.body for r in self.received if r.path.endswith("/chat/completions")]

    def start(self) -> FakeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # releases stalled requests
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next_action(self, body: dict[str, Any]) -> Action:
        with self._lock:
            if self.script:
                return self.script.popleft()
        return self.responder(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(
                        200, {"object": "list", "data": [{"id": server.model, "object": "model"}]}
                    )
                elif self.path == "/props" and server.props is not None:
                    self._json(200, server.props)
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                if not self.path.endswith("/chat/completions"):
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                kind = (body.get("response_format") or {}).get("type")
                if kind in server.rejects:
                    code, message = server.rejects[kind]
                    self._json(code, {"error": {"message": message, "type": "invalid_request"}})
                    return
                action = server._next_action(body)
                if isinstance(action, Status):
                    error = {
                        "error": {
                            "message": action.message,
                            "type": "scripted",
                            "code": action.code,
                        }
                    }
                    self._json(action.code, error, action.headers)
                elif isinstance(action, Reset):
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif isinstance(action, Stall):
                    server.stopping.wait(action.seconds)
                    self.close_connection = True
                elif body.get("stream"):
                    if action.gate is not None:
                        action.gate.wait()
                    server.stopping.wait(action.delay)
                    self._stream(body, action)
                else:
                    server.stopping.wait(action.delay)
                    self._json(200, self._completion(body, action))

            def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
                completion: dict[str, Any] = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": body.get("model", server.model),
                    "system_fingerprint": "fp-fake",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": reply.content,
                                "refusal": reply.refusal,
                                **(
                                    {
                                        "tool_calls": [
                                            {
                                                "id": i,
                                                "type": "function",
                                                "function": {"name": n, "arguments": a},
                                            }
                                            for i, n, a in reply.tool_calls
                                        ]
                                    }
                                    if reply.tool_calls
                                    else {}
                                ),
                            },
                            "finish_reason": reply.finish_reason,
                        }
                    ],
                }
                if reply.usage is not None:
                    completion["usage"] = {**reply.usage, "total_tokens": sum(reply.usage.values())}
                return completion

            def _stream(self, body: dict[str, Any], reply: Reply) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                base = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 1_700_000_000,
                    "model": body.get("model", server.model),
                    "system_fingerprint": "fp-fake",
                }
                words = reply.content.split(" ")
                pieces = (
                    [w if i == 0 else " " + w for i, w in enumerate(words)] if reply.content else []
                )
                for piece in pieces:
                    if reply.pause:
                        server.stopping.wait(reply.pause)
                    chunk = {
                        **base,
                        "choices": [
                            {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                        ],
                    }
                    self._event(chunk)
                for index, (call_id, name, arguments) in enumerate(reply.tool_calls or []):
                    # as OpenAI streams a call: its id and name first, then the arguments
                    # in pieces, each chunk naming the call by its index
                    half = len(arguments) // 2
                    deltas = [
                        {"index": index, "id": call_id, "type": "function",
                         "function": {"name": name, "arguments": ""}},
                        {"index": index, "function": {"arguments": arguments[:half]}},
                        {"index": index, "function": {"arguments": arguments[half:]}},
                    ]  # fmt: skip
                    for delta in deltas:
                        self._event(
                            {
                                **base,
                                "choices": [
                                    {
                                        "index": 0,
                                        "delta": {"tool_calls": [delta]},
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                self._event(
                    {
                        **base,
                        "choices": [
                            {"index": 0, "delta": {}, "finish_reason": reply.finish_reason}
                        ],
                    }
                )
                wants_usage = (body.get("stream_options") or {}).get("include_usage")
                if wants_usage and reply.usage is not None:
                    self._event(
                        {
                            **base,
                            "choices": [],
                            "usage": {**reply.usage, "total_tokens": sum(reply.usage.values())},
                        }
                    )
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, payload: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

            def _json(
                self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
