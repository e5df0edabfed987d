"""The only place that talks to models: chat completions through the official ``openai`` client.

A request body is plain data (Chat Completions parameters, never credentials) built by
:func:`chat_body`. A :class:`ModelClient` sends it through a :class:`Transport`: over HTTP
with the SDK (:class:`HTTPTransport`), or, in a replay, from a recording
(:class:`pipeline.replay.ReplayTransport`). Every exchange becomes one
:class:`~pipeline.records.CallRecord`, handed to the recorder the caller passes in (a
stage's :class:`pipeline.recorder.StageCalls`). Retries for 408/409/429/5xx and connection
errors are the SDK's own (``max_retries``); what is left after them becomes a one-line
:class:`~pipeline.errors.EndpointError`.

API reference: https://platform.openai.com/docs/api-reference/chat/create
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .endpoints import DEFAULT_KEY_ENV, Endpoint
from .errors import EndpointError, Fix, one_line
from .parameters import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S
from .records import (
    CallError,
    CallRecord,
    JSONObject,
    Streamed,
    ToolCall,
    Usage,
    sha256_of,
    timestamp,
)
from .threads import off_main_thread

if TYPE_CHECKING:  # the SDK is imported on first use, not at CLI start-up
    import openai

Message = JSONObject  # a chat message: role, content and, for tool calls, more
Recorder = Callable[[CallRecord], None]
DeltaSink = Callable[[str], None]


@dataclass(frozen=True)
class ChatResult:
    """One completed chat turn.

    Attributes:
        content: the assistant's text ("" when it said nothing).
        finish_reason: ``stop``, ``length``, ``content_filter``... as the API reported it.
        model: the model name the server reported (falls back to the one asked for).
        usage: the tokens, when the server reported them.
        chunks: how many streamed pieces carried text (about one token each on llama.cpp
            servers; a stand-in for ``completion_tokens`` when usage is not reported).
        time: when the answer was complete (ISO 8601 UTC), as recorded.
        tool_calls: the tool calls the model made (``finish_reason`` ``tool_calls``).
    """

    content: str
    finish_reason: str | None
    model: str
    usage: Usage | None
    chunks: int = 0
    time: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


def chat_body(
    endpoint: Endpoint,
    messages: list[Message],
    *,
    max_tokens: int,
    temperature: float,
    seed: int | None = None,
    stream: bool = False,
    response_format: JSONObject | None = None,
    tools: list[JSONObject] | None = None,
) -> JSONObject:
    """A Chat Completions request body for ``messages`` (no credentials): the endpoint's
    extra ``params`` override the sampling parameters given here; a streaming body asks
    for the usage in the last chunk; ``tools`` are OpenAI function tools
    (``{"type": "function", "function": {name, description, parameters}}``)."""
    body: JSONObject = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        **({"seed": seed} if seed is not None else {}),
        **endpoint.params,
        "model": endpoint.model,
        "messages": messages,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if response_format is not None:
        body["response_format"] = response_format
    if tools:
        body["tools"] = tools
    return body


def canonical(endpoint: Endpoint, body: JSONObject) -> tuple[JSONObject, str]:
    """The canonical request of ``body`` at ``endpoint`` (``{"base_url", **body}``) and
    its sha256, by which a recording (:mod:`pipeline.replay`) or a provider batch
    (:mod:`pipeline.batchapi`) answers it."""
    request = {"base_url": endpoint.base_url, **body}
    return request, sha256_of(request)


class Transport(Protocol):
    """Carries one canonical request (``{"base_url", **body}``) to a model and back."""

    def send(
        self, request: JSONObject, digest: str, *, stream: bool, on_delta: DeltaSink | None
    ) -> CallRecord:
        """The call's record (its ``stage`` left empty), with the times the call was sent
        and answered (a replay's are the recorded ones). For a streaming request,
        ``on_delta`` gets each piece of text as it comes.

        Raises:
            EndpointError: the call failed (the caller records it).
        """
        ...


class ModelClient:
    """Chat completions against one :class:`~pipeline.endpoints.Endpoint`.

    Args:
        endpoint: where to send requests.
        transport: how; by default over HTTP with the SDK.
        timeout: seconds to wait for each HTTP request (the SDK's ``timeout``).
        max_retries: retries the SDK makes on 408/409/429/5xx and connection errors.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        transport: Transport | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self.endpoint = endpoint
        self.transport: Transport = transport or HTTPTransport(
            endpoint, timeout=timeout, max_retries=max_retries
        )

    def complete(self, body: JSONObject, record: Recorder) -> CallRecord:
        """Send a non-streaming request; return its record (``response`` is the raw
        completion). ``record`` gets the record, failed calls included.

        Raises:
            EndpointError: after the SDK's retries, with a one-line reason and fix.
        """
        return self._exchange(body, record, stream=False, on_delta=None)

    def stream(
        self, body: JSONObject, record: Recorder, on_delta: DeltaSink | None = None
    ) -> ChatResult:
        """Send a streaming request, calling ``on_delta`` with each piece of text as it
        arrives; return the assembled turn. ``record`` gets the call's record.

        Raises:
            EndpointError: after the SDK's retries, with a one-line reason and fix.
        """
        call = self._exchange(body, record, stream=True, on_delta=on_delta)
        streamed = call.stream or Streamed([])
        return ChatResult(
            streamed.content,
            streamed.finish_reason,
            streamed.model or self.endpoint.model,
            Usage.from_json(streamed.usage),
            len(streamed.pieces),
            call.time,
            streamed.tool_calls,
        )

    def _exchange(
        self, body: JSONObject, record: Recorder, *, stream: bool, on_delta: DeltaSink | None
    ) -> CallRecord:
        request, digest = canonical(self.endpoint, body)
        started = timestamp()
        try:
            call = self.transport.send(request, digest, stream=stream, on_delta=on_delta)
        except EndpointError as e:
            error = CallError(e.message, e.status, e.detail)
            record(CallRecord(request, digest, error=error, time=timestamp(), started=started))
            raise
        record(call)
        if call.error is not None:  # a recorded failure, replayed
            raise EndpointError(
                call.error.message, status=call.error.status, detail=call.error.detail
            )
        return call


class HTTPTransport:
    """Requests over HTTP with the official SDK, which makes the retries.

    Args:
        endpoint: the server and the key's environment variable.
        timeout: seconds to wait for each HTTP request.
        max_retries: the SDK's retries.
    """

    def __init__(self, endpoint: Endpoint, *, timeout: float, max_retries: int) -> None:
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

    def send(
        self, request: JSONObject, digest: str, *, stream: bool, on_delta: DeltaSink | None
    ) -> CallRecord:
        import openai

        started = timestamp()  # the call's span starts here (pipeline.telemetry)
        body = {k: v for k, v in request.items() if k != "base_url"}

        def answers() -> Iterator[Any]:
            try:
                create = self.sdk.chat.completions.create
                created = create(**_sdk_arguments(create, body))
                if stream:
                    yield from created
                else:
                    yield created
            except openai.APIError as e:
                raise self._explain(e) from e

        if not stream:
            (response,) = off_main_thread(answers)
            dumped: JSONObject = response.model_dump(mode="json", exclude_none=True)
            return CallRecord.answered(request, digest, dumped, time=timestamp(), started=started)
        streamed = _assemble(off_main_thread(answers), on_delta)
        return CallRecord(
            request,
            digest,
            stream=streamed,
            usage=streamed.usage,
            system_fingerprint=streamed.system_fingerprint,
            time=timestamp(),
            started=started,
        )

    def refused(self, what: str, e: Exception, api: str) -> EndpointError:
        """One line for an SDK error from a call to one of the API's resources (files,
        fine-tuning jobs, batches) doing ``what``: the server's message for a request it
        refused (400, 404...; a 404 says to check that the base URL is the root of a
        server with ``api``, e.g. "a Batch API"), else as :meth:`_explain` (time-outs,
        connection failures, keys refused, rate limits, server errors)."""
        import openai

        status = e.status_code if isinstance(e, openai.APIStatusError) else None
        if (
            isinstance(e, openai.APIStatusError)
            and status is not None
            and status < 500
            and not isinstance(e, openai.AuthenticationError | openai.RateLimitError)
        ):
            detail = _server_message(e)
            fix = None
            if isinstance(e, openai.NotFoundError):
                fix = Fix(
                    f"check that {{}} is the API root of a server with {api} (often ending in /v1)",
                    ("base_url",),
                )
            return EndpointError(
                f"{self.endpoint.base_url} refused {what} (HTTP {status}): {one_line(detail)}",
                status=status,
                detail=detail,
                fix=fix,
            )
        explained = self._explain(e)
        return EndpointError(
            f"{what} failed: {explained.problem}",
            status=explained.status,
            detail=explained.detail,
            fix=explained.fixes,
        )

    def _explain(self, e: Exception) -> EndpointError:
        """Turn an SDK exception into a one-line error naming the endpoint and the fix."""
        import openai

        url = self.endpoint.base_url
        tries = f"after {self.max_retries + 1} attempt(s)"
        status = e.status_code if isinstance(e, openai.APIStatusError) else None
        detail = _server_message(e) if isinstance(e, openai.APIStatusError) else str(e)
        fix = None
        if isinstance(e, openai.APITimeoutError):
            message = f"{url} did not answer within {self.timeout:g} s {tries}"
            fix = Fix("raise {} or check the server", ("timeout",))
        elif isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            if _is_connect_error(cause):
                message = f"cannot connect to {url} ({cause}) {tries}"
                fix = Fix("check that the server is running and {} is right", ("base_url",))
            else:
                message = (
                    f"the connection to {url} broke ({cause or 'no detail'}) {tries}; "
                    "check the server and try again"
                )
        elif isinstance(e, openai.AuthenticationError) and self.endpoint.api_key_env is None:
            message = f"{url} needs an API key (HTTP 401)"
            fix = Fix(
                f"set {DEFAULT_KEY_ENV}, or name the variable holding it with {{}}",
                ("api_key_env",),
            )
        elif isinstance(e, openai.AuthenticationError):
            message = (
                f"{url} refused the API key in {self.endpoint.api_key_env} (HTTP 401): "
                "check that it is valid for this server"
            )
        elif isinstance(e, openai.NotFoundError):
            message = f"{url} answered 404 for model {self.endpoint.model!r}"
            fix = Fix(
                "pass {} with a model that server serves, and check that {} is its API root "
                "(often /v1)",
                ("model", "base_url"),
            )
        elif isinstance(e, openai.RateLimitError):
            message = f"{url} kept answering 429 (rate limited) {tries}: {one_line(detail, 200)}"
            fix = Fix("wait and try again, or raise {}", ("max_retries",))
        elif isinstance(e, openai.APIStatusError):
            message = f"{url} answered HTTP {e.status_code} {tries}: {one_line(detail)}"
        else:
            message = f"request to {url} failed: {one_line(str(e))}"
        return EndpointError(message, status=status, detail=detail, fix=fix)


_SDK_OPTIONS = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})


def _sdk_arguments(create: Callable[..., Any], body: JSONObject) -> dict[str, Any]:
    """``body`` as the keyword arguments of the SDK's ``create``: the fields it names as
    parameters, and any other (a server's own, as llama.cpp's ``grammar`` or ``top_k``,
    from an endpoint's ``params``) in ``extra_body``, which the SDK sends in the same JSON
    body. The SDK refuses a keyword argument it does not name."""
    named = set(inspect.signature(create).parameters) - _SDK_OPTIONS
    arguments = {k: v for k, v in body.items() if k in named}
    extra = {k: v for k, v in body.items() if k not in named}
    return {**arguments, "extra_body": extra} if extra else arguments


def _assemble(chunks: Iterator[Any], on_delta: DeltaSink | None) -> Streamed:
    """The streamed answer from the SDK's chunks, passing each piece of text on; a tool
    call's id, name and argument pieces come in chunks that name it by its ``index``."""
    pieces: list[str] = []
    finish_reason = model = fingerprint = None
    usage: dict[str, int] | None = None
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        model = chunk.model or model
        fingerprint = getattr(chunk, "system_fingerprint", None) or fingerprint
        if chunk.usage is not None:
            usage = {
                "prompt_tokens": chunk.usage.prompt_tokens,
                "completion_tokens": chunk.usage.completion_tokens,
            }
        for choice in chunk.choices:
            text = choice.delta.content if choice.delta else None
            if text:
                pieces.append(text)
                if on_delta:
                    on_delta(text)
            for delta in (choice.delta.tool_calls if choice.delta else None) or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function is not None:
                    call["name"] = delta.function.name or call["name"]
                    call["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finish_reason = choice.finish_reason
    tool_calls = tuple(ToolCall(**calls[index]) for index in sorted(calls))
    return Streamed(pieces, finish_reason, model, usage, fingerprint, tool_calls)


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
