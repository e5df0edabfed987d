"""Structured output: how to ask an OpenAI-compatible server for JSON that fits a schema.

Servers differ in what they accept, and some silently ignore a schema, so the
project picks a *dialect* per endpoint and always validates the answer itself:

``json_schema``
    OpenAI's ``response_format={"type": "json_schema", "json_schema": {"name", "schema",
    "strict": true}}`` (OpenAI, vLLM, llama.cpp's llama-server, Ollama, LM Studio,
    OpenRouter). The schema is sent in one of two *forms*: the strict form
    (:func:`strict_schema`, https://platform.openai.com/docs/guides/structured-outputs),
    or, for llama.cpp's server (:data:`GRAMMAR_SERVERS`), the grammar form
    (:func:`grammar_schema`): llama.cpp turns the schema into a grammar that enforces
    ``minLength``/``maxLength``, ``enum``, ``const``, ``minItems``/``maxItems`` and closed
    objects, but not the long ``pattern`` the strict form makes of a length bound, so a
    small model would run on to its token limit.
``json_object``
    ``{"type": "json_object", "schema": ...}`` (llama.cpp's servers, llama-cpp-python's
    among them, which answers 500 to ``json_schema``); the schema becomes a grammar there.
``prompt``
    No ``response_format``; the schema is written into the prompt (for servers that
    ignore ``response_format``, such as Anthropic's OpenAI-compatible API).
``auto``
    The dialect known for the endpoint, else ``json_schema`` falling back to
    ``json_object`` then ``prompt`` when the server rejects the response format.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from . import templates
from .choices import STRUCTURED_OUTPUT_CHOICES
from .errors import EndpointError, Fix, StructuredOutputError, one_line
from .records import Attempt, CallRecord, JSONObject, Usage
from .schemas import Schema

if TYPE_CHECKING:
    from .client import Message, ModelClient
    from .endpoints import Endpoint
    from .records import Manifest

AUTO, *_dialects = STRUCTURED_OUTPUT_CHOICES
DIALECTS = tuple(_dialects)  # json_schema, json_object, prompt: the order auto tries them

# Keywords OpenAI's strict mode accepts; anything else is dropped from the strict form.
# https://platform.openai.com/docs/guides/structured-outputs#supported-schemas
STRICT_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "enum", "const",
        "anyOf", "$ref", "$defs", "description", "title", "pattern", "format",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
        "minItems", "maxItems",
    }
)  # fmt: skip
KNOWN_HOSTS = {"api.openai.com": "json_schema", "api.anthropic.com": "prompt"}
GRAMMAR_SERVERS = frozenset({"llama.cpp"})  # servers that get the grammar form
STRICT_FORM, GRAMMAR_FORM = "strict", "grammar"


def dialect_plan(
    requested: str,
    *,
    base_url: str,
    embedded: bool,
    remembered: str | None = None,
    server: str | None = None,
) -> list[str]:
    """The dialects to try, in order, for one endpoint.

    Args:
        requested: ``auto`` or one of :data:`DIALECTS`.
        base_url: the endpoint's API root.
        embedded: True for the embedded engine (llama.cpp's server).
        remembered: the dialect that already worked for this endpoint in this run.
        server: the kind of server, when known (``"llama.cpp"``).

    Returns:
        A single dialect when it is explicit or known; otherwise ``json_schema``,
        ``json_object``, ``prompt`` to try in turn.
    """
    if requested != AUTO:
        return [requested]
    if remembered:
        return [remembered]
    if embedded or server in GRAMMAR_SERVERS:
        return ["json_schema"]
    known = KNOWN_HOSTS.get(urlparse(base_url).hostname or "")
    return [known] if known else list(DIALECTS)


def schema_form(server: str | None) -> str:
    """``"grammar"`` for a server that turns schemas into llama.cpp grammars, else
    ``"strict"`` (see the module docstring)."""
    return GRAMMAR_FORM if server in GRAMMAR_SERVERS else STRICT_FORM


def plan_in_run(endpoint: Endpoint, manifest: Manifest) -> list[str]:
    """:func:`dialect_plan` for ``endpoint`` within a run whose manifest is ``manifest``:
    the dialect that already worked for the endpoint there (see :func:`remember_in_run`)
    comes first."""
    return dialect_plan(
        endpoint.structured_output,
        base_url=endpoint.base_url,
        embedded=endpoint.embedded,
        remembered=(manifest.dialects or {}).get(endpoint.base_url),
        server=endpoint.server,
    )


def remember_in_run(endpoint: Endpoint, manifest: Manifest, dialect: str) -> None:
    """Record in ``manifest`` (under ``dialects``, by base URL) that ``dialect`` worked for
    ``endpoint``, so that the rest of the run asks in it at once."""
    manifest.dialects = {**(manifest.dialects or {}), endpoint.base_url: dialect}


def strict_schema(schema: JSONObject) -> JSONObject:
    """The strict-mode form of ``schema``: every object closed (``additionalProperties:
    false``) with every property required (optional ones become nullable), unsupported
    keywords dropped, and string lengths (``minLength``/``maxLength``) turned into a
    ``pattern`` so the bound survives. The input is not modified."""
    strict: JSONObject = _strict(copy.deepcopy(schema), root=True)
    return strict


def _strict(node: Any, *, root: bool = False) -> Any:
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: JSONObject = {}
    for key, value in node.items():
        if key in ("properties", "$defs"):
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "anyOf", "additionalProperties") and isinstance(value, (dict, list)):
            out[key] = _strict(value)
        elif key in STRICT_KEYWORDS:
            out[key] = value
    if ("minLength" in node or "maxLength" in node) and "pattern" not in out:
        low, high = node.get("minLength", 0), node.get("maxLength", "")
        out["pattern"] = f"^[\\s\\S]{{{low},{high}}}$"
    if "oneOf" in node:  # strict mode knows anyOf, not oneOf
        out["anyOf"] = _strict(node["oneOf"])
    if "prefixItems" in node:  # nor prefixItems: any of the positions' schemas
        out["items"] = {"anyOf": _strict(node["prefixItems"])}
    if out.get("type") == "object" or "properties" in out:
        properties = out.setdefault("properties", {})
        required = set(node.get("required", []))
        for name, sub in properties.items():
            if name not in required:
                properties[name] = {"anyOf": [sub, {"type": "null"}]}
        out["required"] = list(properties)
        out["additionalProperties"] = False
    return out


GRAMMAR_MAX_LENGTH = 1000


def grammar_safe(schema: JSONObject) -> JSONObject:
    """``schema`` with every ``maxLength`` capped at 1000: llama.cpp's grammar engine, which
    turns a ``json_object`` schema into a grammar, refuses longer repetitions. The answer is
    still validated against the uncapped schema."""

    def cap(node: Any) -> Any:
        if isinstance(node, list):
            return [cap(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: cap(value) for key, value in node.items()}
        if isinstance(out.get("maxLength"), int):
            out["maxLength"] = min(out["maxLength"], GRAMMAR_MAX_LENGTH)
        return out

    capped: JSONObject = cap(schema)
    return capped


CHARS_PER_TOKEN = 2  # low for English and code (about 4), so a rambling answer still fits


def grammar_schema(schema: JSONObject, max_tokens: int | None = None) -> JSONObject:
    """The grammar form of ``schema`` for llama.cpp's server: the schema itself, less the
    annotations a grammar has no use for (``$schema``, ``$id``, ``title``,
    ``description``), with every object closed. The input is not modified.

    With ``max_tokens``, every bounded string's ``maxLength`` is also capped at an equal
    share of what fits in that many tokens (:data:`CHARS_PER_TOKEN` characters per token,
    shared equally among the answer's strings, arrays counted at their ``maxItems``; never
    below the string's ``minLength``). The grammar then keeps a small model from running
    past the token limit inside one string, while the schema file keeps bounds that fit a
    capable model's answer. Every ``maxLength`` is also kept within
    :data:`GRAMMAR_MAX_LENGTH`, past which llama.cpp's grammars were seen not to hold it."""
    cap = None
    if max_tokens is not None:
        cap = max_tokens * CHARS_PER_TOKEN // max(1, _bounded_strings(schema))

    def strip(node: Any, *, in_properties: bool = False) -> Any:
        if isinstance(node, list):
            return [strip(item) for item in node]
        if not isinstance(node, dict):
            return node
        if in_properties:  # keys here are property names, not keywords
            return {name: strip(sub) for name, sub in node.items()}
        out = {
            key: strip(value, in_properties=key in ("properties", "$defs"))
            for key, value in node.items()
            if key not in ("$schema", "$id", "title", "description")
        }
        if out.get("type") == "object":
            out.setdefault("additionalProperties", False)
        if isinstance(out.get("maxLength"), int):
            bound = min(out["maxLength"], GRAMMAR_MAX_LENGTH, cap or GRAMMAR_MAX_LENGTH)
            out["maxLength"] = max(bound, out.get("minLength", 0))
        return out

    stripped: JSONObject = strip(schema)
    return stripped


def _bounded_strings(node: Any, times: int = 1) -> int:
    """How many strings an instance of ``node`` holds at most (pinned ones included, so
    that narrowing a schema does not raise the share of the others)."""
    if isinstance(node, list):
        return sum(_bounded_strings(item, times) for item in node)
    if not isinstance(node, dict):
        return 0
    count = times if node.get("type") == "string" else 0
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            count += sum(_bounded_strings(sub, times) for sub in value.values())
        elif key == "items":
            count += _bounded_strings(value, times * int(node.get("maxItems", 1)))
        elif key == "prefixItems":
            count += sum(_bounded_strings(sub, times) for sub in value)
        elif key in ("anyOf", "oneOf"):
            count += max((_bounded_strings(sub, times) for sub in value), default=0)
    return count


def response_format(
    dialect: str, schema: Schema, server: str | None = None, max_tokens: int | None = None
) -> JSONObject | None:
    """The ``response_format`` request member for ``dialect`` (None for ``prompt``), with
    the schema in the form that ``server`` enforces (:func:`schema_form`; the grammar form
    fitted to ``max_tokens``)."""
    if dialect == "json_schema":
        form = schema_form(server)
        return {
            "type": "json_schema",
            "json_schema": {
                "name": re.sub(r"[^A-Za-z0-9_-]", "_", schema.name.removesuffix(".schema.json")),
                "schema": (
                    grammar_schema(schema.document, max_tokens)
                    if form == GRAMMAR_FORM
                    else strict_schema(schema.document)
                ),
                "strict": True,
            },
        }
    if dialect == "json_object":
        return {"type": "json_object", "schema": grammar_safe(schema.document)}
    if dialect == "prompt":
        return None
    raise ValueError(f"unknown structured-output dialect {dialect!r}")


def schema_instructions(schema: Schema) -> str:
    """The text that asks for JSON in the ``prompt`` dialect (``templates/structured.j2``)."""
    schema_text = json.dumps(schema.document, indent=2, ensure_ascii=False)
    return templates.render("structured.j2", schema=schema_text)


def repair_request(problems: list[str]) -> str:
    """The follow-up message, after the unusable answer itself, that sends a model that
    answer's problems (``templates/repair.j2``), as instructor's re-ask does."""
    return templates.render("repair.j2", problems=problems)


def budget_request(max_tokens: int) -> str:
    """The note added to the request when an answer was cut off at ``max_tokens`` tokens
    (``templates/budget.j2``)."""
    return templates.render("budget.j2", max_tokens=max_tokens)


_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(.*?)\n\s*```\s*$", re.DOTALL)


Check = Callable[[Any], list[str]]


def parse(response: JSONObject, schema: Schema, *, dialect: str, check: Check | None = None) -> Any:
    """The JSON answer in a raw chat completion, validated against ``schema``
    (Draft 2020-12), then by ``check`` (problems a schema cannot express, as
    ``"<json path>: <message>"``). In the ``prompt`` dialect a surrounding Markdown code
    fence is removed. Control characters inside strings (a raw newline) are accepted: the
    answer is otherwise valid, and a model asked again tends to repeat them.

    Raises:
        StructuredOutputError: with ``kind`` ``"no_answer"``, ``"refusal"``,
            ``"content_filter"`` (final: repairing cannot help), ``"length"`` (cut off:
            worth one shorter re-ask), or ``"invalid_json"``, ``"schema"``, ``"semantic"``
            (repairable); ``errors`` lists the problems.
    """
    choices = response.get("choices") or []
    if not choices:
        raise StructuredOutputError("the model returned no choices", kind="no_answer")
    choice = choices[0]
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    if message.get("refusal"):
        raise StructuredOutputError(
            f"the model refused: {one_line(message['refusal'])}", kind="refusal"
        )
    if finish == "content_filter":
        raise StructuredOutputError(
            "the server's content filter stopped the answer", kind="content_filter"
        )
    if finish == "length":
        raise StructuredOutputError(
            "the answer was cut off at the token limit (finish_reason=length) "
            "before the JSON was complete",
            kind="length",
        )
    content = message.get("content") or ""
    if dialect == "prompt" and (fenced := _FENCE.match(content)):
        content = fenced.group(1)
    try:
        value = json.loads(content, strict=False)
    except json.JSONDecodeError as e:
        problem = f"$: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        raise StructuredOutputError(
            f"the answer is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
            errors=[problem],
            kind="invalid_json",
        ) from e
    problems = schema.errors(value)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise StructuredOutputError(
            f"the answer does not match {schema.name}: {'; '.join(problems[:3])}{more}",
            errors=problems,
            kind="schema",
        )
    problems = check(value) if check else []
    if problems:
        raise StructuredOutputError(
            f"the answer is unusable: {'; '.join(problems[:3])}",
            errors=problems,
            kind="semantic",
        )
    return value


# -- asking until the answer is usable ------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """A request for a structured answer.

    Attributes:
        messages: the conversation to answer.
        schema: what the answer must satisfy.
        max_tokens, temperature, seed: sampling (``seed`` None: none sent).
        dialects: the dialects to try, in order, while the server rejects one
            (:func:`dialect_plan`).
        repair_attempts: how many times an unusable answer is sent back.
        check: problems a schema cannot express (``"<json path>: <message>"`` each).
        narrow: after a ``check`` problem, the schema of the re-ask: a subset of the schema
            that rules the problem out, which a grammar-enforcing server then enforces.
    """

    messages: list[Message]
    schema: Schema
    max_tokens: int
    temperature: float
    dialects: list[str]
    repair_attempts: int
    seed: int | None = None
    check: Check | None = None
    narrow: Callable[[Any, Schema], Schema] | None = None


@dataclass(frozen=True)
class StructuredResult:
    """A validated structured answer.

    Attributes:
        value: the parsed JSON, valid against the schema.
        dialect: the dialect that produced it.
        attempts: how many requests were sent.
        record: the call that produced it.
        usage: the tokens of every attempt, summed.
    """

    value: Any
    dialect: str
    attempts: int
    record: CallRecord
    usage: Usage


class AttemptLog(Protocol):
    """Receives each attempt as it happens: its request body before it is sent, its call
    once answered (or failed), then its outcome."""

    def sending(self, number: int, body: JSONObject) -> None: ...

    def call(self, number: int, record: CallRecord) -> None: ...

    def outcome(self, attempt: Attempt) -> None: ...


def _for_dialect(messages: list[Message], dialect: str, schema: Schema) -> list[Message]:
    """In the ``prompt`` dialect, the schema instructions are added to the last user message."""
    return _noted(messages, schema_instructions(schema)) if dialect == "prompt" else messages


def _noted(messages: list[Message], note: str) -> list[Message]:
    """``messages`` with ``note`` added, as a new paragraph, to the last user message."""
    out = list(messages)
    for i in range(len(out) - 1, -1, -1):
        if out[i]["role"] == "user":
            out[i] = {**out[i], "content": f"{out[i]['content']}\n\n{note}"}
            break
    return out


def _body(
    endpoint: Endpoint,
    question: Question,
    conversation: list[Message],
    dialect: str,
    schema: Schema,
) -> JSONObject:
    """The request body of one attempt at ``question``: ``conversation`` so far, in
    ``dialect``, for ``schema``."""
    from .client import chat_body

    return chat_body(
        endpoint,
        conversation,
        max_tokens=question.max_tokens,
        temperature=question.temperature,
        seed=question.seed,
        response_format=response_format(dialect, schema, endpoint.server, question.max_tokens),
    )


def first_body(endpoint: Endpoint, question: Question) -> JSONObject:
    """The body of the first request :func:`ask` sends for ``question`` at ``endpoint``
    (its first dialect; no repair yet): what a provider batch can answer ahead of time."""
    dialect = question.dialects[0]
    conversation = _for_dialect(list(question.messages), dialect, question.schema)
    return _body(endpoint, question, conversation, dialect, question.schema)


def ask(client: ModelClient, question: Question, log: AttemptLog) -> StructuredResult:
    """Ask ``client`` for JSON satisfying ``question.schema`` and return it validated.

    Tries the dialects in order while the server rejects the response format; re-asks up
    to ``repair_attempts`` times when the answer is not valid JSON, breaks the schema, or
    has ``check`` problems, sending back the answer and the problems (after a ``check``
    problem, with the schema ``narrow`` gives). An answer cut off at ``max_tokens`` is
    asked again once, with a note stating the budget. ``log`` sees every attempt.

    Raises:
        StructuredOutputError: the last attempt's answer was unusable, or the answer was
            filtered, refused, or cut off twice (asking again cannot help).
        EndpointError: the endpoint failed, or rejected the last dialect to try.
    """
    endpoint = client.endpoint
    plan = list(question.dialects)
    dialect = plan.pop(0)
    schema = question.schema
    conversation = _for_dialect(list(question.messages), dialect, schema)
    repairs_left = question.repair_attempts
    budget_noted = False
    usage = Usage()
    number = 0
    while True:
        number += 1
        body = _body(endpoint, question, conversation, dialect, schema)
        log.sending(number, body)
        try:
            record = client.complete(body, functools.partial(log.call, number))
        except EndpointError as e:
            rejected = e.rejects_response_format
            log.outcome(Attempt(number, dialect, "rejected" if rejected else "error", [e.message]))
            if rejected and plan:
                dialect = plan.pop(0)
                conversation = _for_dialect(conversation, dialect, schema)
                continue
            if rejected:
                raise EndpointError(
                    f"{endpoint.base_url} rejected the {dialect} response format "
                    f"(HTTP {e.status}: {one_line(e.detail, 200)})",
                    status=e.status,
                    detail=e.detail,
                    fix=Fix("use {} auto or another dialect", ("structured_output",)),
                ) from e
            raise
        response = record.response or {}
        usage = usage + Usage.from_json(response.get("usage"))
        try:
            value = parse(response, schema, dialect=dialect, check=question.check)
        except StructuredOutputError as e:
            log.outcome(Attempt(number, dialect, e.kind, e.errors or [e.message]))
            if e.kind == "length" and not budget_noted:
                budget_noted = True
                conversation = _noted(conversation, budget_request(question.max_tokens))
                continue
            if not e.repairable or repairs_left == 0:
                raise
            repairs_left -= 1
            answer = response["choices"][0]["message"].get("content") or ""
            if e.kind == "semantic" and question.narrow is not None:
                schema = question.narrow(json.loads(answer, strict=False), schema)
            conversation = [
                *conversation,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": repair_request(e.errors)},
            ]
            continue
        log.outcome(Attempt(number, dialect, "ok", []))
        return StructuredResult(value, dialect, number, record, usage)
