"""The dialogue stage: the roles converse, one turn at a time, until the conversation ends.

Turn 1 is the opening line, spoken by ``roles[0]`` as written by the director (it is
not generated). Then the floor passes round-robin, or a moderator model picks the
next speaker. Each call sends the speaking role's system prompt (the director's prompt
with the termination contract, ``templates/role.j2``), its own earlier turns as
``assistant`` messages and the others' as ``user`` messages (prefixed with the
speaker's name when more than two roles talk). Why the dialogue ended is recorded as
its ``termination_reason`` (see :mod:`pipeline.termination`).

Artifacts (in ``dialogue/``): ``transcript.jsonl``, one line per turn
(``schemas/transcript-line.schema.json``), appended and fsynced as each turn
completes; ``transcript.md``, the transcript rendered for reading at the end;
``moderator/`` the moderator's requests and answers, with the moderator floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Protocol

from . import director, schemas, templates
from .client import Message, ModelClient, calls_to
from .errors import PipelineError, RunError
from .parameters import DialogueParameters
from .runs import Run, sha256_of
from .termination import TokenFilter, detect_loop, said_done, strip_token

STAGE = "dialogue"
TRANSCRIPT_MD = "dialogue/transcript.md"
NEXT_SPEAKER = "next-speaker.schema.json"


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


def role_prompt(roles_doc: dict[str, Any], index: int) -> str:
    """The system prompt role ``index`` is given: its prompt and the termination contract."""
    roles = roles_doc["roles"]
    contract = roles_doc["termination"]
    names = [r["name"] for r in roles]
    declarer = contract["declared_by"]
    return templates.render(
        "role.j2",
        system_prompt=roles[index]["system_prompt"],
        others=[n for i, n in enumerate(names) if i != index],
        done_token=contract["done_token"],
        declared_by=declarer,
        acceptance_criteria=contract["acceptance_criteria"],
        declares=declarer == names[index] or declarer not in names,
    ).strip()


def messages_for(
    speaker: int, roles_doc: dict[str, Any], lines: Sequence[dict[str, Any]]
) -> list[Message]:
    """The messages sent for role ``speaker``'s next turn: its system prompt, then every
    turn so far, its own as ``assistant`` and the others' as ``user`` (with the speaker's
    name in front when more than two roles talk)."""
    named = len(roles_doc["roles"]) > 2
    messages: list[Message] = [{"role": "system", "content": role_prompt(roles_doc, speaker)}]
    for line in lines:
        if line["role_index"] == speaker:
            messages.append({"role": "assistant", "content": line["content"]})
        else:
            text = f"{line['role']}: {line['content']}" if named else line["content"]
            messages.append({"role": "user", "content": text})
    return messages


def render_markdown(task: str, roles_doc: dict[str, Any], lines: Sequence[dict[str, Any]]) -> str:
    """The transcript as Markdown (``templates/transcript.md.j2``), done token removed."""
    token = roles_doc["termination"]["done_token"]
    shown = [{**line, "content": strip_token(line["content"], token)} for line in lines]
    return templates.render("transcript.md.j2", task=task, roles=roles_doc, lines=shown)


def dialogue_inputs(
    roles_doc: dict[str, Any], clients: Sequence[ModelClient], params: DialogueParameters
) -> dict[str, Any]:
    """What the dialogue stage depends on; its sha256 is the stage's input hash. The
    embedded model counts as one endpoint per GGUF file, whatever local port served it."""
    return {
        "roles_sha256": sha256_of(roles_doc),
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


def is_current(run: Run, clients: Sequence[ModelClient], params: DialogueParameters) -> bool:
    """True when the dialogue stage is done with exactly these inputs (nothing to redo)."""
    entry = run.stage(STAGE)
    if entry["status"] != "done":
        return False
    inputs = dialogue_inputs(director.load_roles(run), clients, params)
    return bool(entry["input_hash"] == sha256_of(inputs))


class _Ending:
    """Watches the turns and says when, and why, the conversation is over."""

    def __init__(self, roles_doc: dict[str, Any], params: DialogueParameters) -> None:
        names = [r["name"] for r in roles_doc["roles"]]
        contract = roles_doc["termination"]
        self.token = contract["done_token"]
        declarer = contract["declared_by"]
        self.declarers = {names.index(declarer)} if declarer in names else set(range(len(names)))
        self.participants = len(names)
        self.params = params
        self.closing_left: int | None = None
        self.done_at: int | None = None
        self.tokens = 0

    def observe(self, line: dict[str, Any], contents: Sequence[str]) -> tuple[str, int] | None:
        """Take in one more turn (``contents`` is every turn's text so far); return the
        termination reason and the turn it fired at, or None to go on."""
        turn = line["turn"]
        usage = line.get("usage") or {}
        self.tokens += usage.get("prompt_tokens", 0) + usage.get(
            "completion_tokens", line.get("chunks", 0)
        )
        if self.closing_left is not None:
            self.closing_left -= 1
            return ("done_token", self.done_at or turn) if self.closing_left <= 0 else None
        if line["generated"] and not strip_token(line["content"], self.token):
            return "empty_turn", turn
        if line["role_index"] in self.declarers and said_done(line, self.token):
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
        self,
        run: Run,
        roles_doc: dict[str, Any],
        params: DialogueParameters,
        moderator: ModelClient | None,
    ) -> None:
        self.run = run
        self.roles_doc = roles_doc
        self.names = [r["name"] for r in roles_doc["roles"]]
        self.params = params
        self.moderator = moderator if params.floor == "moderator" else None
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.fallbacks = 0

    def next(self, turn: int, lines: Sequence[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        """The index of turn ``turn``'s speaker, and how it was chosen."""
        if turn == 1:
            return 0, {"by": "opening"}
        rotation = (lines[-1]["role_index"] + 1) % len(self.names)
        if self.moderator is None or len(self.names) < 3:
            return rotation, {"by": "round-robin"}
        previous = lines[-1]["role_index"]
        candidates = [n for i, n in enumerate(self.names) if i != previous]
        try:
            pick = self._ask(turn, lines, candidates)
        except PipelineError as e:
            self.fallbacks += 1
            return rotation, {"by": "round-robin", "fallback": e.message}
        index = next(
            i for i, n in enumerate(self.names) if n == pick["next_speaker"] and i != previous
        )
        return index, {"by": "moderator", "reason": pick["reason"]}

    def _ask(self, turn: int, lines: Sequence[dict[str, Any]], candidates: list[str]) -> Any:
        assert self.moderator is not None
        from .structured import plan_in_run, remember_in_run

        document = schemas.load(NEXT_SPEAKER)
        document = {**document, "properties": {**document["properties"]}}
        document["properties"]["next_speaker"] = {"type": "string", "enum": candidates}
        token = self.roles_doc["termination"]["done_token"]
        prompt = templates.render(
            "moderator.j2",
            task=self.run.task,
            cast=self.roles_doc["roles"],
            lines=[{**line, "content": strip_token(line["content"], token)} for line in lines[-8:]],
            candidates=candidates,
        )
        endpoint = self.moderator.endpoint
        result = self.moderator.structured(
            [{"role": "user", "content": prompt}],
            schemas.Schema(NEXT_SPEAKER, document),
            max_tokens=200,
            temperature=0.2,
            dialects=plan_in_run(endpoint, self.run.manifest),
            repair_attempts=1,
            recorder=self.run.attempts(STAGE, prefix=f"moderator/turn-{turn}."),
            seed=self.params.seed,
        )
        remember_in_run(endpoint, self.run.manifest, result.dialect)
        for key in self.usage:
            self.usage[key] += result.usage.get(key, 0)
        return result.value


def run_dialogue(
    run: Run,
    clients: Sequence[ModelClient],
    params: DialogueParameters,
    listener: DialogueListener | None = None,
    *,
    resume: bool = False,
    moderator: ModelClient | None = None,
) -> list[dict[str, Any]]:
    """Run the dialogue stage of ``run`` (whose director stage is done); return the
    transcript lines. ``clients[i]`` speaks for ``roles[i]`` (the last client serves any
    role beyond the list); ``moderator`` picks speakers with the ``moderator`` floor.

    Without ``resume``, a transcript left by an earlier attempt is moved to
    ``dialogue/previous-N/`` first. With ``resume``, the stored turns are kept (a last line
    cut short by a crash is dropped, see :meth:`Run.read_transcript`) and the dialogue
    continues after the last complete turn. The stage is ``running`` in the manifest while
    it works, then ``done`` with its ``termination_reason`` and ``termination_turn``, or
    ``failed`` (``error`` or ``interrupted``); the turns completed before a failure stay
    in the transcript. Token usage is recorded per turn, per role and for the stage.

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
    run.mark_stale("judge")  # a verdict on an earlier transcript no longer holds
    ending = _Ending(roles_doc, params)
    outcome = None
    for i, line in enumerate(lines):  # a resumed dialogue may already have ended
        outcome = outcome or ending.observe(line, [x["content"] for x in lines[: i + 1]])
    floor = _Floor(run, roles_doc, params, moderator)
    with (
        run.stage_running(
            STAGE, endpoint=clients[0].endpoint.describe(), parameters=asdict(params), inputs=inputs
        ) as entry,
        calls_to(STAGE, run.record_call),
    ):
        entry["role_endpoints"] = [  # by position: role names need not be unique
            clients[min(i, len(clients) - 1)].endpoint.describe()
            for i in range(len(roles_doc["roles"]))
        ]
        if moderator is not None and params.floor == "moderator":
            entry["moderator_endpoint"] = moderator.endpoint.describe()
        if resume:
            entry["resumed_at_turn"] = len(lines) + 1
        try:
            while outcome is None and len(lines) < params.turns:
                turn = len(lines) + 1
                speaker, how = floor.next(turn, lines)
                client = clients[min(speaker, len(clients) - 1)]
                line = _take_turn(run, turn, speaker, roles_doc, lines, client, params, out)
                line["floor"] = how
                run.append_transcript(line)
                out.turn_finished(line)
                lines.append(line)
                outcome = ending.observe(line, [x["content"] for x in lines])
        except BaseException as e:
            entry["termination_reason"] = (
                "interrupted" if isinstance(e, KeyboardInterrupt) else "error"
            )
            entry.update(termination_turn=len(lines) or None, turns=len(lines))
            raise
        run.write_text(TRANSCRIPT_MD, render_markdown(run.task, roles_doc, lines))
    reason, at = outcome or ("max_turns", len(lines))
    extra: dict[str, Any] = {"usage_by_role": _usage_by_role(lines)}
    if params.floor == "moderator":
        extra.update(moderator_usage=floor.usage, moderator_fallbacks=floor.fallbacks)
    run.finish_stage(
        STAGE,
        usage=_usage(lines),
        termination_reason=reason,
        termination_turn=at,
        turns=len(lines),
        **extra,
    )
    return lines


def _take_turn(
    run: Run,
    turn: int,
    speaker: int,
    roles_doc: dict[str, Any],
    lines: list[dict[str, Any]],
    client: ModelClient,
    params: DialogueParameters,
    out: DialogueListener,
) -> dict[str, Any]:
    """Produce turn ``turn`` by role ``speaker`` and return its transcript line."""
    name = roles_doc["roles"][speaker]["name"]
    shown = TokenFilter(roles_doc["termination"]["done_token"])
    out.turn_started(turn, name)
    if turn == 1:
        out.delta(shown.feed(roles_doc["opening_line"]) + shown.flush())
        return _line(turn, name, speaker, roles_doc["opening_line"])
    request = client.chat_request(
        messages_for(speaker, roles_doc, lines),
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        seed=params.seed,
    )
    result = client.stream(request, lambda text: out.delta(shown.feed(text)))
    out.delta(shown.flush())
    line = _line(turn, name, speaker, result.content, generated=True)
    line.update(
        finish_reason=result.finish_reason,
        model=result.model,
        base_url=client.endpoint.base_url,
        usage=result.usage,
        chunks=result.chunks,
    )
    return line


def _usage(lines: Sequence[dict[str, Any]]) -> dict[str, int] | None:
    """Token counts summed over the turns that report them; None when none does."""
    reported = [line["usage"] for line in lines if line.get("usage")]
    if not reported:
        return None
    return {key: sum(u[key] for u in reported) for key in ("prompt_tokens", "completion_tokens")}


def _usage_by_role(lines: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Token counts per role name, over the turns that report them."""
    by_role: dict[str, dict[str, int]] = {}
    for line in lines:
        if line.get("usage"):
            total = by_role.setdefault(line["role"], {"prompt_tokens": 0, "completion_tokens": 0})
            for key in total:
                total[key] += line["usage"][key]
    return by_role


def _check_continuation(
    run: Run, roles_doc: dict[str, Any], lines: Sequence[dict[str, Any]], turns: int
) -> None:
    """Refuse to resume a transcript that does not belong to these roles or is too long."""
    names = [r["name"] for r in roles_doc["roles"]]
    for expected, line in enumerate(lines, start=1):
        index = line.get("role_index")
        fits = (
            line.get("turn") == expected
            and isinstance(index, int)
            and 0 <= index < len(names)
            and line.get("role") == names[index]
            and (expected > 1 or (index == 0 and line.get("content") == roles_doc["opening_line"]))
        )
        if not fits:
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
