"""Tools a role may call, and the two ways of offering them to a model (tool-call dialects).

``tools``
    OpenAI function calling: the request carries ``tools=[{"type": "function",
    "function": {name, description, parameters}}]``; the answer's ``tool_calls`` (streamed
    in pieces by ``index``, assembled by :mod:`pipeline.client`) name the tool and give its
    arguments as JSON text; each result goes back as ``{"role": "tool", "tool_call_id",
    "content"}`` after the assistant message that holds the calls.
    https://platform.openai.com/docs/guides/function-calling
``prompt``
    For servers and models without tool calling: the tools are described in the system
    prompt (``templates/tools.j2``); the model writes
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and stops; the results come
    back as the next user message (``templates/tool-results.j2``).

Whatever goes wrong with a call (an unknown tool, arguments that are not JSON or break the
tool's schema, a tool that raises) becomes the call's ``error``, which the model is shown
as the result: a tool never ends the run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import templates
from .records import JSONObject, ToolCall

TOOL_DIALECTS = ("tools", "prompt")
OFFERED = "dialogue/tools.json"  # what each role was offered (see offered)
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ToolError(Exception):
    """Raised by a tool whose call failed; its message is shown to the model."""


@dataclass(frozen=True)
class ToolUse:
    """Where a call is made: the call, the turn, and its place among the turn's calls
    (1-based, across rounds): what a tool needs to name what it makes after the call."""

    call: ToolCall
    turn: int
    index: int


@dataclass(frozen=True)
class Tool:
    """A function a role may call.

    Attributes:
        name: what the model calls it (letters, digits, ``_`` and ``-``).
        description: what it does and when to use it, for the model.
        parameters: the JSON Schema of its arguments (an object schema).
        run: the function: the arguments, checked against ``parameters``, and the
            :class:`ToolUse` in; the result as text out; raises :class:`ToolError` (or
            anything) when it fails.
        source: where it comes from: ``delegate``, or ``mcp:SERVER``.
    """

    name: str
    description: str
    parameters: JSONObject
    run: Callable[[dict[str, Any], ToolUse], str]
    source: str = ""

    def spec(self) -> JSONObject:
        """The tool as the ``tools`` dialect offers it."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class Toolbox:
    """The tools offered to one role, and the one place their calls are carried out."""

    def __init__(self, tools: Sequence[Tool]) -> None:
        self.tools = {tool.name: tool for tool in tools}

    def __bool__(self) -> bool:
        return bool(self.tools)

    def specs(self) -> list[JSONObject]:
        """Every tool as the ``tools`` dialect offers it, in the order given."""
        return [tool.spec() for tool in self.tools.values()]

    def prompt_instructions(self) -> str:
        """The tools as the ``prompt`` dialect describes them (``templates/tools.j2``)."""
        return templates.render(
            "tools.j2",
            tools=[
                {
                    "name": t.name,
                    "description": t.description,
                    "parameters": json.dumps(t.parameters, ensure_ascii=False),
                }
                for t in self.tools.values()
            ],
        ).strip()

    def call(self, call: ToolCall, turn: int = 0, index: int = 1) -> ToolCall:
        """``call`` (the ``index``-th of turn ``turn``) with its ``result``, or its ``error``
        when anything went wrong.

        Raises:
            PipelineError: the pipeline itself failed (say, a replay has no recorded
                result); a bad call or a failing tool never raises, and Ctrl-C still
                interrupts.
        """
        from .errors import PipelineError
        from .schemas import Schema

        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return replace(call, error=f"there is no tool named {call.name!r} (tools: {known})")
        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as e:
            return replace(call, error=f"the arguments are not JSON ({e.msg})")
        if not isinstance(arguments, dict):
            return replace(call, error="the arguments are not a JSON object")
        problems = Schema(f"{tool.name} arguments", tool.parameters).errors(arguments)
        if problems:
            return replace(call, error=f"the arguments do not fit: {'; '.join(problems[:3])}")
        try:
            return replace(call, result=str(tool.run(arguments, ToolUse(call, turn, index))))
        except ToolError as e:  # the tool's own account of what went wrong
            return replace(call, error=str(e))
        except PipelineError:
            raise
        except Exception as e:  # any failure of the tool is the model's to read
            return replace(call, error=f"{tool.name} failed: {e}")


class Combined:
    """Several tool sources as one (a :class:`pipeline.stages.ToolSource`): a role gets
    the tools of each, in order; a name offered twice is an error.

    Raises:
        ConfigError: (from :meth:`toolbox`) two sources offer a role the same tool name.
    """

    def __init__(self, sources: Sequence[Any]) -> None:
        self.sources = list(sources)

    def child(self, run_id: str) -> Combined:
        return Combined([source.child(run_id) for source in self.sources])

    def toolbox(self, ctx: Any, speaker: int, role: str) -> Toolbox:
        from .errors import ConfigError

        tools: dict[str, Tool] = {}
        for source in self.sources:
            for tool in source.toolbox(ctx, speaker, role).tools.values():
                if tool.name in tools:
                    raise ConfigError(
                        f"two tools named {tool.name!r} are offered to the same role "
                        f"({tools[tool.name].source or 'built in'} and {tool.source})"
                    )
                tools[tool.name] = tool
        return Toolbox(list(tools.values()))


def offered(names: Sequence[str], toolboxes: Sequence[Toolbox]) -> JSONObject:
    """What each role is offered, as ``dialogue/tools.json`` holds it:
    ``{"roles": [{"role": NAME, "tools": [{"source": ..., "type": "function",
    "function": {...}}]}]}``, the tools as the ``tools`` dialect offers them."""
    return {
        "roles": [
            {
                "role": name,
                "tools": [{"source": t.source, **t.spec()} for t in box.tools.values()],
            }
            for name, box in zip(names, toolboxes, strict=True)
        ]
    }


def parse_prompt_calls(content: str, first_id: str) -> tuple[str, tuple[ToolCall, ...]]:
    """The text before the first ``<tool_call>`` and the calls it makes, in the ``prompt``
    dialect. Call ids are ``first_id`` with ``-1``, ``-2``... appended, so that they are the
    same every time the same answer is parsed. A block that is not
    ``{"name": str, "arguments": object}`` becomes a call whose ``error`` says so."""
    found = list(_CALL.finditer(content))
    if not found:
        return content, ()
    calls = []
    for number, match in enumerate(found, start=1):
        call_id = f"{first_id}-{number}"
        try:
            value = json.loads(match.group(1))
        except json.JSONDecodeError as e:
            calls.append(ToolCall(call_id, "?", match.group(1), error=f"not JSON ({e.msg})"))
            continue
        name = value.get("name") if isinstance(value, dict) else None
        arguments = value.get("arguments", {}) if isinstance(value, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            calls.append(
                ToolCall(
                    call_id,
                    name if isinstance(name, str) else "?",
                    match.group(1),
                    error='a tool call is {"name": "...", "arguments": {...}}',
                )
            )
            continue
        calls.append(ToolCall(call_id, name, json.dumps(arguments, ensure_ascii=False)))
    return content[: found[0].start()].rstrip(), tuple(calls)


def result_messages(dialect: str, content: str, calls: Sequence[ToolCall]) -> list[JSONObject]:
    """The messages that carry a round of tool calls and their results back to the model:
    in the ``tools`` dialect, the assistant message holding the calls, then one ``tool``
    message per call; in the ``prompt`` dialect, the assistant's text with its calls, then
    one user message with every result."""
    if dialect == "tools":
        assistant: JSONObject = {
            "role": "assistant",
            "content": content or None,
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ],
        }
        return [
            assistant,
            *({"role": "tool", "tool_call_id": c.id, "content": _shown(c)} for c in calls),
        ]
    written = "\n".join(
        f'<tool_call>{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}</tool_call>'
        if c.error is None or c.name != "?"
        else f"<tool_call>{c.arguments}</tool_call>"
        for c in calls
    )
    return [
        {"role": "assistant", "content": f"{content}\n{written}".strip()},
        {"role": "user", "content": templates.render("tool-results.j2", calls=calls).strip()},
    ]


def _shown(call: ToolCall) -> str:
    return f"error: {call.error}" if call.error is not None else call.result or ""
