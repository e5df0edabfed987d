"""The stage graph: which stages a run has, what each needs, and how far each has got.

A stage is declared once, in :data:`GRAPH`: its name, the stages whose output it reads,
its own main output, and the module that runs it. That module provides two functions:

``inputs(ctx) -> object``
    what the stage depends on, read once before it runs (``ctx.inputs``); its sha256 is
    the stage's ``input_hash``, and a stage ``done`` with the same hash is current
    (:func:`is_current`).
``run(ctx) -> None``
    the work, inside ``ctx.running(...)``, which records the stage in ``run.json``.
``check(run) -> None`` (optional)
    raises a :class:`~pipeline.errors.PipelineError` when the run is not ready for the
    stage (what it needs is not done); called before anything is archived.

Everything else comes from here, for every command (``generate``, ``converse``,
``rerun``, ``resume``, ``batch``, ``replay``): archiving a stage's old files to
``<stage>/previous-N/`` before it runs again, the order in which a run is brought to its
end (:func:`advance`), resuming, and staleness. A stage records the sha256 of each needed
stage's output when it starts (``upstream``); it is **stale** when one of those outputs has
changed since, or when a stage it needs is stale. ``stale`` in ``run.json`` is only a
stored copy of that (:func:`refresh`); runs made before ``upstream`` was recorded keep
their stored status.

This module is light (no third-party imports), so the CLI reads the stage names from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .parameters import (
    DialogueParameters,
    DirectorParameters,
    JudgeParameters,
    Persona,
    ToolParameters,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .client import ModelClient
    from .endpoints import Endpoint
    from .human import Cue, Said
    from .recorder import StageCalls
    from .records import JSONObject, RolesDocument, StageRecord, Turn
    from .runs import Run
    from .tools import Toolbox


@dataclass(frozen=True)
class Stage:
    """One node of the graph.

    Attributes:
        name: the stage's name: its folder in the run and its key in ``run.json``.
        needs: the stages whose output it reads.
        output: its main artifact (relative to the run folder), whose sha256 the stages
            that need it record.
        module: the module that runs it (see the module docstring).
        resumable: an unfinished attempt can go on where it stopped, instead of starting over.
        optional: run only when asked for (the judge).
        answer: its work is one structured answer from one model (and its repairs), not a
            conversation: its first request can be known, and answered, ahead of time
            (:func:`first_request`; a provider batch, :mod:`pipeline.batchapi`).
    """

    name: str
    needs: tuple[str, ...]
    output: str
    module: str
    resumable: bool = False
    optional: bool = False
    answer: bool = False

    def load(self) -> StageModule:
        module: StageModule = importlib.import_module(self.module)
        return module


GRAPH: tuple[Stage, ...] = (
    Stage("director", (), "director/roles.json", "pipeline.director", answer=True),
    Stage(
        "dialogue", ("director",), "dialogue/transcript.jsonl", "pipeline.dialogue", resumable=True
    ),
    Stage(
        "judge", ("dialogue",), "judge/verdict.json", "pipeline.judge", optional=True, answer=True
    ),
    Stage(
        "reflect",
        ("dialogue",),
        "reflect/reflections.json",
        "pipeline.reflect",
        optional=True,
        answer=True,
    ),
)
# An imported chat (pipeline import): its conversation comes from a chat export, not from
# a director and a dialogue; the judge reads it all the same.
IMPORTED: tuple[Stage, ...] = (
    Stage("import", (), "import/transcript.jsonl", "pipeline.importing"),
    Stage("judge", ("import",), "judge/verdict.json", "pipeline.judge", optional=True, answer=True),
    Stage(
        "reflect",
        ("import",),
        "reflect/reflections.json",
        "pipeline.reflect",
        optional=True,
        answer=True,
    ),
)
STAGE_NAMES = tuple(stage.name for stage in GRAPH)
_BY_NAME = {stage.name: stage for stage in GRAPH}
_IMPORTED = {stage.name: stage for stage in IMPORTED}


def require(run: Run, name: str) -> Stage:
    """Stage ``name`` of ``run``'s graph.

    Raises:
        RunError: ``run`` has no such stage (an imported chat has no director or dialogue).
    """
    if name not in (names := [node.name for node in graph(run)]):
        from .errors import Fix, RunError

        raise RunError(
            f"run {run.run_id} has no {name} stage (its stages: {', '.join(names)})",
            fix=Fix("see the run", command=("show", run.run_id)),
            run_id=run.run_id,
            stage=name,
        )
    return stage(name, run)


def conversation_stage(run: Run) -> str:
    """The stage that makes ``run``'s conversation: ``import`` for an imported chat,
    else ``dialogue``."""
    return "import" if run.imported else "dialogue"


def graph(run: Run) -> tuple[Stage, ...]:
    """The graph ``run`` follows: :data:`IMPORTED` for an imported chat, else :data:`GRAPH`."""
    return IMPORTED if run.imported else GRAPH


def stage(name: str, run: Run | None = None) -> Stage:
    """The declaration of stage ``name`` (in ``run``'s graph when given); KeyError for an
    unknown one."""
    return (_IMPORTED if run is not None and run.imported else _BY_NAME)[name]


class StageModule(Protocol):
    def inputs(self, ctx: StageContext) -> object: ...

    def run(self, ctx: StageContext) -> None: ...


class ClientSource(Protocol):
    """Where a stage gets its model clients: :class:`pipeline.models.Models`, or a replay's
    recorded ones."""

    def director(self) -> ModelClient: ...

    def moderator(self) -> ModelClient: ...

    def judge(self) -> ModelClient: ...

    def reflector(self) -> ModelClient:
        """The client that writes the reflections (the judge's, unless replayed)."""
        ...

    def roles(self, roles: RolesDocument) -> list[ModelClient]: ...

    def child(self, run_id: str) -> ClientSource:
        """The clients of the child run ``run_id`` (the same ones, except in a replay)."""
        ...


@dataclass(frozen=True)
class OneClient:
    """A :class:`ClientSource` that gives one client for everything (a library caller's, a
    test's or a benchmark's)."""

    client: ModelClient

    def director(self) -> ModelClient:
        return self.client

    def moderator(self) -> ModelClient:
        return self.client

    def judge(self) -> ModelClient:
        return self.client

    def reflector(self) -> ModelClient:
        return self.client

    def roles(self, roles: RolesDocument) -> list[ModelClient]:
        return [self.client for _ in roles.roles]

    def child(self, run_id: str) -> OneClient:
        return self


class ToolSource(Protocol):
    """The tools each role of a dialogue may call."""

    def toolbox(self, ctx: StageContext, speaker: int, role: str) -> Toolbox:
        """The tools of role ``role``, at position ``speaker`` (0-based)."""
        ...

    def child(self, run_id: str) -> ToolSource:
        """The tools of the child run ``run_id`` that a turn delegated to."""
        ...


class Listener(Protocol):
    """Receives the conversation as it happens (the CLI prints it)."""

    def turn_started(self, turn: int, role: str) -> None: ...

    def delta(self, text: str) -> None: ...

    def turn_finished(self, turn: Turn) -> None: ...

    def nested(self, run_id: str, task: str) -> Listener:
        """The listener of the child run ``run_id`` that a turn delegated ``task`` to."""
        ...


class Silent:
    """A :class:`Listener` that ignores everything."""

    def turn_started(self, turn: int, role: str) -> None:
        pass

    def delta(self, text: str) -> None:
        pass

    def turn_finished(self, turn: Turn) -> None:
        pass

    def nested(self, run_id: str, task: str) -> Silent:
        return self


class HumanSource(Protocol):
    """Where the turns a person speaks come from, and the notes a person adds before a
    model's turn (:mod:`pipeline.human`): the CLI's terminal, a replay's recording, a
    library caller's script. The dialogue asks it at each turn after the opening line."""

    def check(self, roles: RolesDocument, run: Run) -> None:
        """Raises a :class:`~pipeline.errors.PipelineError` when it cannot take part in
        ``run``'s dialogue with these roles (a role it plays is not one of them); called
        before the dialogue starts."""
        ...

    def plays(self, cue: Cue) -> bool:
        """True when a person speaks the turn ``cue`` asks for."""
        ...

    def turn(self, cue: Cue) -> Said:
        """The person's turn.

        Raises:
            HumanQuit: the person stopped the dialogue (it stays resumable).
        """
        ...

    def note(self, cue: Cue) -> str | None:
        """A note for the model that speaks the turn ``cue`` asks for, or None.

        Raises:
            HumanQuit: the person stopped the dialogue.
        """
        ...


class Nobody:
    """A :class:`HumanSource` with no person: the models speak every turn, without notes."""

    def check(self, roles: RolesDocument, run: Run) -> None:
        pass

    def plays(self, cue: Cue) -> bool:
        return False

    def turn(self, cue: Cue) -> Said:
        raise AssertionError("nobody plays a role")  # plays() is always False

    def note(self, cue: Cue) -> str | None:
        return None


@dataclass(frozen=True)
class Plan:
    """The parameters of every stage of a run."""

    director: DirectorParameters
    dialogue: DialogueParameters
    judge: JudgeParameters
    tools: ToolParameters = field(default_factory=ToolParameters)
    reflect: JudgeParameters = field(default_factory=JudgeParameters)
    persona: Persona | None = None

    @classmethod
    def of(
        cls,
        director: DirectorParameters | None = None,
        dialogue: DialogueParameters | None = None,
        judge: JudgeParameters | None = None,
        tools: ToolParameters | None = None,
        reflect: JudgeParameters | None = None,
        persona: Persona | None = None,
    ) -> Plan:
        """The defaults for what is not given; the judge samples with the dialogue's seed,
        and the reflection with the judge's parameters."""
        dialogue = dialogue or DialogueParameters()
        judge = judge or JudgeParameters(seed=dialogue.seed)
        return cls(
            director or DirectorParameters(),
            dialogue,
            judge,
            tools or ToolParameters(),
            reflect or judge,
            persona,
        )

    @classmethod
    def recorded(cls, run: Run) -> Plan:
        """The parameters ``run``'s stages were started (or planned) with."""

        def given(name: str) -> dict[str, Any]:
            entry = run.manifest.stages.get(name)
            return dict(entry.parameters) if entry is not None else {}

        judge, reflect, director = given("judge"), given("reflect"), given("director")
        dialogue = run.manifest.stages.get("dialogue")
        tools = dialogue.tools if dialogue is not None else None
        persona = director.pop("persona", None)
        return cls.of(
            DirectorParameters(**director),
            DialogueParameters(**given("dialogue")),
            JudgeParameters(**judge) if judge else None,
            ToolParameters(**tools) if tools else None,
            JudgeParameters(**reflect) if reflect else None,
            Persona(**persona) if persona else None,
        )

    def new_run(
        self,
        runs_dir: Path,
        task: str,
        *,
        run_id: str | None = None,
        judge: bool = False,
        reflect: bool = False,
    ) -> Run:
        """A new run for ``task`` planned with these parameters (see
        :func:`pipeline.runs.create_run`), the judge among its stages when ``judge`` and the
        reflection when ``reflect``, and
        its roles' tool use recorded up front: a run stopped before it got there resumes
        with them (:func:`planned_stages`).

        Raises:
            RunError: the run folder cannot be made, or ``run_id`` is taken.
        """
        from .runs import create_run

        planned = self.planned()
        if judge:
            planned["judge"] = dataclasses.asdict(self.judge)
        if reflect:
            planned["reflect"] = dataclasses.asdict(self.reflect)
        run = create_run(runs_dir, task, planned, run_id=run_id)
        if self.tools.delegate:
            run.stage("dialogue").tools = dataclasses.asdict(self.tools)
            run.save()
        return run

    def planned(self) -> dict[str, dict[str, Any]]:
        """The parameters recorded in a new run's manifest, stage by stage."""
        return {
            "director": self.director_parameters(),
            "dialogue": dataclasses.asdict(self.dialogue),
        }

    def director_parameters(self) -> dict[str, Any]:
        """The director's parameters as recorded: its fields, and the persona it must cast
        (only when there is one, so that a run without keeps its record)."""
        recorded = dataclasses.asdict(self.director)
        if self.persona is not None:
            recorded["persona"] = dataclasses.asdict(self.persona)
        return recorded


@dataclass
class StageContext:
    """What a stage runs with.

    Attributes:
        run: the run.
        models: where its model clients come from.
        plan: every stage's parameters.
        listener: sees the conversation as it happens.
        dialects: per stage, the structured-output dialects to try instead of the planned
            ones (a replay uses those the original planned).
        tools: the tools each role may call; None for none.
        human: the person who plays roles or adds notes in the dialogue, if any.
        stage: the stage being run (set by :func:`execute`).
        calls: its recorder (set by :func:`execute`).
        resume: go on from where an earlier attempt stopped (a resumable stage).
        inputs: what the stage depends on, read once before it runs (set by
            :func:`execute`; its sha256 is the stage's ``input_hash``).
        preview: only work out the first request the stage would send, sending and
            writing nothing (set by :func:`first_request`).
    """

    run: Run
    models: ClientSource
    plan: Plan
    listener: Listener = field(default_factory=Silent)
    dialects: Mapping[str, Sequence[str]] = field(default_factory=dict)
    tools: ToolSource | None = None
    human: HumanSource = field(default_factory=Nobody)
    stage: str = ""
    calls: StageCalls | None = None
    resume: bool = False
    inputs: object = None
    preview: bool = False

    @property
    def recorder(self) -> StageCalls:
        assert self.calls is not None, "a stage runs through pipeline.stages.execute"
        return self.calls

    @contextlib.contextmanager
    def running(
        self, *, endpoint: Endpoint | None, parameters: Mapping[str, Any], inputs: object
    ) -> Iterator[StageRecord]:
        """The stage's record while it runs (see :meth:`pipeline.runs.Run.stage_running`),
        with the sha256 of the outputs it reads."""
        with self.run.stage_running(
            self.stage,
            endpoint=endpoint,
            parameters=parameters,
            inputs=inputs,
            upstream=upstream(self.run, self.stage),
        ) as entry:
            try:
                yield entry
            finally:
                _note_fine_tuned(self.run, entry)


def _note_fine_tuned(run: Run, entry: StageRecord) -> None:
    """Record in ``run``'s manifest the fine-tuning job (from the ledgers in the runs
    folder) that made each model the stage ran on."""
    from .finetune import job_for_model

    described = [e for e in (entry.endpoint, entry.moderator_endpoint) if e is not None]
    found = dict(run.manifest.fine_tuned_models or {})
    for model in {e.model for e in [*described, *(entry.role_endpoints or [])]} - set(found):
        ledger = job_for_model(run.folder.parent, model)
        if ledger is not None and ledger.job_id:
            found[model] = {"job_id": ledger.job_id, "ledger": ledger.local_id}
    if found != (run.manifest.fine_tuned_models or {}):
        run.manifest.fine_tuned_models = found
        run.save()


# -- staleness ------------------------------------------------------------------------------


def digest(run: Run, name: str) -> str | None:
    """The sha256 of stage ``name``'s main output, None when it has none."""
    from .resources import file_sha256

    path = run.path(stage(name, run).output)
    return file_sha256(path) if path.is_file() else None


def upstream(run: Run, name: str) -> dict[str, str | None]:
    """The sha256 of the output of each stage that ``name`` needs, as they are now."""
    return {need: digest(run, need) for need in stage(name, run).needs}


def statuses(run: Run) -> dict[str, str]:
    """Every stage's status, by name, in the order of the graph: see :func:`status`. Each
    stage's output is hashed once, however many stages read it."""
    digests: dict[str, str | None] = {}
    found: dict[str, str] = {}
    for node in graph(run):  # a stage comes after those it needs: their status is known
        for need in node.needs:
            if need not in digests:
                digests[need] = digest(run, need)
        read = {need: digests[need] for need in node.needs}
        found[node.name] = _status(run, node, read, found)
    return found


def status(run: Run, name: str) -> str:
    """Stage ``name``'s status as a user sees it: ``pending``, ``running``, ``done``,
    ``failed``, ``interrupted`` (recorded running, but its process is gone) or ``stale``
    (an output it read has changed since, or a stage it needs is stale)."""
    return statuses(run)[name]


def _status(run: Run, node: Stage, read: dict[str, str | None], found: dict[str, str]) -> str:
    """As :func:`status`, given the digests of what ``node`` reads now and the status of
    the stages it needs."""
    from .records import StageRecord

    entry = run.manifest.stages.get(node.name) or StageRecord()  # not added by looking
    recorded = entry.status
    if recorded == "pending" or run.alive(node.name):
        return recorded
    if entry.upstream is None:  # nothing to compare: a stage stored stale by older code
        return "interrupted" if recorded == "running" else recorded
    if entry.upstream != read or any(found[need] == "stale" for need in node.needs):
        return "stale"
    if recorded == "running":
        return "interrupted"
    if recorded == "stale":  # stored while an input differed, which it no longer does
        if entry.ended is None:  # (older code also stored it over an interrupted stage)
            return "interrupted"
        return "failed" if entry.error else "done"
    return recorded


def refresh(run: Run) -> None:
    """Store in ``run.json`` what :func:`status` says of staleness, over a stage that is
    done or failed (an interrupted one keeps its record: :func:`status` says it is stale)."""
    changed = False
    for name, now in statuses(run).items():
        entry = run.stage(name)
        if now == "stale" and entry.status in ("done", "failed"):
            entry.status, changed = "stale", True
        elif entry.status == "stale" and now != "stale":
            entry.status, changed = now, True
    if changed:
        run.save()


# -- running stages ---------------------------------------------------------------------


def execute(ctx: StageContext, name: str, *, resume: bool = False) -> None:
    """Run stage ``name`` of ``ctx.run``: afresh, its old files moved to
    ``<stage>/previous-N/`` first, or, with ``resume``, going on from where it stopped.
    What it made stale downstream is stored as such.

    Raises:
        PipelineError: the run is not ready for the stage (nothing is touched), or the
            stage failed (its record says how; its files stay).
    """
    from .recorder import StageCalls

    run = ctx.run
    resume = resume and require(run, name).resumable
    # its clients resolved, its inputs read: then archive
    module, here = _ready(ctx, name, calls=StageCalls(run, name), resume=resume)
    if not resume:
        run.archive_stage(name)
        refresh(run)
    try:
        module.run(here)
    finally:
        refresh(run)


def _ready(ctx: StageContext, name: str, **fields: Any) -> tuple[StageModule, StageContext]:
    """Stage ``name``'s module and its context (``ctx`` with ``fields``), once the run is
    checked ready for it and its inputs are read.

    Raises:
        PipelineError: the run is not ready for the stage (nothing is touched).
    """
    module = require(ctx.run, name).load()
    if (check := getattr(module, "check", None)) is not None:
        check(ctx.run)
    here = dataclasses.replace(ctx, stage=name, **fields)
    here.inputs = module.inputs(here)
    return module, here


def run_stage(
    run: Run,
    name: str,
    models: ClientSource,
    plan: Plan | None = None,
    *,
    listener: Listener | None = None,
) -> None:
    """Run stage ``name`` of ``run`` afresh (see :func:`execute`), with ``plan`` (the
    defaults when None): the library's one-call form.

    Raises:
        PipelineError: the stage failed.
    """
    ctx = StageContext(run, models, plan or Plan.of(), listener or Silent())
    execute(ctx, name)


def is_current(ctx: StageContext, name: str) -> bool:
    """True when stage ``name`` is done, not stale, with exactly the inputs it would have now."""
    from .records import sha256_of

    if status(ctx.run, name) != "done":
        return False
    inputs = stage(name, ctx.run).load().inputs(dataclasses.replace(ctx, stage=name))
    return ctx.run.stage(name).input_hash == sha256_of(inputs)


def advance(ctx: StageContext, *, include: Sequence[str] = (), until: str | None = None) -> None:
    """Bring ``ctx.run`` to its end from wherever it stopped: every stage that is not done,
    in the order of the graph (optional ones only when in ``include``), up to stage
    ``until`` included when given. A resumable stage that was interrupted or failed goes
    on from where it stopped; a stale one starts over."""
    for node in wanted(ctx.run, include):
        now = status(ctx.run, node.name)
        if now != "done":
            execute(ctx, node.name, resume=now in ("interrupted", "failed"))
        if node.name == until:
            return


def first_request(ctx: StageContext, name: str) -> tuple[Endpoint, JSONObject]:
    """The endpoint and body of the first request stage ``name`` of ``ctx.run`` would
    send if it ran now, worked out without sending or writing anything: the request a
    provider batch can answer ahead of time (:mod:`pipeline.batchapi`).

    Raises:
        ValueError: the stage is not one structured answer (:attr:`Stage.answer`).
        PipelineError: the run is not ready for the stage.
    """
    from .answer import Previewed

    if not require(ctx.run, name).answer:
        raise ValueError(f"the {name} stage converses: its requests cannot be known ahead")
    module, here = _ready(ctx, name, calls=None, preview=True)
    try:
        module.run(here)
    except Previewed as preview:
        return preview.endpoint, preview.body
    raise AssertionError(f"the {name} stage sent no structured question")


def planned_stages(run: Run) -> tuple[str, ...]:
    """The optional stages ``run`` was planned with or has run (``advance``'s ``include``
    for a resumed run)."""
    return tuple(
        node.name
        for node in graph(run)
        if node.optional
        and (run.stage(node.name).parameters or run.stage(node.name).status != "pending")
    )


def pending(run: Run, *, include: Sequence[str] = ()) -> list[str]:
    """The stages :func:`advance` would run, in order."""
    now = statuses(run)
    return [node.name for node in wanted(run, include) if now[node.name] != "done"]


def wanted(run: Run, include: Sequence[str]) -> list[Stage]:
    """The stages of the graph a run is brought to its end with: every one but the
    optional ones not in ``include``."""
    return [node for node in graph(run) if not node.optional or node.name in include]
