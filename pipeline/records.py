"""Typed records: what flows between stages, read from and written to JSON.

Each record mirrors one published JSON Schema in ``schemas/`` (the contract; the tests
hold the two together) and round-trips: ``Record.from_json(value).to_json() == value``
for every document the schema admits, old runs' included.

=====================  ================================  ==============================
record                 file                              schema
=====================  ================================  ==============================
:class:`RolesDocument` ``director/roles.json``           ``roles.schema.json``
:class:`Turn`          a line of ``transcript.jsonl``    ``transcript-line.schema.json``
:class:`StageRecord`   ``run.json`` ``stages.<name>``    ``run.schema.json#/$defs/stage``
:class:`Manifest`      ``run.json``                      ``run.schema.json``
:class:`CallRecord`    ``<stage>/calls/NNNN.json``       (one model call, see below)
=====================  ================================  ==============================

A call record holds one HTTP exchange with a model: the canonical request (the base URL
and the body sent, never credentials), its sha256, and the response (a plain completion),
the stream (a streamed one, as its text pieces) or the error, with the usage, the time it
was sent (older recordings have none) and the time it was answered. Keys a record does not
know are kept in ``extra`` and written back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeAlias

from .endpoints import Endpoint

MANIFEST_VERSION = 2

JSONObject: TypeAlias = dict[str, Any]
"""A JSON object whose shape is another party's contract: an API request or response body,
a JSON Schema document, a stage's parameters as recorded. The project's own documents are
the records of this module; their ``to_json`` gives ``dict[str, object]``."""
TURN_KINDS = ("opening", "generated", "human", "imported", "tool")


def canonical_json(value: object) -> str:
    """Sorted-key, compact JSON (UTF-8 characters kept): the form that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_of(value: object) -> str:
    """Hex sha256 of ``canonical_json(value)``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def timestamp(moment: datetime | None = None) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T12:00:00.123Z``."""
    return (moment or utc_now()).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (``Z`` or an offset; none means UTC) as an aware datetime: the
    inverse of :func:`timestamp`.

    Raises:
        ValueError: ``text`` is not such a time.
    """
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def _extra(value: Mapping[str, Any], known: Sequence[str]) -> JSONObject:
    return {k: v for k, v in value.items() if k not in known}


_KNOWN: dict[type, tuple[str, ...]] = {}


def _known(cls: type) -> tuple[str, ...]:
    """The fields of record ``cls`` but ``extra`` (kept per class: a runs list reads
    thousands of records)."""
    known = _KNOWN.get(cls)
    if known is None:
        known = _KNOWN[cls] = tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")
    return known


# -- tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Tokens one call, turn or stage used, as the API reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_json(cls, value: object) -> Usage | None:
        """The usage in an API answer or a record (extra counters ignored); None for none."""
        if not isinstance(value, Mapping):
            return None
        return cls(int(value.get("prompt_tokens") or 0), int(value.get("completion_tokens") or 0))

    def to_json(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def __add__(self, other: Usage | None) -> Usage:
        if other is None:
            return self
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def total_usage(usages: Sequence[Usage | None]) -> Usage | None:
    """The sum of the usages reported; None when none was."""
    reported = [u for u in usages if u is not None]
    return sum(reported[1:], reported[0]) if reported else None


# -- the roles document -----------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    name: str
    system_prompt: str


@dataclass(frozen=True)
class Termination:
    """The termination contract: who may declare the task done, with which token, when."""

    done_token: str
    declared_by: str
    acceptance_criteria: str


@dataclass(frozen=True)
class RolesDocument:
    """The director's answer (``roles.schema.json``): the roles in speaking order, the
    termination contract and the opening line that ``roles[0]`` speaks as turn 1."""

    roles: tuple[Role, ...]
    termination: Termination
    opening_line: str

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RolesDocument:
        """Raises KeyError or TypeError on a document the schema refuses (validate first)."""
        return cls(
            tuple(Role(r["name"], r["system_prompt"]) for r in value["roles"]),
            Termination(**value["termination"]),
            value["opening_line"],
        )

    def to_json(self) -> dict[str, object]:
        return {
            "roles": [dataclasses.asdict(r) for r in self.roles],
            "termination": dataclasses.asdict(self.termination),
            "opening_line": self.opening_line,
        }

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.roles]

    @property
    def done_token(self) -> str:
        return self.termination.done_token

    @property
    def declarers(self) -> set[int]:
        """The positions of the roles that may declare the task done: the one named by the
        contract, or every role when it names none of them."""
        names = self.names
        declarer = self.termination.declared_by
        return {names.index(declarer)} if declarer in names else set(range(len(names)))


@dataclass(frozen=True)
class Verdict:
    """The judge's verdict (``verdict.schema.json``): did the conversation accomplish its
    task, a score from 1 to 10, why, and what it produced ("" for nothing)."""

    completed: bool
    score: int
    reasons: str
    deliverable: str

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Verdict:
        """Raises KeyError or TypeError on a document the schema refuses (validate first)."""
        return cls(value["completed"], value["score"], value["reasons"], value["deliverable"])

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# -- a turn -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    """How a turn's speaker was chosen: ``opening``, ``round-robin`` or ``moderator``."""

    by: str
    reason: str | None = None
    fallback: str | None = None

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ToolCall:
    """A tool call a turn made (OpenAI ``tool_calls``), with its result once known.

    Attributes:
        arguments: the JSON text the model sent.
        result: what the tool returned, or None before it did.
        error: why the tool failed, when it did.
    """

    id: str
    name: str
    arguments: str
    result: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"id": self.id, "name": self.name, "arguments": self.arguments}
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


_MODEL_FIELDS = ("finish_reason", "model", "base_url", "usage")


@dataclass(frozen=True)
class Turn:
    """One turn of a transcript: a line of ``dialogue/transcript.jsonl``.

    Attributes:
        turn: 1-based turn number.
        role, role_index: the speaker's name and 0-based position in the roles.
        content: what was said.
        kind: ``opening`` (the director's opening line), ``generated`` (a model's turn),
            ``human``, ``imported`` or ``tool`` (see :data:`TURN_KINDS`). A line of a
            version 1 transcript has none: it is worked out from ``generated``.
        finish_reason, model, base_url, usage: of a generated turn; None otherwise.
        chunks: streamed pieces that carried text (generated turns).
        floor: how the speaker was chosen.
        time: when the turn was complete (ISO 8601 UTC), when known.
        tool_calls, tool_call_id: the tool calls a turn made; the call a ``tool`` line answers.
        note: what a person told the speaker of a generated turn before it spoke (shown
            to that speaker with this turn and its later ones,
            :func:`pipeline.dialogue.messages_for`).
    """

    turn: int
    role: str
    role_index: int
    content: str
    kind: str = "generated"
    finish_reason: str | None = None
    model: str | None = None
    base_url: str | None = None
    usage: Usage | None = None
    chunks: int | None = None
    floor: Floor | None = None
    time: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    note: str | None = None

    @property
    def generated(self) -> bool:
        return self.kind == "generated"

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Turn:
        kind = value.get("kind") or ("generated" if value.get("generated") else "opening")
        floor = value.get("floor")
        return cls(
            turn=value["turn"],
            role=value["role"],
            role_index=value["role_index"],
            content=value["content"],
            kind=kind,
            finish_reason=value.get("finish_reason"),
            model=value.get("model"),
            base_url=value.get("base_url"),
            usage=Usage.from_json(value.get("usage")),
            chunks=value.get("chunks"),
            floor=Floor(**floor) if floor else None,
            time=value.get("time"),
            tool_calls=tuple(ToolCall(**c) for c in value.get("tool_calls") or ()),
            tool_call_id=value.get("tool_call_id"),
            note=value.get("note"),
        )

    def to_json(self, version: int = MANIFEST_VERSION) -> dict[str, object]:
        """The line as written (``transcript-line.schema.json`` of ``version``). An opening
        or generated turn always has the model's fields (null when none); other kinds only
        those they have. Version 1 (a run made before version 2, still written as such)
        has no ``kind``, ``time``, tool calls or notes.

        Raises:
            ValueError: version 1 cannot hold a turn of this kind.
        """
        if version == 1:
            if self.kind not in ("opening", "generated") or self.tool_calls:
                raise ValueError(f"a version 1 transcript has no {self.kind} turns")
            if self.note is not None:
                raise ValueError("a version 1 transcript has no notes")
            return {k: v for k, v in self.to_json().items() if k not in ("kind", "time")}
        out: dict[str, object] = {
            "turn": self.turn,
            "role": self.role,
            "role_index": self.role_index,
            "kind": self.kind,
            "content": self.content,
            "generated": self.generated,
        }
        model = {
            "finish_reason": self.finish_reason,
            "model": self.model,
            "base_url": self.base_url,
            "usage": self.usage.to_json() if self.usage else None,
        }
        if self.kind in ("opening", "generated"):
            out.update(model)
        else:
            out.update({k: v for k, v in model.items() if v is not None})
        if self.chunks is not None:
            out["chunks"] = self.chunks
        if self.floor is not None:
            out["floor"] = self.floor.to_json()
        if self.time is not None:
            out["time"] = self.time
        if self.tool_calls:
            out["tool_calls"] = [c.to_json() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.note is not None:
            out["note"] = self.note
        return out


# -- structured-output attempts and model calls -------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """The outcome of one structured-output attempt.

    Attributes:
        number: 1-based attempt number within the call.
        dialect: the structured-output dialect used.
        outcome: ``ok``, ``rejected`` (the server refused the response format), ``error``
            (an HTTP or connection failure), or a
            :class:`~pipeline.errors.StructuredOutputError` kind.
        errors: the problems found (``"<json path>: <message>"``) or the error message.
    """

    number: int
    dialect: str
    outcome: str
    errors: list[str]


@dataclass(frozen=True)
class Streamed:
    """A streamed answer: its text pieces in the order they came, what the last chunks
    said (``usage`` as ``{prompt_tokens, completion_tokens}``), and the tool calls the
    model made, assembled from their pieces."""

    pieces: list[str]
    finish_reason: str | None = None
    model: str | None = None
    usage: dict[str, int] | None = None
    system_fingerprint: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def content(self) -> str:
        return "".join(self.pieces)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Streamed:
        calls = tuple(ToolCall(**c) for c in value.get("tool_calls") or ())
        return cls(**{**value, "tool_calls": calls})

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "pieces": self.pieces,
            "finish_reason": self.finish_reason,
            "model": self.model,
            "usage": self.usage,
            "system_fingerprint": self.system_fingerprint,
        }
        if self.tool_calls:  # a stream without tool calls is recorded as it always was
            out["tool_calls"] = [c.to_json() for c in self.tool_calls]
        return out


@dataclass(frozen=True)
class CallError:
    """How a call failed after the SDK's retries: the one-line message, the HTTP status
    (None without an answer) and the server's own words."""

    message: str
    status: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class CallRecord:
    """One model call, exactly one of ``response``, ``stream`` or ``error`` set.

    Attributes:
        request: the canonical request: ``{"base_url": ..., **body}``, no credentials.
        request_sha256: :func:`sha256_of` the request; a replay answers by it.
        response: the raw completion (non-streaming calls).
        stream: the streamed answer.
        error: the failure.
        usage: the usage as the API reported it (raw).
        system_fingerprint: as the API reported it.
        started: when the request was sent, before the SDK's retries (ISO 8601 UTC); None
            in older recordings.
        time: when the answer was complete (ISO 8601 UTC); None in older recordings.
        stage: the stage that made the call, set when it is recorded.
        batch: the provider batch that answered it, ``{"id", "custom_id"}`` (OpenAI's Batch
            API, :mod:`pipeline.batchapi`); None for a call through the ordinary API.
    """

    request: JSONObject
    request_sha256: str
    response: JSONObject | None = None
    stream: Streamed | None = None
    error: CallError | None = None
    usage: JSONObject | None = None
    system_fingerprint: str | None = None
    time: str | None = None
    stage: str = ""
    started: str | None = None
    batch: dict[str, str] | None = None

    @classmethod
    def answered(
        cls,
        request: JSONObject,
        digest: str,
        response: JSONObject,
        *,
        time: str | None,
        started: str | None,
        batch: dict[str, str] | None = None,
    ) -> CallRecord:
        """The record of a non-streaming call answered with ``response`` (a chat
        completion as JSON), its usage and fingerprint taken from it."""
        return cls(
            request,
            digest,
            response=response,
            usage=response.get("usage"),
            system_fingerprint=response.get("system_fingerprint"),
            time=time,
            started=started,
            batch=batch,
        )

    @property
    def body(self) -> JSONObject:
        """The request body as sent (the canonical request without the base URL)."""
        return {k: v for k, v in self.request.items() if k != "base_url"}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> CallRecord:
        stream, error = value.get("stream"), value.get("error")
        return cls(
            request=value["request"],
            request_sha256=value["request_sha256"],
            response=value.get("response"),
            stream=Streamed.from_json(stream) if stream is not None else None,
            error=CallError(**error) if error is not None else None,
            usage=value.get("usage"),
            system_fingerprint=value.get("system_fingerprint"),
            time=value.get("time"),
            stage=value.get("stage", ""),
            started=value.get("started"),
            batch=value.get("batch"),
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "stage": self.stage,
            "request_sha256": self.request_sha256,
            "request": self.request,
        }
        if self.error is not None:
            out["error"] = dataclasses.asdict(self.error)
        else:
            if self.stream is not None:
                out["stream"] = self.stream.to_json()
            else:
                out["response"] = self.response
            out["usage"] = self.usage
            out["system_fingerprint"] = self.system_fingerprint
        if self.started is not None:  # a record made before it was recorded has none
            out["started"] = self.started
        if self.time is not None:
            out["time"] = self.time
        if self.batch is not None:
            out["batch"] = self.batch
        return out


# -- the manifest --------------------------------------------------------------------------


def _endpoint(value: object) -> Endpoint | None:
    return Endpoint.from_description(dict(value)) if isinstance(value, Mapping) else None


@dataclass
class StageRecord:
    """One stage's entry in ``run.json``: its state, what it ran on and what it made.

    ``status`` is ``pending``, ``running``, ``done``, ``failed`` or ``stale``; stale is a
    stored copy of what the input hashes say (:mod:`pipeline.stages`). ``upstream`` holds
    the sha256 of each needed stage's output when this stage started. The optional fields
    are set by the stages that have them; keys unknown here are kept in ``extra``.
    """

    status: str = "pending"
    started: str | None = None
    ended: str | None = None
    duration_s: float | None = None
    pid: int | None = None
    endpoint: Endpoint | None = None
    parameters: JSONObject = field(default_factory=dict)
    input_hash: str | None = None
    artifacts: list[str] = field(default_factory=list)
    error: str | None = None
    # set by some stages
    upstream: dict[str, str | None] | None = None
    dialect_plan: list[str] | None = None
    role_endpoints: list[Endpoint] | None = None
    moderator_endpoint: Endpoint | None = None
    resumed_at_turn: int | None = None
    attempts: list[Attempt] | None = None
    errors: list[str] | None = None
    structured_output: str | None = None
    schema_form: str | None = None
    lint: list[str] | None = None
    edits: int | None = None
    usage: Usage | None = None
    termination_reason: str | None = None
    termination_turn: int | None = None
    turns: int | None = None
    usage_by_role: dict[str, Usage] | None = None
    moderator_usage: Usage | None = None
    moderator_fallbacks: int | None = None
    tools: JSONObject | None = None
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> StageRecord:
        by_role = value.get("usage_by_role")
        attempts = value.get("attempts")
        roles = value.get("role_endpoints")
        return cls(
            status=value.get("status", "pending"),
            started=value.get("started"),
            ended=value.get("ended"),
            duration_s=value.get("duration_s"),
            pid=value.get("pid"),
            endpoint=_endpoint(value.get("endpoint")),
            parameters=dict(value.get("parameters") or {}),
            input_hash=value.get("input_hash"),
            artifacts=list(value.get("artifacts") or []),
            error=value.get("error"),
            upstream=value.get("upstream"),
            dialect_plan=value.get("dialect_plan"),
            role_endpoints=[Endpoint.from_description(e) for e in roles] if roles else None,
            moderator_endpoint=_endpoint(value.get("moderator_endpoint")),
            resumed_at_turn=value.get("resumed_at_turn"),
            attempts=[Attempt(**a) for a in attempts] if attempts is not None else None,
            errors=value.get("errors"),
            structured_output=value.get("structured_output"),
            schema_form=value.get("schema_form"),
            lint=value.get("lint"),
            edits=value.get("edits"),
            usage=Usage.from_json(value.get("usage")),
            termination_reason=value.get("termination_reason"),
            termination_turn=value.get("termination_turn"),
            turns=value.get("turns"),
            usage_by_role=(
                {k: Usage(**u) for k, u in by_role.items()} if by_role is not None else None
            ),
            moderator_usage=Usage.from_json(value.get("moderator_usage")),
            moderator_fallbacks=value.get("moderator_fallbacks"),
            tools=value.get("tools"),
            extra=_extra(value, _known(cls)),
        )

    def to_json(self) -> dict[str, object]:
        """The entry as written: the ten keys every stage has, then the optional ones that
        are set, then the unknown ones kept."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in _ALWAYS:
                continue
            out[f.name] = _json(value)
        out.update(self.extra)
        return out


_ALWAYS = ("started", "ended", "duration_s", "pid", "endpoint", "input_hash", "error")


def _json(value: Any) -> Any:
    """A record field as JSON."""
    if isinstance(value, Endpoint):
        return value.describe()
    if isinstance(value, (Usage, Floor, ToolCall, Streamed)):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ParentLink:
    """Where a child run came from: the parent run, and the turn (and tool call) in it
    that started the child."""

    run_id: str
    turn: int
    tool_call_id: str | None = None

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ParentLink:
        return cls(value["run_id"], value["turn"], value.get("tool_call_id"))

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"run_id": self.run_id, "turn": self.turn}
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass
class Manifest:
    """A run's ``run.json``: what it was asked, with which versions and files, and the
    record of each stage (by name, in the order of the stage graph); for a run made with
    a model fine-tuned here, the job that made it (``fine_tuned_models``: by model name,
    ``{"job_id", "ledger"}``)."""

    run_id: str
    task: str
    created: str
    versions: dict[str, str | None] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION
    dialects: dict[str, str] | None = None
    tool_dialects: dict[str, str] | None = None
    replay_of: str | None = None
    parent: ParentLink | None = None
    children: list[str] | None = None
    fine_tuned_models: dict[str, dict[str, str]] | None = None
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Manifest:
        """Raises KeyError or TypeError when a required key is missing or malformed."""
        return cls(
            run_id=value["run_id"],
            task=value["task"],
            created=value["created"],
            versions=dict(value.get("versions") or {}),
            files=dict(value.get("files") or {}),
            stages={k: StageRecord.from_json(v) for k, v in value["stages"].items()},
            manifest_version=value.get("manifest_version", 1),
            dialects=value.get("dialects"),
            tool_dialects=value.get("tool_dialects"),
            replay_of=value.get("replay_of"),
            parent=ParentLink.from_json(value["parent"]) if value.get("parent") else None,
            children=value.get("children"),
            fine_tuned_models=value.get("fine_tuned_models"),
            extra=_extra(value, _known(cls)),
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "manifest_version": self.manifest_version,
            "run_id": self.run_id,
            "task": self.task,
            "created": self.created,
            "versions": self.versions,
            "files": self.files,
            "stages": {name: entry.to_json() for name, entry in self.stages.items()},
        }
        for key in (
            "dialects",
            "tool_dialects",
            "replay_of",
            "parent",
            "children",
            "fine_tuned_models",
        ):
            if (value := getattr(self, key)) is not None:
                out[key] = value.to_json() if isinstance(value, ParentLink) else value
        out.update(self.extra)
        return out
