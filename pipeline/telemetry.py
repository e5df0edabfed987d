"""A run's OpenTelemetry traces, in the GenAI semantic conventions.

The conventions (status: **development**, so names may still change):

- agent and workflow spans: https://github.com/open-telemetry/semantic-conventions-genai/blob/main/docs/gen-ai/gen-ai-agent-spans.md
  (published at https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-agent-spans/);
- model call (inference) spans and the message formats:
  https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/;
- tool execution: https://github.com/open-telemetry/semantic-conventions-genai/blob/main/docs/gen-ai/execute-tool.md.

The GenAI conventions left the main semantic-conventions repository after its v1.41.0 for
their own (``semantic-conventions-genai``, first release v0.1.0). Its v0.1.0 merged the
``invoke_workflow`` span into the internal ``invoke_agent`` span: ``gen_ai.operation.name``
stays ``invoke_workflow`` and the workflow is named by ``gen_ai.agent.name`` where v1.37 to
v1.41 had ``gen_ai.workflow.name``. This module follows that latest text.

**The spans** of one run (one trace), each with ``gen_ai.conversation.id`` = the run id::

    invoke_workflow converse-pipeline     INTERNAL  the run
    ├── invoke_agent director             INTERNAL  a stage with one product (director,
    │   └── chat {model}                  CLIENT    judge, reflect), and each of its calls
    ├── invoke_agent moderator            INTERNAL  a moderator's pick of the next speaker
    │   └── chat {model}                  CLIENT
    ├── invoke_agent {role}               INTERNAL  a turn of the conversation (any kind)
    │   ├── chat {model}                  CLIENT    each model call of the turn
    │   └── execute_tool {tool}           INTERNAL  each tool call of the turn
    ├── invoke_agent                      INTERNAL  a turn cut short (a failed call), when any
    └── invoke_agent judge ...

in the order they happened. A ``chat`` span to the embedded engine is INTERNAL: it is
this program's own engine (a child process on loopback), not a remote service, and has no
``server.*``. Attributes (the ``gen_ai.`` ones as the conventions name them, the
``pipeline.`` ones this project's):

- every span: ``gen_ai.operation.name`` (``invoke_workflow``, ``invoke_agent``, ``chat``,
  ``execute_tool``), ``gen_ai.conversation.id``;
- workflow: ``gen_ai.agent.name`` = ``converse-pipeline``, ``pipeline.termination_reason``,
  ``pipeline.turns``, and ``pipeline.replay_of``, ``pipeline.parent_run`` when set;
- agent: ``gen_ai.agent.name`` (the role, or the stage), ``gen_ai.provider.name``,
  ``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens``,
  ``gen_ai.response.finish_reasons`` (a generated turn), ``pipeline.stage``,
  ``pipeline.turn``, ``pipeline.turn.kind``, ``pipeline.floor``;
- chat: ``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
  ``gen_ai.response.id``, ``gen_ai.response.finish_reasons``, ``gen_ai.usage.*``,
  ``gen_ai.request.max_tokens`` / ``temperature`` / ``seed`` / ``top_p`` when sent,
  ``gen_ai.output.type`` (``json`` for a structured answer), ``server.address``,
  ``server.port``; a failed call has ``error.type`` (the HTTP status, else ``_OTHER``) and
  the status ERROR;
- execute_tool: ``gen_ai.tool.name``, ``gen_ai.tool.call.id``, ``gen_ai.tool.type``
  (``function``); a tool that failed has ``error.type`` ``_OTHER`` and the status ERROR.

``gen_ai.provider.name`` (:func:`provider_name`): the well-known value of the API's host
(``openai`` for api.openai.com, and :data:`PROVIDERS`), else the kind of server the endpoint
is (``llama.cpp`` for the embedded engine and the servers that say so), else
:data:`FALLBACK_PROVIDER`, ``openai_compatible``: any server speaking the OpenAI API; the
conventions allow a custom value when no well-known one applies, and ``server.address``
tells them apart.

**Message contents** are captured only on opt-in, as the OpenTelemetry GenAI
instrumentations do: ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` set to ``true``
(or, the form ``opentelemetry-util-genai`` reads under
``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental``, ``SPAN_ONLY`` or
``SPAN_AND_EVENT``; ``EVENT_ONLY`` and ``NO_CONTENT`` capture nothing, this module emitting
no events). Then a chat span carries ``gen_ai.system_instructions``,
``gen_ai.input.messages`` and ``gen_ai.output.messages``, a turn its
``gen_ai.output.messages``, the workflow the task as ``gen_ai.input.messages``, a tool call
``gen_ai.tool.call.arguments`` and ``gen_ai.tool.call.result`` (JSON text, in the
conventions' message schemas). ``OTEL_SEMCONV_STABILITY_OPT_IN`` changes nothing else: its
transition plan keeps the old conventions by default only for instrumentations that
emitted them, and this one never did, so it always emits the latest.

**Design: built from the recording, after the fact.** The spans are not emitted live from
the stages: they are built from what the run recorded, with explicit start and end
times: the stages' ``started``/``ended`` in ``run.json``, each turn's ``time`` in the
transcript, each call record's ``started`` and ``time`` (``<stage>/calls/NNNN.json``).
So any run can be exported, an old one or a replay, again and again, and the hot path
(the dialogue loop, the client) has no hook and no cost; ``pipeline trace RUN`` exports
one on demand. The price: a span's times are those recorded, to the millisecond.

Times, where nothing recorded them:

- a call's start: a call record holds ``started`` since this module needed it; for an
  older one, the end of what happened before it in its stage (the previous call or turn,
  else the stage's start), never after its own end;
- a turn: from its first call's start (a generated turn), or from the end of the turn
  before (a person's or imported turn), to its ``time``; the opening line, which no model
  says, is an instant at the dialogue's start;
- a tool call: tools run between the call that asked for them and the next call, and
  their own times are not recorded, so every tool of one round spans that gap;
- which calls a turn made: the dialogue's streamed calls in order, a turn's last one
  being the call whose ``time`` is the turn's (a moderator's calls are the unstreamed
  ones);
- a parent span is widened to hold its children (a resumed dialogue's earlier turns come
  before the stage's last ``started``);
- a replay answers every call from its source's recording and keeps its times, so the
  spans of a replayed run show its source's timing, the workflow and stage spans too
  (the manifest's times are the replay's own, minutes of no model call).

**Cost:** :func:`export_run` sends spans only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and the ``otel`` extra is installed;
otherwise it returns 0 having imported nothing, as does ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none``. It sends OTLP over HTTP (protobuf), which reads the
exporter's own variables (headers, timeout, certificates); ``service.name`` is
``converse-pipeline`` unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` say
otherwise. This module imports no OpenTelemetry package at start-up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import stages
from .endpoints import OPENAI_BASE_URL, Endpoint
from .errors import ConfigError, Fix, PipelineError, TelemetryError
from .records import CallRecord, ToolCall, Turn, Usage, total_usage

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer
    from opentelemetry.util.types import AttributeValue

    from .runs import Run

WORKFLOW = "converse-pipeline"
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
FALLBACK_PROVIDER = "openai_compatible"
PROVIDERS = {
    urlsplit(OPENAI_BASE_URL).hostname: "openai",
    "api.anthropic.com": "anthropic",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral_ai",
    "api.moonshot.ai": "moonshot_ai",
    "api.perplexity.ai": "perplexity",
    "api.x.ai": "x_ai",
    "generativelanguage.googleapis.com": "gcp.gemini",
}
"""``gen_ai.provider.name`` by the API's host name: the conventions' well-known values
(Azure OpenAI, ``*.openai.azure.com``, is ``azure.ai.openai``)."""
_CAPTURING = ("true", "span_only", "span_and_event")
_BATCH = 512  # spans per OTLP request
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# -- what to send ----------------------------------------------------------------------


def capture_content(environ: Mapping[str, str] | None = None) -> bool:
    """True when message contents go on the spans (see the module)."""
    env = os.environ if environ is None else environ
    return env.get(CAPTURE_ENV, "").strip().lower() in _CAPTURING


def destination(environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP endpoint spans go to, or None when none is set (or tracing is off)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    return next((env[name] for name in ENDPOINT_ENVS if env.get(name)), None)


def provider_name(endpoint: Endpoint) -> str:
    """``gen_ai.provider.name`` for ``endpoint`` (see the module)."""
    host = (urlsplit(endpoint.base_url).hostname or "").lower()
    if host in PROVIDERS:
        return PROVIDERS[host]
    if host.endswith(".openai.azure.com"):
        return "azure.ai.openai"
    if endpoint.embedded:
        return "llama.cpp"  # pipeline.local's engine
    return endpoint.server or FALLBACK_PROVIDER


# -- the span tree, from the recording --------------------------------------------------


@dataclass
class Node:
    """One span to be: its name, kind (``internal`` or ``client``), times (ns since the
    epoch, None where nothing says), attributes, error (the status description) and
    children."""

    name: str
    kind: str
    start: int | None
    end: int | None
    attributes: dict[str, AttributeValue]
    error: str | None = None
    children: list[Node] = field(default_factory=list)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


def _ns(moment: str | None) -> int | None:
    """An ISO 8601 UTC time as nanoseconds since the epoch (what OpenTelemetry takes)."""
    if not moment:
        return None
    parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return (parsed - _EPOCH) // timedelta(microseconds=1) * 1000


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _usage(attributes: dict[str, AttributeValue], usage: Usage | None) -> None:
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens


def _text(content: object) -> str:
    """A message's content as text (OpenAI content parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def _message(message: Mapping[str, Any]) -> dict[str, object]:
    """An OpenAI chat message in the conventions' input message form."""
    parts: list[dict[str, object]] = []
    if message.get("role") == "tool":
        parts.append(
            {
                "type": "tool_call_response",
                "id": message.get("tool_call_id"),
                "response": _text(message.get("content")),
            }
        )
    elif text := _text(message.get("content")):
        parts.append({"type": "text", "content": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        parts.append(
            _tool_call_part(call.get("id"), function.get("name"), function.get("arguments"))
        )
    return {"role": message.get("role"), "parts": parts}


def _tool_call_part(id: object, name: object, arguments: object) -> dict[str, object]:
    return {"type": "tool_call", "id": id, "name": name, "arguments": arguments}


def _answer(call: CallRecord) -> tuple[str, list[ToolCall], str | None, str | None, str | None]:
    """A call's answer: text, tool calls, finish reason, model and response id."""
    if call.stream is not None:
        s = call.stream
        return s.content, list(s.tool_calls), s.finish_reason, s.model, None
    response = call.response or {}
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    calls = [
        ToolCall(c.get("id", ""), c["function"]["name"], c["function"].get("arguments", ""))
        for c in message.get("tool_calls") or ()
        if isinstance(c.get("function"), Mapping)
    ]
    text = _text(message.get("content"))
    return text, calls, choice.get("finish_reason"), response.get("model"), response.get("id")


class _Builder:
    """Builds the :class:`Node` tree of one run (see the module for the times)."""

    def __init__(self, run: Run, capture: bool) -> None:
        self.run = run
        self.capture = capture
        self.id = run.run_id
        self.replay = run.manifest.replay_of is not None
        self.endpoints: dict[str, Endpoint] = {}
        for entry in run.manifest.stages.values():
            found = [entry.endpoint, entry.moderator_endpoint, *(entry.role_endpoints or [])]
            for endpoint in found:
                if endpoint is not None:
                    self.endpoints.setdefault(endpoint.base_url, endpoint)

    def attributes(
        self, operation: str, more: Mapping[str, AttributeValue | None] | None = None
    ) -> dict[str, AttributeValue]:
        """The attributes of every span, then those of ``more`` that are known."""
        found: dict[str, AttributeValue] = {
            "gen_ai.operation.name": operation,
            "gen_ai.conversation.id": self.id,
        }
        found.update({k: v for k, v in (more or {}).items() if v is not None})
        return found

    def endpoint(self, base_url: str, model: str) -> Endpoint:
        known = self.endpoints.get(base_url)
        return Endpoint(base_url, model) if known is None else known

    def stage_times(self, name: str) -> tuple[int | None, int | None]:
        if self.replay:
            return None, None
        entry = self.run.manifest.stages[name]
        return _ns(entry.started), _ns(entry.ended)

    # -- the spans ---------------------------------------------------------------------

    def workflow(self) -> Node:
        manifest = self.run.manifest
        conversation = stages.conversation_stage(self.run)
        entry = manifest.stages.get(conversation)
        node = Node(
            f"invoke_workflow {WORKFLOW}",
            "internal",
            None,
            None,
            self.attributes(
                "invoke_workflow",
                {
                    "gen_ai.agent.name": WORKFLOW,
                    "pipeline.termination_reason": entry.termination_reason if entry else None,
                    "pipeline.turns": entry.turns if entry else None,
                    "pipeline.replay_of": manifest.replay_of,
                    "pipeline.parent_run": manifest.parent.run_id if manifest.parent else None,
                },
            ),
        )
        if self.capture:
            task = [{"role": "user", "parts": [{"type": "text", "content": manifest.task}]}]
            node.attributes["gen_ai.input.messages"] = _json(task)
        failed = []
        for stage in stages.graph(self.run):
            recorded = manifest.stages.get(stage.name)
            if recorded is None or recorded.status == "pending":
                continue
            if recorded.status == "failed":
                failed.append(f"the {stage.name} stage failed: {recorded.error}")
            before = _latest(*(n.end for c in node.children for n in c.walk()))
            if stage.name == conversation:
                node.children += self.conversation(stage.name, before)
            else:
                node.children.append(self.stage_agent(stage.name, before))
            start, end = self.stage_times(stage.name)
            node.start = _earliest(node.start, start)
            node.end = _latest(node.end, end)
        if failed:
            node.error = "; ".join(failed)
        if node.start is None and not self.replay:
            node.start = _ns(manifest.created)
        return node

    def stage_agent(self, name: str, before: int | None) -> Node:
        """A stage with one product: its agent span and its calls. ``before`` is the end
        of what happened before the stage, where its start is not known."""
        from .recorder import read_calls

        entry = self.run.manifest.stages[name]
        start, end = self.stage_times(name)
        calls = read_calls(self.run, name)
        endpoint = entry.endpoint
        node = Node(
            f"invoke_agent {name}",
            "internal",
            start,
            end,
            self.attributes(
                "invoke_agent",
                {
                    "gen_ai.agent.name": name,
                    "gen_ai.provider.name": provider_name(endpoint) if endpoint else None,
                    "gen_ai.request.model": endpoint.model if endpoint else None,
                    "pipeline.stage": name,
                },
            ),
            error=entry.error if entry.status == "failed" else None,
        )
        _usage(node.attributes, entry.usage or total_usage([_call_usage(c) for c in calls]))
        node.children = self.chats(calls, start if start is not None else before)
        return node

    def chats(self, calls: list[CallRecord], clock: int | None) -> list[Node]:
        """The spans of ``calls``, one after the other from ``clock``."""
        out: list[Node] = []
        for call in calls:
            out.append(self.chat(call, clock))
            clock = out[-1].end
        return out

    def chat(self, call: CallRecord, clock: int | None) -> Node:
        """A model call's span; ``clock`` is the end of what happened before it."""
        body = call.body
        model = str(body.get("model", ""))
        endpoint = self.endpoint(str(call.request.get("base_url", "")), model)
        end = _ns(call.time)
        start = _ns(call.started)
        if start is None:
            start = clock if clock is not None and (end is None or clock <= end) else end
        text, tool_calls, finish, answered_by, response_id = _answer(call)
        response_format = body.get("response_format") or {}
        more: dict[str, AttributeValue | None] = {
            "gen_ai.provider.name": provider_name(endpoint),
            "gen_ai.request.model": model,
            "gen_ai.response.model": answered_by,
            "gen_ai.response.id": response_id,
            "gen_ai.response.finish_reasons": [finish] if finish else None,
            "gen_ai.request.max_tokens": body.get("max_tokens"),
            "gen_ai.request.temperature": body.get("temperature"),
            "gen_ai.request.seed": body.get("seed"),
            "gen_ai.request.top_p": body.get("top_p"),
            "gen_ai.output.type": "json" if response_format.get("type", "text") != "text" else None,
            # answered by a provider batch (pipeline.batchapi): the span lasts the batch's wait
            "pipeline.batch.id": call.batch["id"] if call.batch else None,
        }
        if not endpoint.embedded:
            where = urlsplit(endpoint.base_url)
            more["server.address"] = where.hostname
            more["server.port"] = where.port or (443 if where.scheme == "https" else 80)
        node = Node(
            f"chat {model}",
            "internal" if endpoint.embedded else "client",
            start,
            end if end is not None else start,
            self.attributes("chat", more),
        )
        _usage(node.attributes, _call_usage(call))
        if call.error is not None:
            node.error = call.error.message
            node.attributes["error.type"] = str(call.error.status or "_OTHER")
        if self.capture:
            messages = body.get("messages") or []
            system = [
                {"type": "text", "content": _text(m.get("content"))}
                for m in messages
                if m.get("role") == "system"
            ]
            if system:
                node.attributes["gen_ai.system_instructions"] = _json(system)
            node.attributes["gen_ai.input.messages"] = _json(
                [_message(m) for m in messages if m.get("role") != "system"]
            )
            if call.error is None:
                parts: list[dict[str, object]] = [{"type": "text", "content": text}] if text else []
                parts += [_tool_call_part(c.id, c.name, c.arguments) for c in tool_calls]
                out = {"role": "assistant", "parts": parts, "finish_reason": finish}
                node.attributes["gen_ai.output.messages"] = _json([out])
        return node

    def conversation(self, name: str, before: int | None) -> list[Node]:
        """The turns of the conversation stage ``name`` (and its moderator's picks);
        ``before`` as for :meth:`stage_agent`."""
        from .recorder import read_calls

        entry = self.run.manifest.stages[name]
        calls = read_calls(self.run, name)
        turns = self.run.read_transcript()
        clock, _ = self.stage_times(name)
        clock = clock if clock is not None else before
        roles = entry.role_endpoints or []
        nodes: list[Node] = []
        i = 0
        for turn in turns:
            picks: list[CallRecord] = []
            made: list[CallRecord] = []
            while i < len(calls) and not _streamed(calls[i]):
                picks.append(calls[i])
                i += 1
            if turn.kind == "generated":
                while i < len(calls):
                    call = calls[i]
                    i += 1
                    if not _streamed(call):
                        picks.append(call)
                        continue
                    made.append(call)
                    if _closes(call, turn):
                        break
            if picks:
                nodes.append(self.moderator(picks, turn.turn, clock, entry.moderator_endpoint))
                clock = nodes[-1].end
            endpoint = roles[turn.role_index] if turn.role_index < len(roles) else None
            nodes.append(self.turn(turn, made, clock, endpoint))
            clock = nodes[-1].end
        if i < len(calls):  # the calls of a turn that never ended
            rest = calls[i:]
            node = Node(
                "invoke_agent",
                "internal",
                None,
                None,
                self.attributes("invoke_agent", {"pipeline.turn": len(turns) + 1}),
                error=entry.error or "the turn did not end",
            )
            node.children = self.chats(rest, clock)
            nodes.append(node)
        return nodes

    def moderator(
        self, calls: list[CallRecord], turn: int, clock: int | None, endpoint: Endpoint | None
    ) -> Node:
        node = Node(
            "invoke_agent moderator",
            "internal",
            None,
            None,
            self.attributes(
                "invoke_agent",
                {
                    "gen_ai.agent.name": "moderator",
                    "gen_ai.provider.name": provider_name(endpoint) if endpoint else None,
                    "gen_ai.request.model": endpoint.model if endpoint else None,
                    "pipeline.turn": turn,
                },
            ),
        )
        _usage(node.attributes, total_usage([_call_usage(c) for c in calls]))
        node.children = self.chats(calls, clock)
        return node

    def turn(
        self, turn: Turn, calls: list[CallRecord], clock: int | None, endpoint: Endpoint | None
    ) -> Node:
        end = _ns(turn.time)
        generated = turn.kind == "generated"
        more: dict[str, AttributeValue | None] = {
            "gen_ai.agent.name": turn.role,
            "pipeline.turn": turn.turn,
            "pipeline.turn.kind": turn.kind,
            "pipeline.floor": turn.floor.by if turn.floor else None,
        }
        if generated and endpoint is not None:
            more["gen_ai.provider.name"] = provider_name(endpoint)
            more["gen_ai.request.model"] = endpoint.model
        if generated and turn.finish_reason:
            more["gen_ai.response.finish_reasons"] = [turn.finish_reason]
        start = clock if clock is not None and (end is None or clock <= end) else end
        if turn.kind == "opening" and end is None:
            end = start  # an instant: nobody generates the opening line
        node = Node(
            f"invoke_agent {turn.role}",
            "internal",
            start,
            end,
            self.attributes("invoke_agent", more),
        )
        _usage(node.attributes, turn.usage)
        chats = self.chats(calls, clock)
        if chats:
            node.start = chats[0].start
            node.end = _latest(end, chats[-1].end)
        node.children = _interleave(chats, self.tools(turn, calls, chats))
        if self.capture:
            out = {
                "role": "assistant",
                "name": turn.role,
                "parts": [{"type": "text", "content": turn.content}],
                **({"finish_reason": turn.finish_reason} if turn.finish_reason else {}),
            }
            node.attributes["gen_ai.output.messages"] = _json([out])
        return node

    def tools(
        self, turn: Turn, calls: list[CallRecord], chats: list[Node]
    ) -> list[tuple[int, Node]]:
        """The turn's tool calls, each with the index of the chat span after which it ran."""
        answered = [k for k, call in enumerate(calls) if call.error is None]
        out: list[tuple[int, Node]] = []
        for tool in turn.tool_calls:
            k = _asked_by(tool, turn.turn, calls, answered)
            start = chats[k].end if chats else None
            after = next((j for j in answered if j > k), None)
            end = _ns(calls[after].started) if after is not None else None
            node = Node(
                f"execute_tool {tool.name}",
                "internal",
                start,
                end if end is not None and start is not None and end >= start else start,
                self.attributes(
                    "execute_tool",
                    {
                        "gen_ai.tool.name": tool.name,
                        "gen_ai.tool.call.id": tool.id,
                        "gen_ai.tool.type": "function",
                    },
                ),
            )
            if tool.error is not None:
                node.error = tool.error
                node.attributes["error.type"] = "_OTHER"
            if self.capture:
                node.attributes["gen_ai.tool.call.arguments"] = tool.arguments
                result = tool.result if tool.result is not None else tool.error
                if result is not None:
                    node.attributes["gen_ai.tool.call.result"] = result
            out.append((k, node))
        return out


def _call_usage(call: CallRecord) -> Usage | None:
    return Usage.from_json(call.usage)


def _streamed(call: CallRecord) -> bool:
    """True for a role's turn call (streamed); a moderator's are not."""
    return bool(call.request.get("stream"))


def _closes(call: CallRecord, turn: Turn) -> bool:
    """True when ``call`` is the last of ``turn``'s calls: its answer is the turn's (the
    same time), or, where times are not recorded, an answer that asked for no tools."""
    if call.time is not None and turn.time is not None:
        return call.time == turn.time
    return call.error is None and not (call.stream and call.stream.tool_calls)


def _asked_by(tool: ToolCall, turn: int, calls: list[CallRecord], answered: list[int]) -> int:
    """The index of the call whose answer asked for ``tool``: by the call's id among the
    answer's tool calls, or by the round in a prompt-dialect id (``call-T-R-N``), else the
    turn's next-to-last answer."""
    for k in answered:
        stream = calls[k].stream
        if stream is not None and any(c.id == tool.id for c in stream.tool_calls):
            return k
    words = tool.id.split("-")
    if len(words) == 4 and words[0] == "call" and words[1] == str(turn) and words[2].isdigit():
        round_ = int(words[2])
        if 1 <= round_ <= len(answered):
            return answered[round_ - 1]
    return answered[-2] if len(answered) > 1 else (answered[-1] if answered else 0)


def _interleave(chats: list[Node], tools: list[tuple[int, Node]]) -> list[Node]:
    """The chat spans in order, each followed by the tool calls its answer asked for."""
    out: list[Node] = []
    for k, chat in enumerate(chats):
        out.append(chat)
        out += [node for after, node in tools if after == k]
    out += [node for after, node in tools if not 0 <= after < len(chats)]
    return out


def _earliest(*moments: int | None) -> int | None:
    known = [m for m in moments if m is not None]
    return min(known) if known else None


def _latest(*moments: int | None) -> int | None:
    known = [m for m in moments if m is not None]
    return max(known) if known else None


def _fit(node: Node) -> None:
    """Widen each span to hold its children (bottom up)."""
    for child in node.children:
        _fit(child)
    node.start = _earliest(node.start, *(c.start for c in node.children))
    node.end = _latest(node.end, *(c.end for c in node.children))


def _fill(node: Node, start: int | None) -> None:
    """Give the spans with no known time their parent's start (top down)."""
    if node.start is None:
        node.start = start
    if node.end is None:
        node.end = node.start
    for child in node.children:
        _fill(child, node.start)


def span_tree(run: Run, *, capture: bool | None = None) -> Node:
    """The span tree of ``run``, its times fitted (see the module); ``capture`` (default:
    :func:`capture_content`) puts the message contents on it."""
    root = _Builder(run, capture_content() if capture is None else capture).workflow()
    _fit(root)
    _fill(root, root.start if root.start is not None else _ns(run.manifest.created))
    return root


# -- emitting --------------------------------------------------------------------------


def build_spans(run: Run, tracer_provider: TracerProvider, *, capture: bool | None = None) -> int:
    """Make ``run``'s spans with ``tracer_provider`` (its processors get each as it ends);
    return how many. Needs the ``otel`` extra."""
    from opentelemetry import context

    from . import __version__

    tracer = tracer_provider.get_tracer("pipeline.telemetry", __version__)
    return _emit(span_tree(run, capture=capture), tracer, context.Context())


def _emit(node: Node, tracer: Tracer, parent: Any) -> int:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    kind = SpanKind.CLIENT if node.kind == "client" else SpanKind.INTERNAL
    span = tracer.start_span(
        node.name, context=parent, kind=kind, attributes=node.attributes, start_time=node.start
    )
    if node.error is not None:
        span.set_status(Status(StatusCode.ERROR, node.error))
    inside = trace.set_span_in_context(span)
    made = 1 + sum(_emit(child, tracer, inside) for child in node.children)
    span.end(end_time=node.end)
    return made


def export_tree(run: Run) -> list[str]:
    """Send the spans of ``run`` and of the runs it delegated to (:func:`export_run`), when
    an endpoint is set; return a warning line for each run whose spans were not taken
    (traces are best effort: a finished run never fails for them)."""
    from .runs import open_run

    if destination() is None:
        return []
    warnings = []
    for run_id in [run.run_id, *(run.manifest.children or [])]:
        try:
            export_run(run if run_id == run.run_id else open_run(run.folder.parent, run_id))
        except PipelineError as e:
            warnings.append(f"the traces of run {run_id} were not sent: {e.message}")
    return warnings


def export_run(run: Run, *, required: bool = False) -> int:
    """Send ``run``'s spans to the OTLP endpoint the environment names; return how many
    were sent. Returns 0, importing nothing, when no endpoint is set or the ``otel`` extra
    is not installed (see the module), unless ``required``.

    Raises:
        ConfigError: ``required`` and no endpoint is set, or the extra is missing, or the
            protocol asked for is not HTTP.
        TelemetryError: the collector did not take the spans.
    """
    where = destination()
    if where is None:
        if not required:
            return 0
        raise ConfigError(
            "no OpenTelemetry endpoint is set",
            fix=Fix("export OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:4318 (an OTLP/HTTP collector)"),
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
    except ImportError as e:
        if not required:
            return 0
        raise ConfigError(
            f"sending traces needs the otel extra ({e.name} is not installed)",
            fix=Fix("pip install 'converse-pipeline[otel]'"),
        ) from e
    _check_protocol()
    from . import __version__

    ours = Resource.create({"service.name": WORKFLOW, "service.version": __version__})
    provider = TracerProvider(
        resource=ours.merge(OTELResourceDetector().detect()), shutdown_on_exit=False
    )
    finished = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(finished))
    made = build_spans(run, provider)
    spans = finished.get_finished_spans()
    provider.shutdown()
    exporter = OTLPSpanExporter()
    try:
        for first in range(0, len(spans), _BATCH):
            if exporter.export(spans[first : first + _BATCH]) is not SpanExportResult.SUCCESS:
                raise TelemetryError(
                    f"the OpenTelemetry collector at {where} did not take the spans of "
                    f"run {run.run_id}",
                    fix=(
                        Fix("check that it is running and takes OTLP over HTTP"),
                        Fix("send them again", command=("trace", run.run_id)),
                    ),
                    run_id=run.run_id,
                )
    finally:
        exporter.shutdown()  # type: ignore[no-untyped-call]
    return made


def _check_protocol(environ: Mapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol:
            if protocol != "http/protobuf":
                raise ConfigError(
                    f"{name} is {protocol!r}, but traces are sent as OTLP over HTTP",
                    fix=Fix(f"set {name}=http/protobuf and an OTLP/HTTP endpoint (port 4318)"),
                )
            return
