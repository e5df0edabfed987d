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

A responder may read ``server.local.client``, the (host, port) the request came from
(set in the request's thread before the responder is asked).

``fine_tuning`` (:class:`FineTuning`) serves ``/v1/files`` and ``/v1/fine_tuning/jobs``: a
job moves one step along its :class:`Progress` at each retrieve, with events, and each
operation can be scripted with faults (see :class:`FineTuning`). ``batches``
(:class:`Batches`; None with ``batch_api=False``, a server without a Batch API) serves
``/v1/batches``: a batch moves one step along its :class:`BatchProgress` at each
retrieve, and its lines are answered as chat requests when it completes.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import socket
import threading
import urllib.parse
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
    method: str = "POST"


# -- fine-tuning: /v1/files and /v1/fine_tuning/jobs ------------------------------------


@dataclass
class Answer:
    """A fine-tuning operation answered as usual, after ``before()`` (when given) ran in
    the server's request thread (e.g. raising SIGINT, a Ctrl-C at that moment); with
    ``lose``, carried out but its answer lost (the connection closed instead)."""

    before: Callable[[], None] | None = None
    lose: bool = False


FineTuningAction = Answer | Status | Reset | Stall

OPERATIONS = (
    "upload", "get_file", "delete_file", "content", "create", "list", "retrieve", "cancel",
    "events", "create_batch", "retrieve_batch", "list_batches",
)  # fmt: skip


@dataclass(frozen=True)
class Progress:
    """The statuses a new job goes through, one per retrieve after its creation (the
    first is its status when created); a last status ``failed`` comes with ``error``
    (OpenAI's ``{code, message, param}``)."""

    statuses: tuple[str, ...] = ("validating_files", "queued", "running", "succeeded")
    error: dict[str, Any] | None = None


SUCCEEDS = Progress()
FAILS = Progress(
    ("validating_files", "failed"),
    error={
        "code": "invalid_training_file",
        "message": "The job failed due to an invalid training file: example 3 has no "
        "assistant message.",
        "param": "training_file",
    },
)
EVENT_MESSAGES = {
    "validating_files": "Validating training file: {training_file}",
    "queued": "Files validated, moving job to queued state",
    "running": "Fine-tuning job started",
    "succeeded": "The job has successfully completed",
    "failed": "{error}",
    "cancelled": "Fine-tuning job cancelled",
}
CREATED_AT = 1_700_000_000  # the servers' clock: each job and event a second later


class FineTuning:
    """The fake files and fine-tuning jobs of one :class:`FakeServer`.

    ``progress`` is the :class:`Progress` of the jobs created from now on. ``add(operation,
    *actions)`` scripts the next requests of one operation (:data:`OPERATIONS`: ``upload``
    is ``POST /v1/files``, ``create`` ``POST /v1/fine_tuning/jobs``, ``retrieve`` ``GET
    /v1/fine_tuning/jobs/{id}``...): a :class:`Status` is answered as an OpenAI-style
    error (its ``headers``, e.g. ``retry-after``, sent too), :class:`Reset` and
    :class:`Stall` as for chat, :class:`Answer` as usual. Unscripted requests are answered
    as usual. ``files`` holds what was uploaded and not deleted (with its ``content``),
    ``jobs`` every job.
    """

    def __init__(self) -> None:
        self.progress = SUCCEEDS
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.script: dict[str, deque[FineTuningAction]] = {op: deque() for op in OPERATIONS}
        self._progress: dict[str, tuple[Progress, int]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._clock = CREATED_AT
        self._uploads = 0
        self._lock = threading.Lock()

    def add(self, operation: str, *actions: FineTuningAction) -> None:
        self.script[operation].extend(actions)

    def next_action(self, operation: str) -> FineTuningAction:
        with self._lock:
            script = self.script[operation]
            return script.popleft() if script else Answer()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def upload(self, fields: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self._uploads += 1
            file_id = f"file-fake{self._uploads:03d}"
            content: bytes = fields.get("file", b"")
            entry = {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": self._tick(),
                "filename": fields.get("filename", "upload.jsonl"),
                "purpose": fields.get("purpose", ""),
                "status": "processed",
                "status_details": None,
            }
            self.files[file_id] = {**entry, "content": content}
            return 200, entry

    def file(self, file_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if file_id not in self.files:
                return 404, _error(f"No such File object: {file_id}", 404)
            return 200, {k: v for k, v in self.files[file_id].items() if k != "content"}

    def content(self, file_id: str) -> tuple[int, Any]:
        with self._lock:
            if file_id not in self.files:
                return 404, _error(f"No such File object: {file_id}", 404)
            data: bytes = self.files[file_id]["content"]
            return 200, data

    def delete_file(self, file_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if self.files.pop(file_id, None) is None:
                return 404, _error(f"No such File object: {file_id}", 404)
            return 200, {"id": file_id, "object": "file", "deleted": True}

    def create(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            for key in ("training_file", "validation_file"):
                if body.get(key) is not None and body[key] not in self.files:
                    return 400, _error(f"invalid {key}: no such file {body[key]}", 400)
            job_id = f"ftjob-fake{len(self.jobs) + 1:03d}"
            progress = self.progress
            job = {
                "id": job_id,
                "object": "fine_tuning.job",
                "created_at": self._tick(),
                "model": body["model"],
                "training_file": body["training_file"],
                "validation_file": body.get("validation_file"),
                "hyperparameters": {"n_epochs": "auto"},
                "organization_id": "org-fake",
                "result_files": [],
                "seed": 42,
                "status": progress.statuses[0],
                "fine_tuned_model": None,
                "finished_at": None,
                "trained_tokens": None,
                "error": None,
                "suffix": body.get("suffix"),
            }
            self.jobs[job_id] = job
            self._progress[job_id] = (progress, 0)
            self._events[job_id] = []
            self._event(job_id, f"Created fine-tuning job: {job_id}")
            self._enter(job_id, progress.statuses[0])
            return 200, self._public(job)

    def _event(self, job_id: str, message: str, level: str = "info") -> None:
        events = self._events[job_id]
        events.append(
            {
                "id": f"ftevent-{job_id.removeprefix('ftjob-')}-{len(events) + 1:02d}",
                "object": "fine_tuning.job.event",
                "created_at": self._tick(),
                "level": level,
                "message": message,
                "data": {},
                "type": "message",
            }
        )

    def _enter(self, job_id: str, status: str) -> None:
        """Put the job in ``status``, with that status's event."""
        job = self.jobs[job_id]
        job["status"] = status
        progress, _ = self._progress[job_id]
        error = progress.error if status == "failed" else None
        if status == "succeeded":
            suffix = job.get("suffix") or ""
            job["fine_tuned_model"] = f"ft:{job['model']}:fake-org:{suffix}:{job_id[-3:]}abc"
            job["trained_tokens"] = 1234
            self._event(job_id, f"New fine-tuned model created: {job['fine_tuned_model']}")
        if status in ("succeeded", "failed", "cancelled"):
            job["finished_at"] = self._tick()
        if error is not None:
            job["error"] = error
        message = EVENT_MESSAGES.get(status, f"Status: {status}")
        level = "error" if status == "failed" else "info"
        self._event(
            job_id,
            message.format(
                training_file=job["training_file"], error=(error or {}).get("message", "")
            ),
            level,
        )

    def retrieve(self, job_id: str, *, advance: bool) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if job_id not in self.jobs:
                return 404, _error(f"No such fine-tuning job: {job_id}", 404)
            job = self.jobs[job_id]
            progress, step = self._progress[job_id]
            finished = job["status"] in ("succeeded", "failed", "cancelled")
            if advance and not finished and step + 1 < len(progress.statuses):
                self._progress[job_id] = (progress, step + 1)
                self._enter(job_id, progress.statuses[step + 1])
            return 200, self._public(job)

    def cancel(self, job_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if job_id not in self.jobs:
                return 404, _error(f"No such fine-tuning job: {job_id}", 404)
            job = self.jobs[job_id]
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return 400, _error(f"Job {job_id} has already {job['status']}.", 400)
            self._enter(job_id, "cancelled")
            return 200, self._public(job)

    def list_jobs(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            jobs = [self._public(j) for j in reversed(self.jobs.values())]  # newest first
            return 200, _page(jobs, query)

    def events(self, job_id: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if job_id not in self.jobs:
                return 404, _error(f"No such fine-tuning job: {job_id}", 404)
            return 200, _page(list(reversed(self._events[job_id])), query)  # newest first

    @staticmethod
    def _public(job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if k != "suffix"}


def completion(body: dict[str, Any], reply: Reply, model: str) -> dict[str, Any]:
    """The chat completion answering ``body`` with ``reply``."""
    answer: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body.get("model", model),
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
        answer["usage"] = {**reply.usage, "total_tokens": sum(reply.usage.values())}
    return answer


# -- batches: /v1/batches ---------------------------------------------------------------


@dataclass(frozen=True)
class BatchProgress:
    """The statuses a new batch goes through, one per retrieve after its creation (the
    first is its status when created). Its lines are answered when it reaches
    ``completed`` or ``expired`` (then only the first ``answered`` lines; the others get a
    ``batch_expired`` error line); ``failed`` comes with ``errors`` (OpenAI's ``{code,
    message, line}``)."""

    statuses: tuple[str, ...] = ("validating", "in_progress", "finalizing", "completed")
    answered: int | None = None
    errors: tuple[dict[str, Any], ...] = ()


BATCH_SUCCEEDS = BatchProgress()


class Batches:
    """The fake batches of one :class:`FakeServer`, over its files
    (:class:`FineTuning`). ``progress`` is the :class:`BatchProgress` of the batches
    created from now on. A line is answered as a chat request would be (the server's
    script, else its responder): a :class:`Reply` goes to the output file, a
    :class:`Status` to the error file (as OpenAI's per-request failures). ``batches``
    holds every batch, ``lines`` the lines each one answered, in order."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.progress = BATCH_SUCCEEDS
        self.batches: dict[str, dict[str, Any]] = {}
        self.lines: dict[str, list[dict[str, Any]]] = {}
        self._progress: dict[str, tuple[BatchProgress, int]] = {}
        self._lock = threading.Lock()

    def create(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        files = self.server.fine_tuning
        with self._lock:
            entry = files.files.get(body.get("input_file_id", ""))
            if entry is None:
                return 400, _error(f"invalid input_file_id: {body.get('input_file_id')}", 400)
            if entry["purpose"] != "batch":
                return 400, _error("the input file's purpose must be batch", 400)
            lines = [json.loads(raw) for raw in entry["content"].decode().splitlines() if raw]
            if {line["url"] for line in lines} != {body["endpoint"]}:
                return 400, _error("every line's url must be the batch's endpoint", 400)
            batch_id = f"batch_fake{len(self.batches) + 1:03d}"
            progress = self.progress
            batch = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "status": progress.statuses[0],
                "output_file_id": None,
                "error_file_id": None,
                "created_at": files._tick(),
                "metadata": body.get("metadata"),
                "errors": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            }
            self.batches[batch_id] = batch
            self.lines[batch_id] = lines
            self._progress[batch_id] = (progress, 0)
            return 200, dict(batch)

    def retrieve(self, batch_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if batch_id not in self.batches:
                return 404, _error(f"No such batch: {batch_id}", 404)
            batch = self.batches[batch_id]
            progress, step = self._progress[batch_id]
            if step + 1 < len(progress.statuses):
                self._progress[batch_id] = (progress, step + 1)
                self._enter(batch, progress, progress.statuses[step + 1])
            return 200, dict(batch)

    def list_batches(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            return 200, _page([dict(b) for b in reversed(self.batches.values())], query)

    def _enter(self, batch: dict[str, Any], progress: BatchProgress, status: str) -> None:
        files = self.server.fine_tuning
        batch["status"] = status
        moment = files._tick()
        if status == "failed":
            batch["errors"] = {"object": "list", "data": list(progress.errors)}
            batch["failed_at"] = moment
        if status not in ("completed", "expired"):
            return
        batch[f"{status}_at"] = moment
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for number, line in enumerate(self.lines[batch["id"]], start=1):
            ids = {"id": f"batch_req_{number:04d}", "custom_id": line["custom_id"]}
            if status == "expired" and number > (progress.answered or 0):
                expired = {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion "
                    "window expired.",
                }
                errors.append({**ids, "response": None, "error": expired})
                continue
            action = self.server._next_action(line["body"])
            request_id = f"req_fake{number:04d}"
            if isinstance(action, Reply):
                answer = completion(line["body"], action, self.server.model)
                response = {"status_code": 200, "request_id": request_id, "body": answer}
                outputs.append({**ids, "response": response, "error": None})
                continue
            code = action.code if isinstance(action, Status) else 500
            message = action.message if isinstance(action, Status) else "server error"
            body = _error(message, code)
            response = {"status_code": code, "request_id": request_id, "body": body}
            errors.append({**ids, "response": response, "error": None})
        counts = batch["request_counts"]
        counts["completed"], counts["failed"] = len(outputs), len(errors)
        for kind, lines in (("output_file_id", outputs), ("error_file_id", errors)):
            if lines:
                content = "".join(json.dumps(line) + "\n" for line in lines).encode()
                name = f"{batch['id']}_{kind.removesuffix('_file_id')}.jsonl"
                _, entry = files.upload(
                    {"file": content, "filename": name, "purpose": "batch_output"}
                )
                batch[kind] = entry["id"]


def _error(message: str, code: int, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _page(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """A cursor page as OpenAI's lists answer: ``after`` an id, at most ``limit``."""
    if "after" in query:
        ids = [item["id"] for item in items]
        items = items[ids.index(query["after"]) + 1 :] if query["after"] in ids else []
    limit = int(query.get("limit", 20))
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def multipart_fields(content_type: str, data: bytes) -> dict[str, Any]:
    """The fields of a multipart/form-data body: text fields as str, the file's bytes
    under its field name and its name under ``filename``."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + data
    )
    fields: dict[str, Any] = {}
    for part in message.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if part.get_filename() is not None:
            fields[name] = payload
            fields["filename"] = part.get_filename()
        else:
            fields[name] = payload.decode()
    return fields


class FakeServer:
    """Start with :meth:`start` (or as a context manager); ``base_url`` is the API root."""

    def __init__(
        self,
        responder: Callable[[dict[str, Any]], Action] | None = None,
        *,
        model: str = "fake-model",
        rejects: dict[str, tuple[int, str]] | None = None,
        props: dict[str, Any] | None = None,
        batch_api: bool = True,
    ) -> None:
        self.script: deque[Action] = deque()
        self.props = props
        self.responder = responder or (lambda body: Reply("ok"))
        self.model = model
        self.rejects = rejects or {}
        self.stopping = threading.Event()
        self.fine_tuning = FineTuning()
        self.batches = Batches(self) if batch_api else None
        self.received: list[Received] = []
        self.local = threading.local()  # .client: the (host, port) of the request answered
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
                if self._fine_tuning("GET"):
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self._json(
                        200, {"object": "list", "data": [{"id": server.model, "object": "model"}]}
                    )
                elif self.path == "/props" and server.props is not None:
                    self._json(200, server.props)
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_DELETE(self) -> None:
                if not self._fine_tuning("DELETE"):
                    self._json(404, {"error": {"message": f"no route {self.path}"}})

            def _fine_tuning(self, method: str) -> bool:
                """Answer a request to /v1/files or /v1/fine_tuning/jobs; False for any
                other path."""
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if parts[:2] not in (["v1", "files"], ["v1", "fine_tuning"], ["v1", "batches"]):
                    return False
                if parts[1] == "batches" and server.batches is None:
                    self._json(404, {"error": {"message": f"no route {method} {self.path}"}})
                    return True
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length", 0))
                data = self.rfile.read(length) if length else b""
                content_type = self.headers.get("Content-Type", "")
                if content_type.startswith("multipart/form-data"):
                    fields = multipart_fields(content_type, data)
                    body = {k: (len(v) if isinstance(v, bytes) else v) for k, v in fields.items()}
                else:
                    fields = body = json.loads(data or b"{}")
                with server._lock:
                    server.received.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            method,
                        )
                    )
                ft = server.fine_tuning
                rest = parts[2:]
                route: tuple[str, Callable[[], tuple[int, Any]]]
                if parts[1] == "files" and method == "POST" and not rest:
                    route = ("upload", lambda: ft.upload(fields))
                elif parts[1] == "files" and method == "GET" and len(rest) == 1:
                    route = ("get_file", lambda: ft.file(rest[0]))
                elif parts[1] == "files" and method == "GET" and rest[1:] == ["content"]:
                    route = ("content", lambda: ft.content(rest[0]))
                elif parts[1] == "batches" and server.batches is not None:
                    batches = server.batches
                    if method == "POST" and not rest:
                        route = ("create_batch", lambda: batches.create(body))
                    elif method == "GET" and not rest:
                        route = ("list_batches", lambda: batches.list_batches(query))
                    elif method == "GET" and len(rest) == 1:
                        route = ("retrieve_batch", lambda: batches.retrieve(rest[0]))
                    else:
                        self._json(404, {"error": {"message": f"no route {method} {self.path}"}})
                        return True
                elif parts[1] == "files" and method == "DELETE" and len(rest) == 1:
                    route = ("delete_file", lambda: ft.delete_file(rest[0]))
                elif rest == ["jobs"] and method == "POST":
                    route = ("create", lambda: ft.create(body))
                elif rest == ["jobs"] and method == "GET":
                    route = ("list", lambda: ft.list_jobs(query))
                elif len(rest) == 2 and rest[0] == "jobs" and method == "GET":
                    route = ("retrieve", lambda: ft.retrieve(rest[1], advance=True))
                elif len(rest) == 3 and rest[2] == "cancel" and method == "POST":
                    route = ("cancel", lambda: ft.cancel(rest[1]))
                elif len(rest) == 3 and rest[2] == "events" and method == "GET":
                    route = ("events", lambda: ft.events(rest[1], query))
                else:
                    self._json(404, {"error": {"message": f"no route {method} {self.path}"}})
                    return True
                operation, answer = route
                action = ft.next_action(operation)
                if isinstance(action, Status):
                    self._json(action.code, _error(action.message, action.code), action.headers)
                elif isinstance(action, Reset):
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif isinstance(action, Stall):
                    server.stopping.wait(action.seconds)
                    self.close_connection = True
                else:
                    if action.before is not None:
                        action.before()
                    code, payload = answer()
                    if action.lose:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                    elif isinstance(payload, bytes):
                        self._bytes(code, payload)
                    else:
                        self._json(code, payload)
                return True

            def do_POST(self) -> None:
                if self._fine_tuning("POST"):
                    return
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
                server.local.client = self.client_address  # for the responder to read
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
                    self._json(200, completion(body, action, server.model))

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

            def _bytes(self, code: int, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

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
