"""The dialogue stage: the roles converse, one turn at a time, until ``turns`` is reached.

Turn 1 is the opening line, spoken by ``roles[0]`` as written by the director (it is
not generated). The roles then alternate. Each call sends the speaking role's
system prompt, its own earlier turns as ``assistant`` messages and the other
role's turns as ``user`` messages.

Artifacts (in ``dialogue/``): ``transcript.jsonl``, one line per turn
(``schemas/transcript-line.schema.json``), appended and fsynced as each turn
completes; ``transcript.md``, the transcript rendered for reading at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from . import director, templates
from .client import Message, ModelClient
from .errors import RunError
from .runs import Run, sha256_of

STAGE = "dialogue"
TRANSCRIPT_MD = "dialogue/transcript.md"


@dataclass(frozen=True)
class DialogueParameters:
    """Parameters of the dialogue stage.

    Attributes:
        turns: the number of turns, the opening line included (at least 1).
        max_tokens: the most tokens one generated turn may use.
        temperature: sampling temperature (0 to 2).
    """

    turns: int = 10
    max_tokens: int = 512
    temperature: float = 0.7


class DialogueListener(Protocol):
    """Receives the conversation as it happens (the CLI prints it)."""

    def turn_started(self, turn: int, role: str) -> None: ...

    def delta(self, text: str) -> None: ...

    def turn_finished(self, line: dict[str, Any]) -> None: ...


class _Silent:
    def turn_started(self, turn: int, role: str) -> None:
        pass

    def delta(self, text: str) -> None:
        pass

    def turn_finished(self, line: dict[str, Any]) -> None:
        pass


def messages_for(
    speaker: int, roles: Sequence[dict[str, Any]], lines: Sequence[dict[str, Any]]
) -> list[Message]:
    """The messages sent for role ``speaker``'s next turn: its system prompt, then every
    turn so far, its own as ``assistant`` and the others' as ``user``."""
    messages: list[Message] = [{"role": "system", "content": roles[speaker]["system_prompt"]}]
    for line in lines:
        who = "assistant" if line["role_index"] == speaker else "user"
        messages.append({"role": who, "content": line["content"]})
    return messages


def render_markdown(task: str, roles_doc: dict[str, Any], lines: Sequence[dict[str, Any]]) -> str:
    """The transcript as Markdown (``templates/transcript.md.j2``)."""
    return templates.render("transcript.md.j2", task=task, roles=roles_doc, lines=lines)


def dialogue_inputs(
    roles_doc: dict[str, Any], clients: Sequence[ModelClient], params: DialogueParameters
) -> dict[str, Any]:
    """What the dialogue stage depends on; its sha256 is the stage's input hash."""
    return {
        "roles_sha256": sha256_of(roles_doc),
        "endpoints": [
            {"base_url": c.endpoint.base_url, "model": c.endpoint.model} for c in clients
        ],
        "parameters": asdict(params),
    }


def is_current(run: Run, clients: Sequence[ModelClient], params: DialogueParameters) -> bool:
    """True when the dialogue stage is done with exactly these inputs (nothing to redo)."""
    entry = run.stage(STAGE)
    if entry["status"] != "done":
        return False
    inputs = dialogue_inputs(director.load_roles(run), clients, params)
    return bool(entry["input_hash"] == sha256_of(inputs))


def run_dialogue(
    run: Run,
    clients: Sequence[ModelClient],
    params: DialogueParameters,
    listener: DialogueListener | None = None,
    *,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run the dialogue stage of ``run`` (whose director stage is done); return the
    transcript lines. ``clients[i]`` speaks for ``roles[i]``.

    Without ``resume``, a transcript left by an earlier attempt is moved to
    ``dialogue/previous-N/`` first. With ``resume``, the stored turns are kept (a last line
    cut short by a crash is dropped, see :meth:`Run.read_transcript`) and the dialogue
    continues after the last complete turn. The stage is ``running`` in the manifest while
    it works, then ``done`` (termination reason ``max_turns``) or ``failed`` (``error`` or
    ``interrupted``); the turns completed before a failure stay in the transcript.

    Raises:
        RunError: the director stage is not done, or the stored turns do not belong to
            these roles.
        PipelineError: an endpoint failed.
    """
    if params.turns < 1:
        raise ValueError("turns must be at least 1")
    out = listener or _Silent()
    roles_doc = director.load_roles(run)
    inputs = dialogue_inputs(roles_doc, clients, params)
    if resume:
        lines = run.read_transcript(repair=True)
        _check_continuation(run, roles_doc, lines, params.turns)
    else:
        run.archive_stage(STAGE)
        lines = []
    with run.stage_running(
        STAGE, endpoint=clients[0].endpoint.describe(), parameters=asdict(params), inputs=inputs
    ) as entry:
        if resume:
            entry["resumed_at_turn"] = len(lines) + 1
        try:
            for turn in range(len(lines) + 1, params.turns + 1):
                lines.append(_take_turn(run, turn, roles_doc, lines, clients, params, out))
        except BaseException as e:
            entry["termination_reason"] = (
                "interrupted" if isinstance(e, KeyboardInterrupt) else "error"
            )
            entry["turns"] = len(lines)
            raise
        run.write_text(TRANSCRIPT_MD, render_markdown(run.task, roles_doc, lines))
    run.finish_stage(STAGE, usage=_usage(lines), termination_reason="max_turns", turns=len(lines))
    return lines


def _take_turn(
    run: Run,
    turn: int,
    roles_doc: dict[str, Any],
    lines: list[dict[str, Any]],
    clients: Sequence[ModelClient],
    params: DialogueParameters,
    out: DialogueListener,
) -> dict[str, Any]:
    """Produce turn ``turn``, append it to the transcript, and return its line."""
    roles = roles_doc["roles"]
    speaker = (turn - 1) % len(roles)
    name = roles[speaker]["name"]
    out.turn_started(turn, name)
    if turn == 1:
        out.delta(roles_doc["opening_line"])
        line = _line(turn, name, speaker, roles_doc["opening_line"])
    else:
        client = clients[speaker % len(clients)]
        request = client.chat_request(
            messages_for(speaker, roles, lines),
            max_tokens=params.max_tokens,
            temperature=params.temperature,
        )
        result = client.stream(request, out.delta)
        line = _line(turn, name, speaker, result.content, generated=True)
        line.update(
            finish_reason=result.finish_reason,
            model=result.model,
            base_url=client.endpoint.base_url,
            usage=result.usage,
        )
    run.append_transcript(line)
    out.turn_finished(line)
    return line


def _usage(lines: Sequence[dict[str, Any]]) -> dict[str, int] | None:
    """Token counts summed over the turns that report them; None when none does."""
    reported = [line["usage"] for line in lines if line.get("usage")]
    if not reported:
        return None
    return {key: sum(u[key] for u in reported) for key in ("prompt_tokens", "completion_tokens")}


def _check_continuation(
    run: Run, roles_doc: dict[str, Any], lines: Sequence[dict[str, Any]], turns: int
) -> None:
    """Refuse to resume a transcript that does not belong to these roles or is too long."""
    roles = roles_doc["roles"]
    for expected, line in enumerate(lines, start=1):
        index = (expected - 1) % len(roles)
        if (line.get("turn"), line.get("role_index"), line.get("role")) != (
            expected,
            index,
            roles[index]["name"],
        ) or (expected == 1 and line.get("content") != roles_doc["opening_line"]):
            raise RunError(
                f"turn {expected} of the transcript of run {run.run_id} does not follow from "
                f"its roles; start the dialogue again with: pipeline rerun {run.run_id} dialogue",
                run_id=run.run_id,
                stage=STAGE,
            )
    if len(lines) > turns:
        raise RunError(
            f"the transcript of run {run.run_id} already has {len(lines)} turns, more than "
            f"{turns}; start the dialogue again with: pipeline rerun {run.run_id} dialogue",
            run_id=run.run_id,
            stage=STAGE,
        )


def _line(
    turn: int, role: str, role_index: int, content: str, *, generated: bool = False
) -> dict[str, Any]:
    return {
        "turn": turn,
        "role": role,
        "role_index": role_index,
        "content": content,
        "generated": generated,
        "finish_reason": None,
        "model": None,
        "base_url": None,
        "usage": None,
    }
