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


def run_dialogue(
    run: Run,
    clients: Sequence[ModelClient],
    params: DialogueParameters,
    listener: DialogueListener | None = None,
) -> list[dict[str, Any]]:
    """Run the dialogue stage of ``run`` (whose director stage is done); return the
    transcript lines. ``clients[i]`` speaks for ``roles[i]``.

    A transcript left by an earlier attempt is moved to ``dialogue/previous-N/`` first.
    The stage is ``running`` in the manifest while it works, then ``done`` or ``failed``
    (with the error); the turns completed before a failure stay in the transcript.

    Raises:
        RunError: the director stage is not done.
        PipelineError: an endpoint failed.
    """
    if params.turns < 1:
        raise ValueError("turns must be at least 1")
    out = listener or _Silent()
    roles_doc = director.load_roles(run)
    roles = roles_doc["roles"]
    inputs = {
        "roles_sha256": sha256_of(roles_doc),
        "endpoints": [
            {"base_url": c.endpoint.base_url, "model": c.endpoint.model} for c in clients
        ],
        "parameters": asdict(params),
    }
    run.archive_stage(STAGE)
    lines: list[dict[str, Any]] = []
    usage: dict[str, int] | None = None  # stays None when the server reports no usage
    with run.stage_running(
        STAGE, endpoint=clients[0].endpoint.describe(), parameters=asdict(params), inputs=inputs
    ):
        for turn in range(1, params.turns + 1):
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
                if result.usage is not None:
                    usage = {k: (usage or {}).get(k, 0) + v for k, v in result.usage.items()}
            run.append_transcript(line)
            lines.append(line)
            out.turn_finished(line)
        run.write_text(TRANSCRIPT_MD, render_markdown(run.task, roles_doc, lines))
    run.finish_stage(STAGE, usage=usage)
    return lines


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
