"""The only place that talks to models: chat completions through the official ``openai`` client.

A request is plain data (a dict of Chat Completions parameters, never credentials)
built here, saved by the stage that sends it, then sent with
``client.chat.completions.create(**request)``. Retries for 408/409/429/5xx and
connection errors are the SDK's own (``max_retries``); what is left after them
becomes a one-line :class:`~pipeline.errors.EndpointError`.

API reference: https://platform.openai.com/docs/api-reference/chat/create
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .config import DEFAULT_KEY_ENV, Endpoint
from .errors import EndpointError, ReplayError, StructuredOutputError, one_line
from .parameters import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S

if TYPE_CHECKING:  # the SDK is imported on first use, not at CLI start-up
    import openai

    from .schemas import Schema

Message = dict[str, str]
T = TypeVar("T")


@dataclass
class ChatResult:
    """One completed chat turn.

    Attributes:
        content: the assistant's text ("" when it said nothing).
        finish_reason: ``stop``, ``length``, ``content_filter``... as the API reported it.
        model: the model name the server reported (falls back to the one asked for).
        usage: ``{"prompt_tokens": int, "completion_tokens": int}`` when the server reported it.
        chunks: how many streamed pieces carried text (about one token each on llama.cpp
            servers; a stand-in for ``completion_tokens`` when usage is not reported).
    """

    content: str
    finish_reason: str | None
    model: str
    usage: dict[str, int] | None
    chunks: int = 0


@dataclass
class Attempt:
    """The outcome of one structured-output attempt.

    Attributes:
        number: 1-based attempt number within the call.
        dialect: the structured-output dialect used.
        outcome: ``ok``, ``rejected`` (the server refused the response format), ``error``
            (an HTTP or connection failure), or a :class:`StructuredOutputError` kind.
        errors: the problems found (``"<json path>: <message>"``) or the error message.
    """

    number: int
    dialect: str
    outcome: str
    errors: list[str]


@dataclass
class StructuredResult:
    """A validated structured answer.

    Attributes:
        value: the parsed JSON, valid against the schema.
        dialect: the dialect that produced it.
        attempts: how many requests were sent.
        request, response: the final request body and raw response.
        usage: prompt and completion tokens summed over every attempt.
    """

    value: Any
    dialect: str
    attempts: int
    request: dict[str, Any]
    response: dict[str, Any]
    usage: dict[str, int]


class AttemptRecorder(Protocol):
    """Receives each structured-output attempt as it happens (a stage saves them)."""

    def request(self, number: int, body: dict[str, Any]) -> None: ...

    def response(self, number: int, body: dict[str, Any]) -> None: ...

    def outcome(self, attempt: Attempt) -> None: ...


class _NoRecorder:
    def request(self, number: int, body: dict[str, Any]) -> None:
        pass

    def response(self, number: int, body: dict[str, Any]) -> None:
        pass

    def outcome(self, attempt: Attempt) -> None:
        pass


def _for_dialect(messages: list[Message], dialect: str, schema: Schema) -> list[Message]:
    """In the ``prompt`` dialect, the schema instructions are added to the last user message."""
    if dialect != "prompt":
        return messages
    from .structured import schema_instructions

    return _noted(messages, schema_instructions(schema))


def _noted(messages: list[Message], note: str) -> list[Message]:
    """``messages`` with ``note`` added, as a new paragraph, to the last user message."""
    out = list(messages)
    for i in range(len(out) - 1, -1, -1):
        if out[i]["role"] == "user":
            out[i] = {**out[i], "content": f"{out[i]['content']}\n\n{note}"}
            break
    return out


class ModelClient:
    """Chat completions against one :class:`~pipeline.config.Endpoint`.

    Args:
        endpoint: where to send requests.
        timeout: seconds to wait for each HTTP request (the SDK's ``timeout``).
        max_retries: retries the SDK makes on 408/409/429/5xx and connection errors.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.max_retries = max_retries
        self._sdk: openai.OpenAI | None = None

    @property
    def sdk(self) -> openai.OpenAI:
        if self._sdk is None:
            import openai

            self._sdk = openai.OpenAI(
                base_url=self.endpoint.base_url,
                api_key=self.endpoint.api_key(),
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
        return self._sdk

    # -- requests as data ----------------------------------------------------------

    def chat_request(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """A streaming Chat Completions request body for ``messages``; the endpoint's extra
        ``params`` override the sampling parameters given here."""
        return {
            "max_tokens": max_tokens,
            "temperature": temperature,
            **({"seed": seed} if seed is not None else {}),
            **self.endpoint.params,
            "model": self.endpoint.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def structured(
        self,
        messages: list[Message],
        schema: Schema,
        *,
        max_tokens: int,
        temperature: float,
        dialects: list[str],
        repair_attempts: int,
        recorder: AttemptRecorder | None = None,
        seed: int | None = None,
        check: Callable[[Any], list[str]] | None = None,
        narrow: Callable[[Any, Schema], Schema] | None = None,
    ) -> StructuredResult:
        """Ask for JSON satisfying ``schema`` and return it validated.

        Tries ``dialects`` in order while the server rejects the response format (see
        :mod:`pipeline.structured`); re-asks up to ``repair_attempts`` times when the answer
        is not valid JSON, breaks the schema, or has problems ``check`` finds (a list of
        ``"<json path>: <message>"``), sending back the answer and the problems; after a
        ``check`` problem, the re-ask's schema is ``narrow(answer, schema)`` (a subset of
        ``schema`` that rules the problem out, which a grammar-enforcing server then
        enforces). An answer cut off at ``max_tokens`` is asked again once, with a note
        stating the budget.
        ``recorder`` sees every attempt's request, raw response and outcome.

        Raises:
            StructuredOutputError: the last attempt's answer was unusable, or the answer was
                filtered, refused, or cut off twice (asking again cannot help).
            EndpointError: the endpoint failed, or rejected the last dialect to try.
        """
        from . import structured

        record = recorder or _NoRecorder()
        plan = list(dialects)
        dialect = plan.pop(0)
        conversation = _for_dialect(list(messages), dialect, schema)
        repairs_left = repair_attempts
        budget_noted = False
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        number = 0
        while True:
            number += 1
            request = {
                "max_tokens": max_tokens,
                "temperature": temperature,
                **({"seed": seed} if seed is not None else {}),
                **self.endpoint.params,
                "model": self.endpoint.model,
                "messages": conversation,
            }
            response_format = structured.response_format(
                dialect, schema, self.endpoint.server, max_tokens
            )
            if response_format is not None:
                request["response_format"] = response_format
            record.request(number, request)
            try:
                response = self.complete(request)
            except EndpointError as e:
                rejected = e.rejects_response_format
                record.outcome(
                    Attempt(number, dialect, "rejected" if rejected else "error", [e.message])
                )
                if rejected and plan:
                    dialect = plan.pop(0)
                    conversation = _for_dialect(conversation, dialect, schema)
                    continue
                if rejected:
                    raise EndpointError(
                        f"{self.endpoint.base_url} rejected the {dialect} response format "
                        f"(HTTP {e.status}: {one_line(e.detail, 200)}); "
                        "use --structured-output auto or another dialect",
                        status=e.status,
                        detail=e.detail,
                    ) from e
                raise
            record.response(number, response)
            for key, value in (response.get("usage") or {}).items():
                if key in usage and isinstance(value, int):
                    usage[key] += value
            try:
                value = structured.parse(response, schema, dialect=dialect, check=check)
            except StructuredOutputError as e:
                record.outcome(Attempt(number, dialect, e.kind, e.errors or [e.message]))
                if e.kind == "length" and not budget_noted:
                    budget_noted = True
                    conversation = _noted(conversation, structured.budget_request(max_tokens))
                    continue
                if not e.repairable or repairs_left == 0:
                    raise
                repairs_left -= 1
                answer = response["choices"][0]["message"].get("content") or ""
                if e.kind == "semantic" and narrow is not None:
                    schema = narrow(json.loads(answer, strict=False), schema)
                conversation = [
                    *conversation,
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": structured.repair_request(e.errors)},
                ]
                continue
            record.outcome(Attempt(number, dialect, "ok", []))
            return StructuredResult(value, dialect, number, request, response, usage)

    # -- sending ------------------------------------------------------------------

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send a non-streaming request; return the raw response as a JSON-ready dict.
        The call is recorded (see :func:`calls_to`).

        Raises:
            EndpointError: after the SDK's retries, with a one-line reason and fix.
        """
        try:
            response = self._send(request)
        except EndpointError as e:
            _record(self.endpoint, request, error=e)
            raise
        _record(self.endpoint, request, response=response)
        return response

    def stream(
        self, request: dict[str, Any], on_delta: Callable[[str], None] | None = None
    ) -> ChatResult:
        """Send a streaming request, calling ``on_delta`` with each piece of text as it
        arrives; return the assembled turn. The call is recorded (see :func:`calls_to`).

        Raises:
            EndpointError: after the SDK's retries, with a one-line reason and fix.
        """
        try:
            streamed = self._send_streaming(request, on_delta)
        except EndpointError as e:
            _record(self.endpoint, request, error=e)
            raise
        _record(self.endpoint, request, stream=streamed)
        return ChatResult(
            "".join(streamed["pieces"]),
            streamed["finish_reason"],
            streamed["model"] or self.endpoint.model,
            streamed["usage"],
            len(streamed["pieces"]),
        )

    def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        import openai

        def send() -> Iterator[Any]:
            try:
                yield self.sdk.chat.completions.create(**request)
            except openai.APIError as e:
                raise self._explain(e) from e

        (response,) = off_main_thread(send)
        dumped: dict[str, Any] = response.model_dump(mode="json", exclude_none=True)
        return dumped

    def _send_streaming(
        self, request: dict[str, Any], on_delta: Callable[[str], None] | None
    ) -> dict[str, Any]:
        """The streamed answer as ``{pieces, finish_reason, model, usage,
        system_fingerprint}``, ``pieces`` being the texts in the order they came."""
        import openai

        def chunks() -> Iterator[Any]:
            try:
                yield from self.sdk.chat.completions.create(**request)
            except openai.APIError as e:
                raise self._explain(e) from e

        streamed: dict[str, Any] = {
            "pieces": [], "finish_reason": None, "model": None, "usage": None,
            "system_fingerprint": None,
        }  # fmt: skip
        for chunk in off_main_thread(chunks):
            streamed["model"] = chunk.model or streamed["model"]
            streamed["system_fingerprint"] = (
                getattr(chunk, "system_fingerprint", None) or streamed["system_fingerprint"]
            )
            if chunk.usage is not None:
                streamed["usage"] = {
                    "prompt_tokens": chunk.usage.prompt_tokens,
                    "completion_tokens": chunk.usage.completion_tokens,
                }
            for choice in chunk.choices:
                text = choice.delta.content if choice.delta else None
                if text:
                    streamed["pieces"].append(text)
                    if on_delta:
                        on_delta(text)
                if choice.finish_reason:
                    streamed["finish_reason"] = choice.finish_reason
        return streamed

    def _explain(self, e: Exception) -> EndpointError:
        """Turn an SDK exception into a one-line error naming the endpoint and the fix."""
        import openai

        url = self.endpoint.base_url
        tries = f"after {self.max_retries + 1} attempt(s)"
        status = e.status_code if isinstance(e, openai.APIStatusError) else None
        detail = _server_message(e) if isinstance(e, openai.APIStatusError) else str(e)
        if isinstance(e, openai.APITimeoutError):
            message = (
                f"{url} did not answer within {self.timeout:g} s {tries}; "
                "raise --timeout or check the server"
            )
        elif isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            if _is_connect_error(cause):
                message = (
                    f"cannot connect to {url} ({cause}) {tries}; "
                    "check that the server is running and --base-url is right"
                )
            else:
                message = (
                    f"the connection to {url} broke ({cause or 'no detail'}) {tries}; "
                    "check the server and try again"
                )
        elif isinstance(e, openai.AuthenticationError) and self.endpoint.api_key_env is None:
            message = (
                f"{url} needs an API key (HTTP 401): set {DEFAULT_KEY_ENV}, "
                "or name the variable holding it with --api-key-env"
            )
        elif isinstance(e, openai.AuthenticationError):
            message = (
                f"{url} refused the API key in {self.endpoint.api_key_env} (HTTP 401): "
                "check that it is valid for this server"
            )
        elif isinstance(e, openai.NotFoundError):
            message = (
                f"{url} answered 404 for model {self.endpoint.model!r}: pass --model with a "
                "model that server serves, and check that --base-url is its API root (often /v1)"
            )
        elif isinstance(e, openai.RateLimitError):
            message = (
                f"{url} kept answering 429 (rate limited) {tries}: {one_line(detail, 200)}; "
                "wait and try again, or raise --max-retries"
            )
        elif isinstance(e, openai.APIStatusError):
            message = f"{url} answered HTTP {e.status_code} {tries}: {one_line(detail)}"
        else:
            message = f"request to {url} failed: {one_line(str(e))}"
        return EndpointError(message, status=status, detail=detail)


PROBE_TIMEOUT_S = 3.0


def identify_server(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """What kind of server ``endpoint`` is, by what it says about itself: ``"llama.cpp"``
    when its ``/props`` answer has llama.cpp's ``default_generation_settings`` or its
    ``/v1/models`` entries are ``owned_by: llamacpp``; None when neither says so or the
    server does not answer within ``timeout`` seconds (the first real request then
    reports the problem).

    ``/props``: https://github.com/ggml-org/llama.cpp/tree/master/tools/server#get-props
    """
    import urllib.error
    import urllib.request

    root = endpoint.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {endpoint.api_key()}"}
    for url in (root.removesuffix("/v1") + "/props", root + "/models"):
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                body = json.loads(answer.read(1 << 20))
        except (urllib.error.URLError, OSError, ValueError):
            continue
        if not isinstance(body, dict):
            continue
        if "default_generation_settings" in body:
            return "llama.cpp"
        models = body.get("data")
        if isinstance(models, list) and any(
            isinstance(m, dict) and m.get("owned_by") == "llamacpp" for m in models
        ):
            return "llama.cpp"
    return None


def _is_connect_error(cause: BaseException | None) -> bool:
    """True when the connection could not be opened at all (refused, unknown host)."""
    try:
        import httpx2  # the openai SDK's transport
    except ImportError:  # pragma: no cover - an SDK on another transport
        return type(cause).__name__ == "ConnectError"
    return isinstance(cause, httpx2.ConnectError)


def _server_message(e: openai.APIStatusError) -> str:
    """The server's own error message: OpenAI-style bodies carry it in ``error.message``."""
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return e.message


# -- recording and replay ---------------------------------------------------------------

CallSink = Callable[[dict[str, Any]], None]
_SINK: contextvars.ContextVar[tuple[str, CallSink] | None] = contextvars.ContextVar(
    "pipeline_call_sink", default=None
)


def off_main_thread(produce: Callable[[], Iterator[T]]) -> Iterator[T]:
    """Yield what ``produce()`` yields; on the main thread, run it on a daemon thread.

    Python raises ``KeyboardInterrupt`` (Ctrl-C; SIGTERM in the CLI) in the main thread
    between any two bytecodes, including inside the HTTP stack right after it took one of
    its locks, which then stays held and hangs the clean-up that follows. Waiting here, on
    a queue, the interruption lands in this function instead; the request is left to the
    daemon thread, which dies with the process. The wait wakes every 0.1 s: a signal
    whose handler ran just before it blocked (after the interpreter last checked for
    signals) would otherwise be raised only when the request ends. Off the main thread
    (a batch's workers), ``produce()`` runs in place.

    Raises:
        whatever ``produce()`` raises, re-raised on the calling thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield from produce()
        return
    items: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def work() -> None:
        try:
            for item in produce():
                items.put((True, item))
        except BaseException as e:  # handed to the caller
            items.put((False, e))
        else:
            items.put((False, None))

    threading.Thread(target=work, name="pipeline-request", daemon=True).start()
    while True:
        try:
            more, item = items.get(timeout=0.1)
        except queue.Empty:
            continue  # a pending KeyboardInterrupt is raised here, at the loop's jump back
        if more:
            yield item
        elif item is None:
            return
        else:
            raise item


@contextlib.contextmanager
def calls_to(stage: str, sink: CallSink) -> Iterator[None]:
    """Within the block, every model call made by any client is passed to ``sink`` as a
    record of stage ``stage``: ``{stage, request_sha256, request, response | stream |
    error, usage, system_fingerprint}``. ``request`` is the canonical request (sorted
    keys when serialised): the base URL and every parameter sent, never credentials."""
    token = _SINK.set((stage, sink))
    try:
        yield
    finally:
        _SINK.reset(token)


def canonical_request(endpoint: Endpoint, request: dict[str, Any]) -> dict[str, Any]:
    """What identifies a call: the endpoint's base URL and the request body."""
    return {"base_url": endpoint.base_url, **request}


def request_sha256(endpoint: Endpoint, request: dict[str, Any]) -> str:
    """sha256 of the canonical request as sorted-key compact JSON."""
    body = json.dumps(
        canonical_request(endpoint, request),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def _record(endpoint: Endpoint, request: dict[str, Any], **outcome: Any) -> None:
    current = _SINK.get()
    if current is None:
        return
    stage, sink = current
    record: dict[str, Any] = {
        "stage": stage,
        "request_sha256": request_sha256(endpoint, request),
        "request": canonical_request(endpoint, request),
    }
    if "error" in outcome:
        e = outcome["error"]
        record["error"] = {"message": e.message, "status": e.status, "detail": e.detail}
    elif "stream" in outcome:
        record["stream"] = outcome["stream"]
        record["usage"] = outcome["stream"]["usage"]
        record["system_fingerprint"] = outcome["stream"]["system_fingerprint"]
    else:
        response = outcome["response"]
        record["response"] = response
        record["usage"] = response.get("usage")
        record["system_fingerprint"] = response.get("system_fingerprint")
    sink(record)


class Recording:
    """Recorded calls, answered by request hash in the order they were made.

    Args:
        records: call records as :func:`calls_to` produces them.
        source: what they come from (a run id), for error messages.
    """

    def __init__(self, records: list[dict[str, Any]], source: str) -> None:
        self.source = source
        self._by_hash: dict[str, collections.deque[dict[str, Any]]] = {}
        for record in records:
            self._by_hash.setdefault(record["request_sha256"], collections.deque()).append(record)
        self.answered = 0

    def take(self, endpoint: Endpoint, request: dict[str, Any]) -> dict[str, Any]:
        """The record answering this request.

        Raises:
            ReplayError: the recording holds no (further) answer to it.
        """
        digest = request_sha256(endpoint, request)
        queue = self._by_hash.get(digest)
        if not queue:
            current = _SINK.get()
            stage = current[0] if current else "unknown"
            raise ReplayError(
                f"the {stage} stage asked for a call that run {self.source} never made "
                f"(request sha256 {digest[:16]}...): the code, a template, a schema or a "
                "parameter changed since, so the run cannot be replayed as it was",
                stage=stage,
            )
        self.answered += 1
        return queue.popleft()


class ReplayClient(ModelClient):
    """A :class:`ModelClient` that answers from a :class:`Recording` and never touches the
    network: the same requests get the same responses, errors included."""

    def __init__(self, endpoint: Endpoint, recording: Recording) -> None:
        super().__init__(endpoint, max_retries=0)
        self.recording = recording

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        record = self.recording.take(self.endpoint, request)
        if "error" in record:
            error = record["error"]
            raise EndpointError(error["message"], status=error["status"], detail=error["detail"])
        return record

    def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        response: dict[str, Any] = self._answer(request)["response"]
        return response

    def _send_streaming(
        self, request: dict[str, Any], on_delta: Callable[[str], None] | None
    ) -> dict[str, Any]:
        streamed: dict[str, Any] = self._answer(request)["stream"]
        for piece in streamed["pieces"]:
            if on_delta:
                on_delta(piece)
        return streamed
