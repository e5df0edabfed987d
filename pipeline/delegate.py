"""``delegate``: a nested pipeline as a tool.

With ``ToolParameters.delegate``, every role gets a ``delegate`` tool with the arguments
``{"task": string, "roles": integer (optional), "turns": integer (optional)}``. A call
starts a **child run** in the same runs folder: its director, dialogue and judge, on the
parent's endpoints and parameters (``roles`` and ``turns`` narrow them). The child's
deliverable is the tool's result: the judge's ``deliverable``, or its last turns when
the judge found none.

A child is a run of its own: its ``run.json`` names its parent run, the turn and the tool
call that started it (``parent``), and the parent's lists its children (``children``).
Its id is the parent's with ``-t<turn>-<n>`` appended (the n-th call of that turn), so
the same call makes the same child: a resumed parent goes on with the child it had
started (whose finished stages are not redone), and a replay replays the same child.
What varies per run (ids, times) never reaches a model: only the deliverable does.

Limits, each a tool result that names it rather than an error: a run at depth
``max_depth`` (the root is at 0) may not delegate, and a run may start at most
``max_children`` children.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from . import stages
from .errors import PipelineError
from .records import ParentLink
from .tools import Tool, Toolbox, ToolError, ToolUse

if TYPE_CHECKING:
    from pathlib import Path

    from .runs import Run

NAME = "delegate"
DESCRIPTION = (
    "Hand a self-contained sub-task to a new team of AI roles, who discuss it in a "
    "conversation of their own and return what they produced. Use it for a part of the "
    "task that needs work of its own."
)
PARAMETERS = {
    "type": "object",
    "properties": {
        "task": {"type": "string", "minLength": 1, "description": "The sub-task, in full."},
        "roles": {"type": "integer", "minimum": 2, "maximum": 8},
        "turns": {"type": "integer", "minimum": 1, "maximum": 1000},
    },
    "required": ["task"],
    "additionalProperties": False,
}
LAST_TURNS = 2  # the child's deliverable when its judge found none


def depth(run: Run) -> int:
    """How deep ``run`` is in its tree: 0 for a root, its parent's depth plus one for a
    child (the parents' manifests are read from the same runs folder).

    Raises:
        RunError: a parent run is missing or unreadable.
    """
    from .runs import open_run

    link = run.manifest.parent
    return 0 if link is None else 1 + depth(open_run(run.folder.parent, link.run_id))


def child_id(parent: str, use: ToolUse) -> str:
    """The id of the child run the call ``use`` starts: deterministic."""
    return f"{parent}-t{use.turn}-{use.index}"


class Delegation:
    """The tool source of a run whose roles may delegate (a :class:`pipeline.stages.ToolSource`)."""

    def toolbox(self, ctx: stages.StageContext, speaker: int, role: str) -> Toolbox:
        def run(arguments: dict[str, Any], use: ToolUse) -> str:
            return delegate(ctx, arguments, use)

        return Toolbox([Tool(NAME, DESCRIPTION, PARAMETERS, run, source=NAME)])

    def child(self, run_id: str) -> Delegation:
        return self


def delegate(ctx: stages.StageContext, arguments: dict[str, Any], use: ToolUse) -> str:
    """Run the child run the call asks for (or finish it, when an earlier attempt started
    it) and return its deliverable.

    Raises:
        ToolError: a limit is reached, or the child run failed; the message says which.
    """
    from .judge import VERDICT, load_verdict
    from .runs import open_run

    parent = ctx.run
    limits = ctx.plan.tools
    here = depth(parent)
    if here >= limits.max_depth:
        raise ToolError(
            f"the depth limit is reached (max_depth {limits.max_depth}): this run may not "
            "delegate; do this part yourself"
        )
    runs_dir = parent.folder.parent
    name = child_id(parent.run_id, use)
    children = list(parent.manifest.children or [])
    if name not in children and len(children) >= limits.max_children:
        raise ToolError(
            f"the limit of child runs is reached (max_children {limits.max_children}); "
            "do this part yourself"
        )
    plan = dataclasses.replace(
        ctx.plan,
        director=dataclasses.replace(
            ctx.plan.director, roles=arguments.get("roles", ctx.plan.director.roles)
        ),
        dialogue=dataclasses.replace(
            ctx.plan.dialogue, turns=arguments.get("turns", ctx.plan.dialogue.turns)
        ),
    )
    try:
        if (runs_dir / name / "run.json").is_file():
            child = open_run(runs_dir, name)
        else:
            child = plan.new_run(runs_dir, arguments["task"], run_id=name, judge=True)
            child.manifest.parent = ParentLink(parent.run_id, use.turn, use.call.id)
            child.save()
        if name not in children:
            parent.manifest.children = [*children, name]
            parent.save()
        with child.locked():
            child_ctx = stages.StageContext(
                child,
                ctx.models.child(name),
                plan,
                ctx.listener.nested(name, child.task),
                tools=ctx.tools.child(name) if ctx.tools is not None else Delegation(),
            )
            stages.advance(child_ctx, include=("judge",))
        ctx.listener.delta(f"\n< back from run {name}\n")
        if child.path(VERDICT).is_file() and (made := load_verdict(child).deliverable):
            return made
        return "\n\n".join(f"{t.role}: {t.content}" for t in child.read_transcript()[-LAST_TURNS:])
    except PipelineError as e:
        raise ToolError(f"the child run {name} failed: {e.message}") from e


@dataclasses.dataclass(frozen=True)
class WorstCase:
    """The most a run (and the tree of runs it may delegate to) can ask of the models.

    Attributes:
        runs: runs in the tree, the root included: ``1 + C + C**2 + ... + C**D`` for at
            most ``C`` children per run and a depth of ``D``.
        director, dialogue, judge: model calls of each stage of one run, at most.
    """

    runs: int
    director: int
    dialogue: int
    judge: int

    @property
    def per_run(self) -> int:
        return self.director + self.dialogue + self.judge

    @property
    def calls(self) -> int:
        return self.runs * self.per_run


DIALECT_FALLBACKS = 2  # auto tries json_schema, then json_object, then prompt


def worst_case(plan: stages.Plan, *, judge: bool, tools: bool = False) -> WorstCase:
    """The most model calls ``plan`` can make: every structured answer re-asked for every
    repair, once for its length and through every dialect; every generated turn using
    every tool round (and falling back once from ``tools``) when the roles have tools
    (``delegate``, or ``tools`` for others); a moderator's pick repaired once; every run
    delegating as far as the limits allow."""
    limits = plan.tools
    runs = (
        sum(limits.max_children**d for d in range(limits.max_depth + 1)) if limits.delegate else 1
    )

    def answer(repairs: int) -> int:
        return repairs + 2 + DIALECT_FALLBACKS

    per_turn = (limits.max_rounds + 2) if limits.delegate or tools else 1
    if plan.dialogue.floor == "moderator":
        per_turn += 2 + DIALECT_FALLBACKS
    return WorstCase(
        runs,
        answer(plan.director.repair_attempts),
        (plan.dialogue.turns - 1) * per_turn,
        answer(plan.judge.repair_attempts) if judge else 0,
    )


def tree_tokens(runs_dir: Path, run_id: str) -> int:
    """The tokens run ``run_id`` and every run it delegated to used, by every stage, as
    their manifests recorded (0 for a run that cannot be read)."""
    from .errors import RunError
    from .runs import open_run

    try:
        run = open_run(runs_dir, run_id)
    except RunError:
        return 0
    own = 0
    for entry in run.manifest.stages.values():
        for usage in (entry.usage, entry.moderator_usage):
            own += usage.total if usage is not None else 0
    return own + sum(tree_tokens(runs_dir, child) for child in run.manifest.children or [])


def children_tokens(run: Run, turn: int) -> int:
    """The tokens of the runs that turn ``turn`` of ``run`` delegated to (and theirs)."""
    prefix = f"{run.run_id}-t{turn}-"
    mine = [c for c in run.manifest.children or [] if c.startswith(prefix)]
    return sum(tree_tokens(run.folder.parent, child) for child in mine)
