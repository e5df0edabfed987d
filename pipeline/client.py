"""The only place that talks to models: chat completions through the official ``openai`` client.

A request is plain data (a dict of Chat Completions parameters, never credentials)
built here, saved by the stage that sends it, then sent with
``client.chat.completions.create(**request)``. Retries for 408/409/429/5xx and
connection errors are the SDK's own (``max_retries``); what is left after them
becomes a one-line :class:`~pipeline.errors.EndpointError`.

API reference: https://platform.openai.com/docs/api-reference/chat/create
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import schemas
from .config import DEFAULT_KEY_ENV, Endpoint
from .errors import EndpointError, StructuredOutputError

if TYPE_CHECKING:  # the SDK is imported on first use, not at CLI start-up
    import openai

Message = dict[str, str]
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RETRIES = 2


@dataclass
class ChatResult:
    """One completed chat turn.

    Attributes:
        content: the assistant's text ("" when it said nothing).
        finish_reason: ``stop``, ``length``, ``content_filter``... as the API reported it.
        model: the model name the server reported (falls back to the one asked for).
        usage: ``{"prompt_tokens": int, "completion_tokens": int}`` when the server reported it.
    """

    content: str
    finish_reason: str | None
    model: str
    usage: dict[str, int] | None


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
        self, messages: list[Message], *, max_tokens: int, temperature: float
    ) -> dict[str, Any]:
        """A streaming Chat Completions request body for ``messages``."""
        return {
            "model": self.endpoint.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def structured_request(
        self,
        messages: list[Message],
        schema_name: str,
        *,
        max_tokens: int,
        temperature: float,
    ) -> dict[str, Any]:
        """A non-streaming request whose answer must be JSON satisfying ``schemas/<schema_name>``,
        asked for in the endpoint's structured-output dialect."""
        schema = schemas.load(schema_name)
        if self.endpoint.structured_output == "json_object":
            response_format: dict[str, Any] = {"type": "json_object", "schema": schema}
        else:
            response_format = {
                "type": "json_schema",
                "json_schema": {
                    "name": schema_name.split(".")[0].replace("-", "_"),
                    "schema": schema,
                },
            }
        return {
            "model": self.endpoint.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "response_format": response_format,
        }

    # -- sending ------------------------------------------------------------------

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send a non-streaming request; return the raw response as a JSON-ready dict.

        Raises:
            EndpointError: after the SDK's retries, with a one-line reason and fix.
        """
        import openai

        try:
            response = self.sdk.chat.completions.create(**request)
        except openai.APIError as e:
            raise self._explain(e) from e
        return response.model_dump(mode="json", exclude_none=True)

    def stream(
        self, request: dict[str, Any], on_delta: Callable[[str], None] | None = None
    ) -> ChatResult:
        """Send a streaming request, calling ``on_delta`` with each piece of text as it
        arrives; return the assembled turn.

        Raises:
            EndpointError: after the SDK's retries, with a one-line reason and fix.
        """
        import openai

        parts: list[str] = []
        finish_reason = None
        model = self.endpoint.model
        usage = None
        try:
            for chunk in self.sdk.chat.completions.create(**request):
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = {
                        "prompt_tokens": chunk.usage.prompt_tokens,
                        "completion_tokens": chunk.usage.completion_tokens,
                    }
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta else None
                    if text:
                        parts.append(text)
                        if on_delta:
                            on_delta(text)
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
        except openai.APIError as e:
            raise self._explain(e) from e
        return ChatResult("".join(parts), finish_reason, model, usage)

    def _explain(self, e: Exception) -> EndpointError:
        """Turn an SDK exception into a one-line error naming the endpoint and the fix."""
        import openai

        url = self.endpoint.base_url
        tries = f"after {self.max_retries + 1} attempt(s)"
        if isinstance(e, openai.APITimeoutError):
            message = (
                f"{url} did not answer within {self.timeout:g} s {tries}; "
                "raise --timeout or check the server"
            )
        elif isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            detail = f" ({cause})" if cause else ""
            message = (
                f"cannot connect to {url}{detail} {tries}; "
                "check that the server is running and --base-url is right"
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
                f"{url} answered 404 for model {self.endpoint.model!r}: "
                "pass --model with a model that server serves"
            )
        elif isinstance(e, openai.APIStatusError):
            message = f"{url} answered HTTP {e.status_code} {tries}: {_short(_server_message(e))}"
        else:
            message = f"request to {url} failed: {_short(str(e))}"
        return EndpointError(message)


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


def _short(text: str, limit: int = 300) -> str:
    one_line = " ".join(str(text).split())
    return one_line if len(one_line) <= limit else one_line[: limit - 3] + "..."


def parse_structured(response: dict[str, Any], schema_name: str) -> Any:
    """The JSON answer in a raw chat completion, validated against ``schemas/<schema_name>``.

    Raises:
        StructuredOutputError: no answer, a cut-off answer (``finish_reason == "length"``),
            a content-filter stop, a refusal, invalid JSON, or a schema violation;
            ``errors`` lists the validator's messages.
    """
    choices = response.get("choices") or []
    if not choices:
        raise StructuredOutputError("the model returned no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    if message.get("refusal"):
        raise StructuredOutputError(f"the model refused: {_short(message['refusal'])}")
    if finish == "content_filter":
        raise StructuredOutputError("the server's content filter stopped the answer")
    if finish == "length":
        raise StructuredOutputError(
            "the answer was cut off at the token limit (finish_reason=length) "
            "before the JSON was complete"
        )
    content = message.get("content") or ""
    try:
        value = json.loads(content)
    except json.JSONDecodeError as e:
        raise StructuredOutputError(
            f"the answer is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
            errors=[f"$: {e.msg} at line {e.lineno} column {e.colno}"],
        ) from e
    problems = schemas.errors(value, schema_name)
    if problems:
        shown = "; ".join(problems[:3]) + (
            f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        )
        raise StructuredOutputError(
            f"the answer does not match {schema_name}: {shown}", errors=problems
        )
    return value
