"""The import stage: a chat history brought in as a run (``pipeline import``).

An imported run follows :data:`pipeline.stages.IMPORTED`: its only stage is ``import``,
and the judge may follow. It has no director and no dialogue. Its artifacts (in
``import/``):

``transcript.jsonl``
    the conversation, in the schema of a dialogue's transcript
    (``schemas/transcript-line.schema.json``), every line of kind ``imported``.
``roles.json``
    one role per speaker, in order of first appearance, with an empty system prompt
    (``schemas/roles.schema.json``, version 2): what :func:`pipeline.director.load_roles`
    gives for an imported run, so ``show``, ``export``, ``diff`` and the judge work on it.

The stage's record in ``run.json`` holds the format, the file's name and sha256, the
user's own side (``me``), the number of messages and what was left out
(``parameters``). Consecutive messages of one speaker are one turn
(:func:`pipeline.chats.merge_turns`). A file that cannot be read creates no run: the
file is parsed in full, and the run written, before the run exists; a run cut short
while it is written is removed.

Times: WhatsApp exports hold the phone's local time with no zone, read in ``timezone``
(an IANA name; the computer's own zone when None); the other formats hold UTC.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import schemas
from .choices import DEFAULT_DONE_TOKEN
from .errors import Fix, ImportFormatError, RunError
from .records import RolesDocument, Turn
from .resources import file_sha256
from .runs import Run, create_run
from .stages import IMPORTED

if TYPE_CHECKING:
    from .chats import Chat
    from .stages import StageContext

STAGE = "import"
ROLES = "import/roles.json"
FORMAT_NAMES = {"whatsapp": "WhatsApp", "telegram": "Telegram", "chatgpt": "ChatGPT"}


@dataclass(frozen=True)
class Prepared:
    """One chat, ready to be written as a run."""

    task: str
    roles: dict[str, Any]
    turns: list[Turn]
    parameters: dict[str, Any]


def import_chats(
    runs_dir: Path,
    fmt: str,
    path: Path,
    *,
    me: str | None = None,
    task: str | None = None,
    conversation: str | None = None,
    zone: str | None = None,
    personas: Mapping[str, str] | None = None,
) -> list[Run]:
    """Import the chat(s) of export ``path`` in format ``fmt``
    (:data:`pipeline.chats.IMPORT_FORMATS`) as runs, one per chat (a ChatGPT export holds
    many: ``conversation``, an id or a title, picks one).

    Args:
        me: the speaker who is the user (recorded; datasets and personas use it).
        task: what the chat was for; by default a description of it.
        zone: the IANA time zone of a WhatsApp export's times (the computer's when None).
        personas: speakers to import as personas, ``{speaker: persona name}``: their role
            is named after the persona (``me`` is then the persona's name too).

    Raises:
        ImportFormatError: the file cannot be read as ``fmt`` (the message names the line
            and what was expected), holds no message, ``me`` is not one of its speakers,
            or ``zone`` is unknown. No run is created.
        RunError: a run folder cannot be written.
    """
    from .chats import parse_chats

    chats = parse_chats(fmt, path, conversation=conversation)
    source = {"file": path.name, "sha256": file_sha256(path)}
    mapped = dict(personas or {})
    prepared = [_prepare(chat, fmt, path, source, me, task, zone, mapped) for chat in chats]
    return [_write(runs_dir, one) for one in prepared]


def _prepare(
    chat: Chat,
    fmt: str,
    path: Path,
    source: dict[str, str],
    me: str | None,
    task: str | None,
    zone: str | None,
    personas: dict[str, str],
) -> Prepared:
    from .chats import merge_turns, speakers

    names = speakers(chat.messages)
    if unknown := [s for s in personas if s not in names]:
        raise ImportFormatError(
            f"{path.name}: no speaker named {unknown[0]!r} to import as a persona in "
            f"{_what(chat, fmt)} (speakers: {', '.join(names[:10])})",
            path=path,
        )
    if not names:
        raise ImportFormatError(
            f"{path.name}: {_what(chat, fmt)} holds no message to import", path=path
        )
    if me is not None and me not in names:
        raise ImportFormatError(
            f"{path.name}: no speaker named {me!r} in {_what(chat, fmt)} "
            f"(speakers: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})",
            fix=Fix("pass one of them as {}", ("me",)),
            path=path,
        )
    merged = [
        dataclasses.replace(t, speaker=personas.get(t.speaker, t.speaker))
        for t in merge_turns(chat.messages)
    ]
    names = list(dict.fromkeys(personas.get(n, n) for n in names))
    me = personas.get(me, me) if me is not None else None
    when = _times(fmt, zone, path)
    turns = [
        Turn(
            turn=number,
            role=t.speaker,
            role_index=names.index(t.speaker),
            content=t.text,
            kind="imported",
            time=when(t.time),
        )
        for number, t in enumerate(merged, start=1)
    ]
    task = task or _describe(chat, fmt, names, turns)
    roles = {
        "roles": [{"name": name, "system_prompt": ""} for name in names],
        "termination": {
            "done_token": DEFAULT_DONE_TOKEN,
            "declared_by": names[0],
            "acceptance_criteria": f"The chat served its purpose: {task}"[:4000],
        },
        "opening_line": turns[0].content or "(empty)",
    }
    parameters = {
        "format": fmt,
        **source,
        "conversation": chat.conversation_id,
        "title": chat.title,
        "me": me,
        "personas": personas or None,
        "messages": len(chat.messages),
        "skipped": dict(chat.skipped),
    }
    return Prepared(task, roles, turns, parameters)


def _write(runs_dir: Path, prepared: Prepared) -> Run:
    run = create_run(runs_dir, prepared.task, stage_names=tuple(s.name for s in IMPORTED))
    try:
        with run.stage_running(STAGE, endpoint=None, parameters=prepared.parameters, inputs={}):
            run.write_json(ROLES, prepared.roles)
            run.write_transcript(prepared.turns)
            run.finish_stage(STAGE)
    except BaseException:
        shutil.rmtree(run.folder, ignore_errors=True)  # no half-written run
        raise
    return run


def _what(chat: Chat, fmt: str) -> str:
    title = f" {chat.title!r}" if chat.title else ""
    return f"the {FORMAT_NAMES[fmt]} chat{title}"


def _describe(chat: Chat, fmt: str, names: Sequence[str], turns: Sequence[Turn]) -> str:
    """The default task of an imported chat: what it is, who speaks, how long, when."""
    who = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    dates = sorted(t.time[:10] for t in turns if t.time)
    span = f", {dates[0]} to {dates[-1]}" if dates else ""
    title = f" {chat.title!r}" if chat.title else ""
    return f"A {FORMAT_NAMES[fmt]} chat{title} between {who} ({len(turns)} turns{span})"


def _times(fmt: str, zone: str | None, path: Path) -> Any:
    """How a message's time becomes a transcript line's (UTC, ``...Z``)."""
    tz: Any = None
    if zone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            tz = ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ImportFormatError(
                f"{zone!r} is not a time zone (use an IANA name such as Europe/Paris or UTC)",
                path=path,
            ) from e

    def utc(time: str | None) -> str | None:
        if time is None:
            return None
        moment = datetime.fromisoformat(time.replace("Z", "+00:00"))
        if moment.tzinfo is None:  # a WhatsApp time: the phone's clock
            moment = moment.replace(tzinfo=tz) if tz is not None else moment.astimezone()
        return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    return utc


def load_speakers(run: Run) -> RolesDocument:
    """The roles of imported run ``run``: one per speaker, with no system prompt.

    Raises:
        RunError: the import did not finish (the run is incomplete).
        StructuredOutputError: ``import/roles.json`` no longer matches the schema.
    """
    if run.stage(STAGE).status != "done":
        raise RunError(
            f"the import of run {run.run_id} did not finish",
            fix=Fix("import the chat again", command=("import", "FORMAT", "FILE")),
            run_id=run.run_id,
            stage=STAGE,
        )
    from .director import read_roles

    return read_roles(run, ROLES, schemas.CURRENT_VERSION, STAGE)


def me(run: Run) -> str | None:
    """The speaker of imported run ``run`` who is the user (``--me``), or None."""
    value = run.stage(STAGE).parameters.get("me")
    return value if isinstance(value, str) else None


# -- the stage, as the graph sees it ------------------------------------------------------


def inputs(ctx: StageContext) -> object:
    """See :mod:`pipeline.stages`: the file imported."""
    return {k: ctx.run.stage(STAGE).parameters.get(k) for k in ("format", "sha256")}


def run(ctx: StageContext) -> None:
    """An import is made once, by :func:`import_chats`; it cannot be run again.

    Raises:
        RunError: always.
    """
    raise RunError(
        f"run {ctx.run.run_id} is an imported chat: its import cannot be run again",
        fix=Fix("import the chat again", command=("import", "FORMAT", "FILE")),
        run_id=ctx.run.run_id,
        stage=STAGE,
    )
