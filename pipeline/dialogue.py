"""The dialogue stage: the roles converse, one turn at a time, until the conversation ends.

Turn 1 is the opening line, spoken by ``roles[0]`` as written by the director (it is
not generated). Then the floor passes round-robin, or a moderator model picks the
next speaker. Each call sends the speaking role's system prompt (the director's prompt
with the termination contract, ``templates/role.j2``), its own earlier turns as
``assistant`` messages and the others' as ``user`` messages (prefixed with the
speaker's name when more than two roles talk). Why the dialogue ended is recorded as
its ``termination_reason`` (see :mod:`pipeline.termination`).

A person can take part (``ctx.human``, :mod:`pipeline.human`): speak a role's turns
(lines of kind ``human``), add a note before a model's turn (the line's ``note``, shown
to that speaker from then on), or stop the dialogue (``human_quit``, resumable).

Artifacts (in ``dialogue/``): ``transcript.jsonl``, one line per turn
(``schemas/transcript-line.schema.json``), appended and fsynced as each turn
completes; ``transcript.md``, the transcript rendered for reading at the end;
``moderator/`` the moderator's requests and answers, with the moderator floor.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

from . import delegate, director, schemas, structured, templates, tooluse
from .client import Message, ModelClient
from .errors import Fix, PipelineError, RunError
from .human import Cue, HumanQuit
from .parameters import DialogueParameters
from .records import Floor, RolesDocument, Turn, Usage, sha256_of, total_usage
from .termination import TokenFilter, detect_loop, said_done, strip_token
from .tools import OFFERED, Toolbox, offered

if TYPE_CHECKING:
    from .runs import Run
    from .stages import StageContext

STAGE = "dialogue"
TRANSCRIPT_MD = "dialogue/transcript.md"
NEXT_SPEAKER = "next-speaker.schema.json"


def role_prompt(roles: RolesDocument, index: int) -> str:
    """The system prompt role ``index`` is given: its prompt and the termination contract."""
    names = roles.names
    contract = roles.termination
    return templates.render(
        "role.j2",
        system_prompt=roles.roles[index].system_prompt,
        others=[n for i, n in enumerate(names) if i != index],
        done_token=contract.done_token,
        declared_by=contract.declared_by,
        acceptance_criteria=contract.acceptance_criteria,
        declares=index in roles.declarers,
    ).strip()


def named(roles: RolesDocument) -> bool:
    """True when a role's messages say who spoke them: more than two roles talk, so a
    role hears more than one other."""
    return len(roles.roles) > 2


NOTE = "(A note to you from the person following this conversation: {note})"


def messages_for(
    speaker: int, roles: RolesDocument, turns: Sequence[Turn], note: str | None = None
) -> list[Message]:
    """The messages sent for role ``speaker``'s next turn: its system prompt, then every
    turn so far, its own as ``assistant`` and the others' as ``user`` (with the speaker's
    name in front when more than two roles talk: :func:`named`).

    A person's note to the speaker (``note`` for this turn, a line's ``note`` for its
    earlier ones) comes right before the turn it was given for (:data:`NOTE`), added to
    the ``user`` message there, or as one when there is none."""
    prefixed = named(roles)
    messages: list[Message] = [{"role": "system", "content": role_prompt(roles, speaker)}]

    def tell(text: str) -> None:
        told = NOTE.format(note=text)
        if messages[-1]["role"] == "user":
            messages[-1] = {"role": "user", "content": f"{messages[-1]['content']}\n\n{told}"}
        else:
            messages.append({"role": "user", "content": told})

    for turn in turns:
        if turn.role_index == speaker:
            if turn.note is not None:
                tell(turn.note)
            messages.append({"role": "assistant", "content": turn.content})
        else:
            text = f"{turn.role}: {turn.content}" if prefixed else turn.content
            messages.append({"role": "user", "content": text})
    if note is not None:
        tell(note)
    return messages


def shown(turns: Sequence[Turn], done_token: str) -> list[Turn]:
    """``turns`` with the done token taken out of what they say, for reading."""
    return [dataclasses.replace(t, content=strip_token(t.content, done_token)) for t in turns]


def render_markdown(task: str, roles: RolesDocument, turns: Sequence[Turn]) -> str:
    """The transcript as Markdown (``templates/transcript.md.j2``), done token removed."""
    return templates.render(
        "transcript.md.j2", task=task, roles=roles, lines=shown(turns, roles.done_token)
    )


def dialogue_inputs(
    roles: RolesDocument, clients: Sequence[ModelClient], params: DialogueParameters
) -> dict[str, object]:
    """What the dialogue stage depends on; its sha256 is the stage's input hash. The
    embedded model counts as one endpoint per GGUF file, whatever local port served it."""
    return {
        "roles_sha256": sha256_of(roles.to_json()),
        "endpoints": [
            {
                "base_url": "embedded" if c.endpoint.embedded else c.endpoint.base_url,
                "model": c.endpoint.model,
                **({"gguf_sha256": c.endpoint.gguf_sha256} if c.endpoint.gguf_sha256 else {}),
            }
            for c in clients
        ],
        "parameters": asdict(params),
    }


def check(run: Run) -> None:
    """See :mod:`pipeline.stages`.

    Raises:
        RunError: the director stage is not done.
        StructuredOutputError: its roles no longer match the schema.
    """
    director.load_roles(run)


def inputs(ctx: StageContext) -> object:
    """See :mod:`pipeline.stages`. With tools, the tools each role is offered and how.

    Raises:
        PipelineError: the person (``ctx.human``) cannot take part with these roles.
    """
    roles = director.load_roles(ctx.run)
    ctx.human.check(roles, ctx.run)  # before anything is archived
    found = dialogue_inputs(roles, ctx.models.roles(roles), ctx.plan.dialogue)
    if ctx.tools is not None:
        offered = [list(ctx.tools.toolbox(ctx, i, r.name).tools) for i, r in enumerate(roles.roles)]
        found["tools"] = {"offered": offered, "parameters": asdict(ctx.plan.tools)}
    return found


class _Ending:
    """Watches the turns and says when, and why, the conversation is over."""

    def __init__(
        self,
        roles: RolesDocument,
        params: DialogueParameters,
        delegated: Callable[[int], int] = lambda turn: 0,
    ) -> None:
        self.delegated = delegated  # the tokens of the runs a turn delegated to
        self.token = roles.done_token
        self.declarers = roles.declarers
        self.participants = len(roles.roles)
        self.params = params
        self.closing_left: int | None = None
        self.done_at: int | None = None
        self.tokens = 0

    def observe(self, line: Turn, contents: Sequence[str]) -> tuple[str, int] | None:
        """Take in one more turn (``contents`` is every turn's text so far); return the
        termination reason and the turn it fired at, or None to go on."""
        turn = line.turn
        if line.usage is not None:
            self.tokens += line.usage.total
        else:
            self.tokens += line.chunks or 0
        if line.tool_calls:
            self.tokens += self.delegated(turn)
        if self.closing_left is not None:
            self.closing_left -= 1
            return ("done_token", self.done_at or turn) if self.closing_left <= 0 else None
        if line.generated and not strip_token(line.content, self.token):
            return "empty_turn", turn
        if line.role_index in self.declarers and said_done(line, self.token):
            self.done_at = turn
            if self.params.closing_turns <= 0:
                return "done_token", turn
            self.closing_left = self.params.closing_turns
            return None
        if self.params.detect_loops and detect_loop(contents, self.participants):
            return "loop", turn
        budget = self.params.max_tokens_total
        if budget is not None and self.tokens >= budget:
            return "token_budget", turn
        return None


class _Floor:
    """Who speaks next: round-robin, or a moderator model's schema-checked pick that falls
    back to round-robin when no valid pick comes."""

    def __init__(
        self, ctx: StageContext, roles: RolesDocument, moderator: ModelClient | None
    ) -> None:
        self.ctx = ctx
        self.roles = roles
        self.names = roles.names
        self.moderator = moderator
        self.usage = Usage()
        self.fallbacks = 0

    def next(self, turn: int, lines: Sequence[Turn]) -> tuple[int, Floor]:
        """The index of turn ``turn``'s speaker, and how it was chosen."""
        if turn == 1:
            return 0, Floor("opening")
        rotation = (lines[-1].role_index + 1) % len(self.names)
        if self.moderator is None or len(self.names) < 3:
            return rotation, Floor("round-robin")
        previous = lines[-1].role_index
        candidates = [n for i, n in enumerate(self.names) if i != previous]
        try:
            pick = self._ask(self.moderator, turn, lines, candidates)
        except PipelineError as e:
            self.fallbacks += 1
            return rotation, Floor("round-robin", fallback=e.message)
        index = next(
            i for i, n in enumerate(self.names) if n == pick["next_speaker"] and i != previous
        )
        return index, Floor("moderator", reason=pick["reason"])

    def _ask(
        self, moderator: ModelClient, turn: int, lines: Sequence[Turn], candidates: list[str]
    ) -> dict[str, str]:
        run = self.ctx.run
        document = schemas.load(NEXT_SPEAKER)
        document = {**document, "properties": {**document["properties"]}}
        document["properties"]["next_speaker"] = {"type": "string", "enum": candidates}
        prompt = templates.render(
            "moderator.j2",
            task=run.task,
            cast=self.roles.roles,
            lines=shown(lines[-8:], self.roles.done_token),
            candidates=candidates,
        )
        endpoint = moderator.endpoint
        result = structured.ask(
            moderator,
            structured.Question(
                [{"role": "user", "content": prompt}],
                schemas.Schema(NEXT_SPEAKER, document),
                max_tokens=200,
                temperature=0.2,
                dialects=structured.plan_in_run(endpoint, run.manifest),
                repair_attempts=1,
                seed=self.ctx.plan.dialogue.seed,
            ),
            self.ctx.recorder.attempts(prefix=f"moderator/turn-{turn}."),
        )
        structured.remember_in_run(endpoint, run.manifest, result.dialect)
        self.usage = self.usage + result.usage
        pick: dict[str, str] = result.value
        return pick


def run(ctx: StageContext) -> None:
    """Run the dialogue stage (the director's must be done); see :mod:`pipeline.stages`.
    ``ctx.models.roles`` gives each role's client (by position); with the ``moderator``
    floor, ``ctx.models.moderator()`` picks the speakers.

    Afresh, the conversation starts at the opening line. With ``ctx.resume``, the stored
    turns are kept (a last line cut short by a crash is dropped, see
    :meth:`pipeline.runs.Run.read_transcript`) and it goes on after the last complete
    turn. The stage is ``running`` in the manifest while it works, then ``done`` with its
    ``termination_reason`` and ``termination_turn``, or ``failed`` (``error``,
    ``interrupted``, or ``human_quit`` when the person stopped it); the turns completed
    before a failure stay in the transcript. Token usage is recorded per turn, per role
    and for the stage.

    Raises:
        RunError: the director stage is not done, or the stored turns do not belong to
            these roles.
        HumanQuit: the person stopped the dialogue.
        PipelineError: an endpoint failed.
    """
    params = ctx.plan.dialogue
    if params.turns < 1:
        raise ValueError("turns must be at least 1")
    run_ = ctx.run
    roles = director.load_roles(run_)
    clients = ctx.models.roles(roles)
    moderator = ctx.models.moderator() if params.floor == "moderator" else None
    lines = run_.read_transcript(repair=True) if ctx.resume else []
    if ctx.resume:
        _check_continuation(run_.run_id, roles, lines, params.turns)
    ending = _Ending(roles, params, functools.partial(delegate.children_tokens, run_))
    outcome = None
    for i, line in enumerate(lines):  # a resumed dialogue may already have ended
        outcome = outcome or ending.observe(line, [x.content for x in lines[: i + 1]])
    floor = _Floor(ctx, roles, moderator)
    if ctx.tools is not None and run_.manifest.manifest_version < 2:
        raise RunError(
            f"run {run_.run_id} was made before tool calls could be recorded",
            fix=Fix("start a new run", command=("generate", "TASK")),
            run_id=run_.run_id,
            stage=STAGE,
        )
    with ctx.running(
        endpoint=clients[0].endpoint, parameters=asdict(params), inputs=ctx.inputs
    ) as entry:
        if ctx.tools is not None:
            entry.tools = asdict(ctx.plan.tools)
            boxes = [ctx.tools.toolbox(ctx, i, r.name) for i, r in enumerate(roles.roles)]
            run_.write_json(OFFERED, offered([r.name for r in roles.roles], boxes))
        entry.role_endpoints = [  # by position: role names need not be unique
            clients[min(i, len(clients) - 1)].endpoint for i in range(len(roles.roles))
        ]
        if moderator is not None:
            entry.moderator_endpoint = moderator.endpoint
        if ctx.resume:
            entry.resumed_at_turn = len(lines) + 1
        run_.save()  # what the dialogue runs on, kept even if it is killed at once
        try:
            while outcome is None and len(lines) < params.turns:
                number = len(lines) + 1
                speaker, how = floor.next(number, lines)
                cue = Cue(run_.run_id, number, speaker, roles, tuple(lines))
                if number > 1 and ctx.human.plays(cue):
                    line = _human_turn(ctx, cue)
                else:
                    note = ctx.human.note(cue) if number > 1 else None
                    client = clients[min(speaker, len(clients) - 1)]
                    line = _take_turn(ctx, number, speaker, roles, lines, client, note)
                line = dataclasses.replace(line, floor=how)
                run_.append_transcript(line)
                ctx.listener.turn_finished(line)
                lines.append(line)
                outcome = ending.observe(line, [x.content for x in lines])
        except BaseException as e:
            entry.termination_reason = _stopped_by(e)
            entry.termination_turn, entry.turns = len(lines) or None, len(lines)
            raise
        run_.write_text(TRANSCRIPT_MD, render_markdown(run_.task, roles, lines))
    reason, at = outcome or ("max_turns", len(lines))
    entry.usage = total_usage([line.usage for line in lines])
    entry.termination_reason, entry.termination_turn, entry.turns = reason, at, len(lines)
    entry.usage_by_role = _usage_by_role(lines)
    if params.floor == "moderator":
        entry.moderator_usage, entry.moderator_fallbacks = floor.usage, floor.fallbacks
    run_.finish_stage(STAGE)


def _stopped_by(e: BaseException) -> str:
    """The termination reason of a dialogue that ``e`` ended."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return "human_quit" if isinstance(e, HumanQuit) else "error"


def _human_turn(ctx: StageContext, cue: Cue) -> Turn:
    """Turn ``cue.turn``, spoken by a person (``ctx.human``), shown to the listener once
    it is complete."""
    said = ctx.human.turn(cue)
    out = ctx.listener
    out.turn_started(cue.turn, cue.role)
    out.delta(strip_token(said.text, cue.roles.done_token))
    return Turn(cue.turn, cue.role, cue.speaker, said.text, kind="human", time=said.time)


def _take_turn(
    ctx: StageContext,
    number: int,
    speaker: int,
    roles: RolesDocument,
    lines: list[Turn],
    client: ModelClient,
    note: str | None = None,
) -> Turn:
    """Produce turn ``number`` by role ``speaker``, given a person's ``note``."""
    name = roles.roles[speaker].name
    visible = TokenFilter(roles.done_token)
    out = ctx.listener
    out.turn_started(number, name)
    if number == 1:
        out.delta(visible.feed(roles.opening_line) + visible.flush())
        return Turn(number, name, speaker, roles.opening_line, kind="opening")
    toolbox = ctx.tools.toolbox(ctx, speaker, name) if ctx.tools is not None else Toolbox([])
    answer = tooluse.generate(
        ctx,
        client,
        messages_for(speaker, roles, lines, note),
        toolbox,
        number,
        lambda text: out.delta(visible.feed(text)),
    )
    out.delta(visible.flush())
    result = answer.result
    return Turn(
        number,
        name,
        speaker,
        result.content,
        kind="generated",
        finish_reason=result.finish_reason,
        model=result.model,
        base_url=client.endpoint.base_url,
        usage=answer.usage,
        chunks=answer.chunks,
        time=result.time,
        tool_calls=answer.tool_calls,
        note=note,
    )


def _usage_by_role(lines: Sequence[Turn]) -> dict[str, Usage]:
    """Token counts per role name, over the turns that report them."""
    by_role: dict[str, Usage] = {}
    for line in lines:
        if line.usage is not None:
            by_role[line.role] = line.usage + by_role.get(line.role)
    return by_role


def _check_continuation(
    run_id: str, roles: RolesDocument, lines: Sequence[Turn], turns: int
) -> None:
    """Refuse to resume a transcript that does not belong to these roles or is too long."""
    names = roles.names
    for expected, line in enumerate(lines, start=1):
        index = line.role_index
        fits = (
            line.turn == expected
            and 0 <= index < len(names)
            and line.role == names[index]
            and (expected > 1 or (index == 0 and line.content == roles.opening_line))
        )
        if not fits:
            raise RunError(
                f"turn {expected} of the transcript of run {run_id} does not follow from its roles",
                fix=Fix("start the dialogue again", command=("rerun", run_id, STAGE)),
                run_id=run_id,
                stage=STAGE,
            )
    if len(lines) > turns:
        raise RunError(
            f"the transcript of run {run_id} already has {len(lines)} turns, more than {turns}",
            fix=Fix("start the dialogue again", command=("rerun", run_id, STAGE)),
            run_id=run_id,
            stage=STAGE,
        )
