"""A generated turn in which the speaker may call tools: rounds of calls, then its answer.

A round is one model call that asks for tools, then the calls carried out
(:meth:`pipeline.tools.Toolbox.call`); its text and calls go back to the model
(:func:`pipeline.tools.result_messages`), which then answers or calls again, up to
``ToolParameters.max_rounds`` rounds, after which it is asked without tools. The turn's
transcript line holds every call with its result.

The calls the model chose are saved (``dialogue/pending-turn.json``) before they run, and
each result as it comes. A dialogue resumed after a crash goes on from there: it runs
only the calls still pending and never asks the model again for calls it already chose.

The tool-call dialect of an endpoint (``tools`` or ``prompt``) is the one asked for, else
the one that worked earlier in the run (``tool_dialects`` in ``run.json``), else ``tools``,
falling back to ``prompt`` when the server refuses ``tools``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .client import ChatResult, ModelClient, chat_body
from .errors import EndpointError
from .records import JSONObject, ToolCall, Usage, total_usage
from .tools import Toolbox, parse_prompt_calls, result_messages

if TYPE_CHECKING:
    from .stages import StageContext

PENDING = "dialogue/pending-turn.json"


@dataclass(frozen=True)
class Round:
    """One round of tool calls: what the model said with them, and the calls (each with
    its result or error once carried out)."""

    content: str
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class Answer:
    """A generated turn's outcome: the final answer, every tool call of the turn, and the
    tokens of every round (None when no call reported usage)."""

    result: ChatResult
    tool_calls: tuple[ToolCall, ...]
    usage: Usage | None
    chunks: int


def dialect(ctx: StageContext, client: ModelClient) -> str:
    """The tool-call dialect for ``client``'s endpoint in this run (see the module). In
    ``auto``, llama.cpp's servers (the embedded engine among them) get ``prompt``: they
    accept ``tools`` but silently ignore them when the model's chat template has no tool
    support, as the default model's has not."""
    asked = ctx.plan.tools.tool_calls
    if asked != "auto":
        return asked
    endpoint = client.endpoint
    remembered = (ctx.run.manifest.tool_dialects or {}).get(endpoint.base_url)
    if remembered:
        return remembered
    return "prompt" if endpoint.embedded or endpoint.server == "llama.cpp" else "tools"


def _remember(ctx: StageContext, client: ModelClient, used: str) -> None:
    manifest = ctx.run.manifest
    manifest.tool_dialects = {**(manifest.tool_dialects or {}), client.endpoint.base_url: used}


def generate(
    ctx: StageContext,
    client: ModelClient,
    messages: list[JSONObject],
    toolbox: Toolbox,
    turn: int,
    on_delta: Callable[[str], None],
) -> Answer:
    """Generate turn ``turn`` from ``messages``, its speaker offered ``toolbox``.

    Raises:
        EndpointError: the endpoint failed (a refusal of ``tools`` in ``auto`` falls back
            to the ``prompt`` dialect instead).
    """
    if not toolbox:
        result = _ask(ctx, client, messages, None, on_delta)
        return Answer(result, (), result.usage, result.chunks)
    used = dialect(ctx, client)
    rounds = _pending(ctx, turn)
    usages: list[Usage | None] = []
    chunks = 0
    while True:
        conversation = _with_rounds(messages, toolbox, used, rounds, ctx, turn)
        offer = len(rounds) < ctx.plan.tools.max_rounds
        try:
            tools = toolbox.specs() if offer and used == "tools" else None
            result = _ask(ctx, client, conversation, tools, on_delta)
        except EndpointError as e:
            if used == "tools" and ctx.plan.tools.tool_calls == "auto" and _refuses_tools(e):
                used = "prompt"
                continue
            raise
        usages.append(result.usage)
        chunks += result.chunks
        if used == "tools":
            text, calls = result.content, result.tool_calls
        elif offer:
            text, calls = parse_prompt_calls(result.content, f"call-{turn}-{len(rounds) + 1}")
        else:
            text, calls = result.content, ()
        if not calls or not offer:
            break
        rounds.append(Round(text, calls))
        _save(ctx, turn, rounds)  # the calls chosen, before any of them runs
    _remember(ctx, client, used)
    ctx.run.path(PENDING).unlink(missing_ok=True)
    made = tuple(call for r in rounds for call in r.calls)
    final = dataclasses.replace(result, content=text)
    return Answer(final, made, total_usage(usages), chunks)


def _ask(
    ctx: StageContext,
    client: ModelClient,
    messages: list[JSONObject],
    tools: list[JSONObject] | None,
    on_delta: Callable[[str], None],
) -> ChatResult:
    params = ctx.plan.dialogue
    body = chat_body(
        client.endpoint,
        messages,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        seed=params.seed,
        stream=True,
        tools=tools,
    )
    return client.stream(body, ctx.recorder, on_delta)


def _refuses_tools(e: EndpointError) -> bool:
    """True when the server refused the request's ``tools`` (a 400, 422 or 500 naming them)."""
    return e.status in (400, 422, 500) and "tool" in e.detail.lower()


def _with_rounds(
    messages: list[JSONObject],
    toolbox: Toolbox,
    used: str,
    rounds: list[Round],
    ctx: StageContext,
    turn: int,
) -> list[JSONObject]:
    """The messages of the next request: in the ``prompt`` dialect the tools described in
    the system prompt; then every round so far, its calls carried out first where a crash
    left them pending (each result saved as it comes)."""
    out = list(messages)
    if used == "prompt":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{toolbox.prompt_instructions()}"}
    made = 0
    for index, done in enumerate(rounds):
        calls = list(done.calls)
        for i, call in enumerate(calls):
            if call.result is None and call.error is None:
                calls[i] = toolbox.call(call, turn, made + i + 1)
                rounds[index] = Round(done.content, tuple(calls))
                _save(ctx, turn, rounds)
        made += len(calls)
        out += result_messages(used, done.content, calls)
    return out


def _pending(ctx: StageContext, turn: int) -> list[Round]:
    """The rounds of turn ``turn`` saved before a crash (only when resuming that turn)."""
    path = ctx.run.path(PENDING)
    if not ctx.resume or not path.is_file():
        return []
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("turn") != turn:
        return []
    return [Round(r["content"], tuple(ToolCall(**c) for c in r["calls"])) for r in saved["rounds"]]


def _save(ctx: StageContext, turn: int, rounds: list[Round]) -> None:
    ctx.run.write_json(
        PENDING,
        {
            "turn": turn,
            "rounds": [
                {"content": r.content, "calls": [c.to_json() for c in r.calls]} for r in rounds
            ],
        },
    )
